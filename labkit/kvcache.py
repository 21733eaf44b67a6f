"""KV-cache arithmetic: bytes per token for a model and a quant policy, and how many tokens a
cache ratio buys on a GPU — predicted before any engine starts. Used by lab 00 (budget) and
lab 04 (capacity, checked against what the engine allocated).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

QUANT_POLICIES = {0: "fp16/bf16 KV", 4: "int4 KV", 8: "int8 KV"}


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache depends on, read from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelShape":
        """Read the shape from `model_dir/config.json` (text config of a vision model too)."""
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        for key in ("text_config", "llm_config"):
            if isinstance(cfg.get(key), dict) and "num_hidden_layers" in cfg[key]:
                cfg = cfg[key]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads), head_dim)


def check_policy(quant_policy: int) -> int:
    """The policy itself, or a ValueError listing the valid ones."""
    if quant_policy not in QUANT_POLICIES:
        raise ValueError(f"quant_policy must be one of {sorted(QUANT_POLICIES)} "
                         f"({', '.join(f'{k}: {v}' for k, v in QUANT_POLICIES.items())}), not {quant_policy!r}")
    return quant_policy


def check_ratio(ratio: float) -> float:
    """The cache ratio itself, or a ValueError: it must lie in (0, 1]."""
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"cache_max_entry_count must be in (0, 1] (a share of the free GPU memory), "
                         f"not {ratio!r}; the course uses 0.8, 0.4 and 0.01")
    return float(ratio)


def bytes_per_token(shape: ModelShape, quant_policy: int = 0) -> float:
    """KV-cache bytes one token takes over all layers (K and V; int4/int8 add a scale and zero)."""
    check_policy(quant_policy)
    per_head = shape.head_dim * shape.dtype_bytes if quant_policy == 0 else \
        shape.head_dim * quant_policy / 8 + 2 * shape.dtype_bytes
    return 2 * shape.layers * shape.kv_heads * per_head


def predict_tokens(shape: ModelShape, free_bytes: int, ratio: float, quant_policy: int = 0) -> int:
    """Tokens the KV cache holds when the engine takes `ratio` of `free_bytes` (after weights)."""
    return int(free_bytes * check_ratio(ratio) // bytes_per_token(shape, quant_policy))


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of weight files in a model folder (what `du -sh` showed in the course)."""
    d = Path(model_dir)
    return sum(f.stat().st_size for p in ("*.safetensors", "*.bin") for f in d.glob(p))


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
        rows.append({"kv policy": f"{policy} ({label})", "weights GiB": weights / 1024**3,
                     "kv cache GiB": kv / 1024**3, "runtime GiB": RUNTIME_OVERHEAD / 1024**3,
                     "left free GiB": (free - weights - RUNTIME_OVERHEAD - kv) / 1024**3,
                     "kv bytes/token": bytes_per_token(shape, policy),
                     "tokens that fit": int(kv // bytes_per_token(shape, policy))})
    return pd.DataFrame(rows).round(2)
