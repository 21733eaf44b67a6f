"""KV-cache arithmetic: bytes per token for a model and a quant policy, and how many tokens a
cache ratio buys on a GPU — predicted before any engine starts. Used by lab 00 (budget) and
lab 04: `predict` mirrors lmdeploy 0.18's PyTorch engine exactly (blocks, tokens, bytes),
`engine_capacity` reads what a running engine allocated, `sweep` measures both side by side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas

QUANT_POLICIES = {0: "fp16/bf16 KV", 4: "int4 KV", 8: "int8 KV"}


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


def check_policy(quant_policy: int) -> int:
    """The policy itself, or a ValueError listing the valid ones."""
    if quant_policy not in QUANT_POLICIES:
        raise ValueError(f"quant_policy must be one of {sorted(QUANT_POLICIES)} "
                         f"({', '.join(f'{k}: {v}' for k, v in QUANT_POLICIES.items())}), not {quant_policy!r}")
    return quant_policy


def check_ratio(ratio: float, backend: str | None = None) -> float:
    """The cache ratio itself, or a ValueError: it must lie in (0, 1], and below 1 for the PyTorch engine."""
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"cache_max_entry_count must be in (0, 1] (a share of the free GPU memory), "
                         f"not {ratio!r}; the course uses 0.8, 0.4 and 0.01")
    if backend == "pytorch" and ratio >= 1:
        raise ValueError(f"cache_max_entry_count must be below 1 for lmdeploy's PyTorch engine (it keeps some "
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
        raise ValueError("the runs have no quant_policy 0 row to compare with")
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
    for policy, label in QUANT_POLICIES.items():
        per_token = bytes_per_token(shape, policy)
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
    if quant_policy == 0:
        parts = [block_size * shape.kv_heads * shape.head_dim * shape.dtype_bytes] * 2
    else:
        dim = shape.head_dim // 2 if quant_policy == 4 else shape.head_dim  # int4 packs 2 values per byte
        parts = [block_size * shape.kv_heads * dim] * 2                      # K, V as uint8
        parts += [block_size * shape.kv_heads * 2 * shape.dtype_bytes] * 2   # K, V scale + zero
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
    from labkit.engine import _init_cuda_context
    from labkit.gpu import memory_free

    if context_bytes is None:
        _init_cuda_context()
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
            raise ValueError(f"no room for a KV cache: {free_bytes / 1024**3:.2f} GiB free after the weights, "
                             f"ratio {ratio}, {per_block / 1024**2:.2f} MiB per block of {size} tokens. Raise the "
                             f"ratio, use a smaller or quantized model, or free GPU memory")
        if blocks >= MIN_BLOCKS:
            break
        prefill //= 2
        if prefill <= 0:
            raise ValueError("not enough GPU memory for the engine's runtime buffers")
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
        raise ValueError(f"{type(backend).__name__} does not report its KV blocks to Python (TurboMind keeps "
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


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """(% of positions with the same token, mean length of the identical prefix) of two greedy outputs."""
    same = total = prefix = 0
    for a, b in zip(reference, other):
        n = min(len(a), len(b))
        same += sum(x == y for x, y in zip(a[:n], b[:n]))
        total += max(len(a), len(b))
        k = next((i for i in range(n) if a[i] != b[i]), n)
        prefix += k
    return (100.0 * same / total if total else float("nan"), prefix / max(len(reference), 1))


def measure_engine(eng, prompts: list[str], concurrency: int = 32, new_tokens: int = 256, repeats: int = 2,
                   agree_tokens: int = 64, predicted: dict | None = None, tok_s: float | None = None,
                   prompt_tokens: int = 128):
    """(row, greedy token ids) for a running engine: KV allocated (vs predicted), memory, tok/s at `concurrency`."""
    from labkit import bench

    cap = engine_capacity(eng)
    if tok_s is None:
        speed = bench.measure(eng, batch_sizes=(concurrency,), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                              repeats=repeats)
        tok_s = float(speed["output tok/s"].iloc[0])
    replies = eng.generate(list(prompts), max_new_tokens=agree_tokens, temperature=0, ignore_eos=True)
    row = {"ratio": cap["ratio"], "quant_policy": cap["quant_policy"], "kv": QUANT_POLICIES[cap["quant_policy"]],
           "GPU memory GiB": eng.memory_gib, "KV cache GiB": cap["kv_bytes"] / 1024**3, "blocks": cap["blocks"],
           "tokens that fit": cap["tokens"], "tokens per KV GiB": cap["tokens"] / (cap["kv_bytes"] / 1024**3),
           f"tok/s at {concurrency} concurrent": tok_s}
    if predicted is not None:
        row["predicted tokens"] = predicted["tokens"]
        row["prediction error %"] = 100 * (predicted["tokens"] - cap["tokens"]) / cap["tokens"]
    return row, [list(r.token_ids) for r in replies]


def check_runs(runs) -> list[tuple[float, int]]:
    """(ratio, policy) pairs checked for the PyTorch engine, fp16 first; a ValueError before anything starts."""
    runs = [(check_ratio(r, "pytorch"), check_policy(p)) for r, p in runs]
    if not any(p == 0 for _, p in runs):
        raise ValueError("runs need a quant_policy 0 run: its greedy outputs are the reference for agreement")
    first = next(i for i, (_, p) in enumerate(runs) if p == 0)
    return [runs[first]] + runs[:first] + runs[first + 1:]


def sweep(model: str | Path, runs, prompts: list[str], concurrency: int = 32, new_tokens: int = 256,
          repeats: int = 2, agree_tokens: int = 64, backend: str = "pytorch", name: str = "kv-sweep",
          prompt_tokens: int = 128):
    """One engine per (ratio, quant_policy): predicted vs allocated KV, GPU memory, speed, agreement with fp16 KV."""
    import pandas as pd

    from labkit import bench
    from labkit.engine import Engine
    from labkit.models import resolve

    runs = check_runs(runs)  # every run checked before the first start
    bench.check_sizes((concurrency,), prompt_tokens, new_tokens, 1, repeats)
    model_dir = resolve(str(model))
    rows, reference, outputs = [], None, {}
    for ratio, policy in runs:
        predicted = predict(model_dir, ratio, policy)
        with Engine(model_dir, backend=backend, name=name, cache_ratio=ratio, quant_policy=policy) as eng:
            row, ids = measure_engine(eng, prompts, concurrency, new_tokens, repeats, agree_tokens, predicted,
                                      prompt_tokens=prompt_tokens)
        reference = reference if reference is not None else ids
        row["same tokens as fp16 KV %"], row["identical prefix (tokens)"] = agreement(reference, ids)
        outputs[(ratio, policy)] = ids
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(outputs=outputs, model=model_dir.name, agree_tokens=agree_tokens)
    return table.round(3)
