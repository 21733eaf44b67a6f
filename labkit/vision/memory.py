"""Memory (lab 05): what the weights of each part of a vision-language model weigh (read from the safetensors
headers, no torch), and the lab's memory table: weights by part, KV cache, the engine in all, the first image.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from labkit.vision.images import ImageError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PARTS = (("vision tower", ("vision_tower", "vision_model")),
         ("projector", ("multi_modal_projector", "mlp1")),
         ("language model", ("",)))


def _part(name: str) -> str:
    return next(part for part, keys in PARTS if any(k in name for k in keys))  # "" matches every name


def weights_by_part(model_dir: str | Path):
    """A table of parameters and bytes per part (vision tower, projector, language model), from the safetensors."""
    import pandas as pd

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ImageError(f"{model_dir} has no *.safetensors files to read the weights from")
    totals: dict[str, list[int]] = {p: [0, 0] for p, _ in PARTS}
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(meta["shape"])
            totals[_part(name)][0] += count
            totals[_part(name)][1] += count * _DTYPE_BYTES.get(meta["dtype"], 2)
    df = pd.DataFrame([{"part": p, "parameters": c, "MiB": b / 2**20} for p, (c, b) in totals.items()])
    df["share %"] = 100 * df["MiB"] / df["MiB"].sum()
    return df.round(2)


def memory_table(engine, weights, first_image_mib: float):
    """Lab 05's memory table: weights by part, the KV cache (PyTorch engine: read from it), the engine in all,
    and the first image's extra peak, MiB."""
    import pandas as pd

    from labkit.kvcache import engine_capacity

    kv = engine_capacity(engine) if engine.backend == "pytorch" else None  # TurboMind keeps its blocks in C++
    rows = [{"what": f"weights: {r.part}", "MiB": r.MiB} for r in weights.itertuples()]
    rows += [{"what": "KV cache" + ("" if kv else " (TurboMind does not report it)"),
              "MiB": kv["kv_bytes"] / 2**20 if kv else float("nan")},
             {"what": "engine in all (weights + KV + runtime)", "MiB": engine.memory_gib * 1024},
             {"what": "first image, extra at its peak", "MiB": first_image_mib}]
    return pd.DataFrame(rows).round(1)
