"""KV-cache arithmetic: bytes per token for a model and a quant policy, and how many tokens a
cache ratio buys on a GPU — predicted before any engine starts. Used by lab 00 (budget) and
lab 04: `predict` mirrors lmdeploy 0.18's PyTorch engine exactly (blocks, tokens, bytes),
`engine_capacity` reads what a running engine allocated; labkit.kvsweep measures both side by side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from labkit.errors import OptionError

if TYPE_CHECKING:
    import pandas

# Every KV policy of lmdeploy 0.18 (lmdeploy.messages.QuantPolicy); which engine takes which: check_policy.
KV_POLICIES = {0: "fp16/bf16 KV", 4: "int4 KV", 8: "int8 KV", 16: "fp8 e4m3 KV", 17: "fp8 e5m2 KV",
               42: "TurboQuant KV (K 4-bit, V 2-bit)"}
QUANT_POLICIES = KV_POLICIES
COURSE_POLICIES = (0, 4, 8)   # what the course taught (lab 00's budget); 16, 17 and 42 are new in 0.18's list
FP8_POLICIES = (16, 17)
TURBO_QUANT = 42
# head_dims for which TurboMind aborted the process on an int4 KV cache (the labkit test that found each)
TM_INT4_ABORTS = {64: "GPU suite 2026-12-01, H200, lmdeploy 0.18, labkit's trained model: '[TM][FATAL] CUDA error: "
                      "misaligned address' in Engine::Impl::Update"}
# TurboMind: its config refuses FP8 ("FP8 quantization is not supported"); 42 it accepts, but its kernels read
# quant_policy as bit flags (src/turbomind/kernels/attention/decoding.cu: policy & 8 = int8, & 4 = int4) and have
# no TurboQuant path (nor has the 0.18 wheel's _turbomind.so any TurboQuant symbol), so 42 (0b101010) would
# quietly run as int8. labkit refuses both on TurboMind.
TURBOMIND_REFUSES = (*FP8_POLICIES, TURBO_QUANT)


def text_config(model_dir: str | Path) -> dict:
    """A model's text config from config.json (a vision model's text_config / llm_config / language_config)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("text_config", "llm_config", "language_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and ("num_hidden_layers" in sub or "hidden_size" in sub):
            return {**sub, "architectures": cfg.get("architectures")}  # the model's own class, not the text part's
    return cfg


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache depends on, read from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    vocab: int = 0

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelShape":
        """Read the shape from `model_dir/config.json` (text config of a vision model too)."""
        cfg = text_config(model_dir)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(cfg["num_hidden_layers"], cfg.get("num_key_value_heads") or heads, head_dim,
                   vocab=cfg.get("vocab_size", 0))


def check_policy(quant_policy: int, backend: str | None = None, head_dim: int | None = None) -> int:
    """The policy itself if lmdeploy 0.18 and the chosen engine take it, else an OptionError with the engine's
    reason: TurboMind rejects FP8 (16/17) and TurboQuant (42, PyTorch engine only, power-of-two head_dim), and int4 (4)
    where it aborted on the model's head_dim (TM_INT4_ABORTS)."""
    if isinstance(quant_policy, bool) or quant_policy not in KV_POLICIES:
        raise OptionError(f"quant_policy must be one of {sorted(KV_POLICIES)} "
                          f"({', '.join(f'{k}: {v}' for k, v in KV_POLICIES.items())}), not {quant_policy!r}")
    quant_policy = int(quant_policy)
    if backend == "turbomind" and quant_policy in FP8_POLICIES:
        raise OptionError(f"quant_policy {quant_policy} ({KV_POLICIES[quant_policy]}) is refused by TurboMind "
                          f"(lmdeploy: 'invalid quant_policy for TurboMind, FP8 quantization is not supported'); "
                          f"it runs on lmdeploy's PyTorch engine only: use backend='pytorch', or 4 / 8 on TurboMind")
    if backend == "turbomind" and quant_policy == TURBO_QUANT:
        raise OptionError("quant_policy 42 (TurboQuant) runs on lmdeploy's PyTorch engine only (TurboMind has no "
                          "TurboQuant kernels: 42 would run as int8): use backend='pytorch', or 4 / 8 on TurboMind")
    if backend == "turbomind" and quant_policy == 4 and head_dim in TM_INT4_ABORTS:
        raise OptionError(f"TurboMind aborts the whole process on an int4 KV cache (quant_policy 4) with head_dim "
                          f"{head_dim}, this model's ({TM_INT4_ABORTS[head_dim]}): use quant_policy 8 on TurboMind, "
                          f"or backend='pytorch' for int4")
    if quant_policy == TURBO_QUANT and head_dim is not None and head_dim & (head_dim - 1):
        raise OptionError(f"quant_policy 42 (TurboQuant) needs a power-of-two head_dim, and this model's is "
                          f"{head_dim} (lmdeploy: 'TurboQuant requires power-of-2 K/Q head dim'): use 4 or 8")
    return quant_policy


def check_ratio(ratio: float, backend: str | None = None) -> float:
    """The cache ratio itself, or a ValueError: it must lie in (0, 1], and below 1 for the PyTorch engine."""
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise OptionError(f"cache_max_entry_count must be in (0, 1] (a share of the free GPU memory), "
                         f"not {ratio!r}; the course uses 0.8, 0.4 and 0.01")
    if backend == "pytorch" and ratio >= 1:
        raise OptionError(f"cache_max_entry_count must be below 1 for lmdeploy's PyTorch engine (it keeps some "
                         f"memory for its own work), not {ratio!r}: use e.g. 0.9")
    return float(ratio)


def bytes_per_token(shape: ModelShape, quant_policy: int = 0, block_size: int | None = None) -> float:
    """KV-cache bytes one token takes over all layers: a block's bytes (lmdeploy's layout) / its tokens."""
    size = effective_block_size(shape, block_size or BLOCK_SIZE)
    return block_bytes(shape, quant_policy, size) / size


def per_token_table(model_or_shape: "str | Path | ModelShape") -> "pandas.DataFrame":
    """KV bytes per token for each quant policy, and how many times fewer than fp16 (a table)."""
    import pandas as pd

    shape = model_or_shape if isinstance(model_or_shape, ModelShape) else ModelShape.from_dir(model_or_shape)
    per_token = {p: bytes_per_token(shape, p) for p in QUANT_POLICIES}
    return pd.DataFrame([{"quant_policy": p, "kv policy": f"{p} ({label})", "bytes per token": per_token[p],
                          "vs fp16": per_token[0] / per_token[p]} for p, label in QUANT_POLICIES.items()])


def gain_vs_fp16(runs: "pandas.DataFrame") -> dict[int, float]:
    """Mean tokens per KV GiB of each int KV policy in a sweep's runs table, divided by that of policy 0."""
    mean = runs.groupby("quant_policy")["tokens per KV GiB"].mean()
    if 0 not in mean.index:
        raise OptionError("the runs have no quant_policy 0 row to compare with")
    return {int(p): float(v / mean[0]) for p, v in mean.items() if p != 0}


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of weight files in a model folder (what `du -sh` showed in the course)."""
    return sum(f.stat().st_size for f in weight_files(model_dir))


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model folder (labkit.models.WEIGHT_PATTERNS), sorted by name."""
    from labkit.models import WEIGHT_PATTERNS

    d = Path(model_dir)
    return sorted({f for pattern in WEIGHT_PATTERNS for f in d.glob(pattern)})


# What a CUDA context, the engine's runtime buffers and the allocator take besides weights and KV.
RUNTIME_OVERHEAD = int(1.5 * 1024**3)
COURSE_SLICE_GIB = 24.0  # the course ran on a 30% slice of an 80 GB A100


def budget(model_dir: str | Path, ratio: float = 0.8, gpu_free_gib: float | None = None):
    """How a GPU's free memory splits into weights, KV cache and the rest, per KV policy (a table)."""
    import pandas as pd

    from labkit.gpu import gpus

    check_ratio(ratio)
    if gpu_free_gib is None:
        found = gpus()
        gpu_free_gib = found[0].free_gib if found else COURSE_SLICE_GIB
    free = int(gpu_free_gib * 1024**3)
    weights = weights_bytes(model_dir)
    after = max(free - weights - RUNTIME_OVERHEAD, 0)
    kv = int(after * ratio)
    shape = ModelShape.from_dir(model_dir)
    rows = []
    for policy in COURSE_POLICIES:
        label, per_token = QUANT_POLICIES[policy], bytes_per_token(shape, policy)
        rows.append({"kv policy": f"{policy} ({label})", "weights GiB": weights / 1024**3,
                     "kv cache GiB": kv / 1024**3, "runtime GiB": RUNTIME_OVERHEAD / 1024**3,
                     "left free GiB": (free - weights - RUNTIME_OVERHEAD - kv) / 1024**3,
                     "kv bytes/token": per_token, "tokens that fit": int(kv // per_token)})
    return pd.DataFrame(rows).round(2)


# ----------------------------------------------------------------------------- exact capacity (lab 04)
# Mirrors lmdeploy 0.18's PyTorch engine (pytorch/engine/executor/base.py `update_configs`,
# pytorch/engine/cache_engine/schema.py + layout.py): after the weights load, the engine reads the
# free GPU memory (torch.cuda.mem_get_info), reserves runtime buffers of
# (max_prefill_token_num + max_batches * 2) * vocab * 2 bytes (halving max_prefill_token_num until
# at least 16 blocks fit), takes `cache_max_entry_count` of what is left, and divides it into blocks
# of 64 tokens. One block holds, for every layer, K and V (each padded to 256 bytes) plus, for int4 /
# int8, a K and a V scale+zero pair per head and token in the model dtype (also padded to 256 bytes).

BLOCK_SIZE = 64            # PytorchEngineConfig.block_size
MAX_PREFILL_TOKENS = 8192  # PytorchEngineConfig.max_prefill_token_num
CACHE_ALIGN = 256          # CacheDesc.alignment
MIN_BLOCKS = 16            # the runtime reserve shrinks until this many blocks fit
CUDA_CONTEXT_BYTES = 800 * 1024**2  # a new process's CUDA context + torch (~0.8 GiB measured on the H200 runner)
_MAX_BATCH = {"a100": 384, "a800": 384, "h100": 1024, "h800": 1024, "l20y": 1024, "h200": 1024}


def default_max_batch_size(gpu_name: str | None = None) -> int:
    """lmdeploy's default max_batch_size on a CUDA GPU (utils.get_max_batch_size): it sizes the runtime reserve."""
    if gpu_name is None:
        from labkit.gpu import gpus

        found = gpus()
        gpu_name = found[0].name if found else ""
    low = gpu_name.lower()
    return next((size for name, size in _MAX_BATCH.items() if name in low), 128)


def _aligned(n: int) -> int:
    return (n + CACHE_ALIGN - 1) // CACHE_ALIGN * CACHE_ALIGN


def effective_block_size(shape: ModelShape, block_size: int = BLOCK_SIZE) -> int:
    """The block size the engine really uses (it drops to 32 for head_dim >= 512)."""
    return 32 if shape.head_dim >= 512 and block_size > 32 else block_size


def block_bytes(shape: ModelShape, quant_policy: int = 0, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of one KV-cache block over all layers, laid out as lmdeploy 0.18's PyTorch engine lays it out."""
    check_policy(quant_policy)
    block_size = effective_block_size(shape, block_size)
    rows = block_size * shape.kv_heads
    if quant_policy == 0:
        parts = [rows * shape.head_dim * shape.dtype_bytes] * 2
    elif quant_policy in FP8_POLICIES:  # one byte per value, a per-tensor scale (no per-token tensors)
        parts = [rows * shape.head_dim] * 2
    elif quant_policy == TURBO_QUANT:  # K 4-bit (d/2 bytes) + scale, zero; V 2-bit (d/4 bytes) + scale
        parts = [rows * (shape.head_dim // 2), rows * (shape.head_dim // 4),
                 rows * 2 * shape.dtype_bytes, rows * 1 * shape.dtype_bytes]
    else:
        dim = shape.head_dim // 2 if quant_policy == 4 else shape.head_dim  # int4 packs 2 values per byte
        parts = [rows * dim] * 2                                             # K, V as uint8
        parts += [rows * 2 * shape.dtype_bytes] * 2                          # K, V scale + zero
    return shape.layers * sum(_aligned(p) for p in parts)


def lmdeploy_block_bytes(model_dir: str | Path, quant_policy: int = 0, block_size: int = BLOCK_SIZE) -> int:
    """One KV block's bytes as lmdeploy 0.18's own cache planner lays it out (its plan, on the 'meta' device:
    no GPU needed; its config's bf16 probe is answered yes for the call, then restored)."""
    import lmdeploy.pytorch.config as lmd_config
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan

    check_policy(quant_policy)
    probe = lmd_config.is_bf16_supported
    lmd_config.is_bf16_supported = lambda *a, **k: True
    try:
        mc = lmd_config.ModelConfig.from_pretrained(str(model_dir), dtype="auto", device_type="cuda",
                                                    block_size=block_size)
        cc = lmd_config.CacheConfig(max_batches=128, block_size=block_size, num_cpu_blocks=0, num_gpu_blocks=0,
                                    quant_policy=QuantPolicy(quant_policy))
        return int(build_block_cache_plan(mc, cc, 1).logical_block_nbytes)
    finally:
        lmd_config.is_bf16_supported = probe


def runtime_reserve(vocab: int, max_prefill_token_num: int = MAX_PREFILL_TOKENS, max_batch_size: int = 128) -> int:
    """Bytes the engine keeps for runtime buffers before applying the cache ratio."""
    return int((max_prefill_token_num + max_batch_size * 2) * vocab * 2)


def free_after_weights(model_dir: str | Path, context_bytes: int | None = None) -> int:
    """Free GPU memory an engine will see once the weights are loaded: NVML free now - weights - CUDA context.

    context_bytes=None: the engine runs in this process, whose CUDA context is created now (a labkit Engine
    does the same before it starts), so nothing more is subtracted. For an engine in a new process (a
    server), pass CUDA_CONTEXT_BYTES.
    """
    from labkit.gpu import init_cuda_context, memory_free

    if context_bytes is None:
        init_cuda_context()
        context_bytes = 0
    return memory_free() - weights_bytes(model_dir) - context_bytes


def predict(model_dir: str | Path, ratio: float, quant_policy: int = 0, free_bytes: int | None = None,
            max_batch_size: int | None = None, max_prefill_token_num: int = MAX_PREFILL_TOKENS,
            block_size: int = BLOCK_SIZE, gpu_name: str | None = None, context_bytes: int | None = None) -> dict:
    """KV blocks / tokens / bytes the PyTorch engine will allocate; `free_bytes` = free GPU memory after weights."""
    check_ratio(ratio, "pytorch")
    check_policy(quant_policy)
    shape = ModelShape.from_dir(model_dir)
    if free_bytes is None:
        free_bytes = free_after_weights(model_dir, context_bytes)
    batches = max_batch_size or default_max_batch_size(gpu_name)
    size = effective_block_size(shape, block_size)
    per_block = block_bytes(shape, quant_policy, size)
    prefill = max_prefill_token_num
    while True:  # executor/base.py _get_runtime_size
        runtime = runtime_reserve(shape.vocab, prefill, batches)
        blocks = int((free_bytes - runtime) * ratio) // per_block
        if blocks <= 2:
            raise OptionError(f"no room for a KV cache: {free_bytes / 1024**3:.2f} GiB free after the weights, "
                             f"ratio {ratio}, {per_block / 1024**2:.2f} MiB per block of {size} tokens. Raise the "
                             f"ratio, use a smaller or quantized model, or free GPU memory")
        if blocks >= MIN_BLOCKS:
            break
        prefill //= 2
        if prefill <= 0:
            raise OptionError("not enough GPU memory for the engine's runtime buffers")
    return {"blocks": blocks, "tokens": blocks * size, "kv_bytes": blocks * per_block, "block_size": size,
            "block_bytes": per_block, "free_bytes": int(free_bytes), "runtime_bytes": runtime,
            "max_prefill_token_num": prefill, "max_batch_size": batches, "ratio": ratio,
            "quant_policy": quant_policy}


def _engine_block_bytes(backend) -> int | None:
    """Bytes of one block as the running PyTorch engine planned them (in-process executor only)."""
    agent = getattr(getattr(backend, "executor", None), "model_agent", None)
    sizes = getattr(agent, "_cache_plan_block_nbytes", None)
    return int(sizes[0]) if sizes else None


def engine_capacity(engine) -> dict:
    """What a running engine allocated: KV blocks, tokens, block size, bytes (PyTorch engine; labkit Engine or pipeline)."""
    pipe = getattr(engine, "pipe", engine)
    backend = pipe.async_engine.engine
    cache = getattr(backend, "cache_config", None)
    if cache is None or not hasattr(cache, "num_gpu_blocks"):
        raise OptionError(f"{type(backend).__name__} does not report its KV blocks to Python (TurboMind keeps "
                         f"them in C++): start the engine with backend='pytorch' to read them")
    policy, size, blocks = int(cache.quant_policy), int(cache.block_size), int(cache.num_gpu_blocks)
    per_block, source = _engine_block_bytes(backend), "engine"
    if per_block is None:
        model_dir = getattr(engine, "model_dir", None) or backend.model_path
        per_block, source = block_bytes(ModelShape.from_dir(model_dir), policy, size), "formula"
    return {"blocks": blocks, "tokens": blocks * size, "block_size": size, "block_bytes": per_block,
            "block_bytes_from": source, "kv_bytes": blocks * per_block, "quant_policy": policy,
            "ratio": float(cache.cache_max_entry_count), "max_batch_size": int(cache.max_batches),
            "max_prefill_token_num": int(cache.max_prefill_token_num)}


def assumed_free(model_dir: str | Path) -> tuple[int, str]:
    """(free bytes after weights, where): this GPU's, or the course's 24 GB slice when there is no GPU."""
    from labkit.gpu import gpus, has_cuda

    if has_cuda():
        return free_after_weights(model_dir), f"{gpus()[0].name}, free now minus the weights"
    slice_bytes = int(COURSE_SLICE_GIB * 1024**3)
    return slice_bytes - weights_bytes(model_dir) - CUDA_CONTEXT_BYTES, \
        f"no GPU here: the course's {COURSE_SLICE_GIB:.0f} GB A100 slice, minus the weights and a CUDA context"


def capacity_table(model_dir: str | Path, ratios=(0.8, 0.4, 0.1), policies=tuple(QUANT_POLICIES),
                   free_bytes: int | None = None, **kw):
    """Predicted KV capacity for each ratio and policy, before any engine starts (a table)."""
    import pandas as pd

    from labkit.gpu import has_cuda

    if free_bytes is None:
        free_bytes, where = assumed_free(model_dir)
        if not has_cuda():
            kw.setdefault("gpu_name", "A100")  # lmdeploy's max_batch_size (and runtime reserve) for an A100
        print(f"free after weights: {free_bytes / 1024**3:.2f} GiB ({where})")
    shape = ModelShape.from_dir(model_dir)
    rows = []
    for r in ratios:
        for p in policies:
            got = predict(model_dir, r, p, free_bytes=free_bytes, **kw)
            rows.append({"ratio": r, "kv policy": f"{p} ({QUANT_POLICIES[p]})",
                         "KV cache GiB": got["kv_bytes"] / 1024**3, "blocks": got["blocks"],
                         "tokens that fit": got["tokens"],
                         "bytes per token": bytes_per_token(shape, p, kw.get("block_size"))})
    return pd.DataFrame(rows).round(2)
