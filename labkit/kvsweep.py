"""Lab 04's KV-cache sweep: one engine per (cache ratio, KV quant policy), each measured against
labkit.kvcache's prediction (blocks, tokens that fit), for GPU memory and speed, and for how far its greedy
replies agree with the fp16 KV cache's. scripts/bench_quant.py uses the same pieces.

    runs = labkit.kvsweep.sweep(model_dir, [(0.4, 0), (0.4, 8)], prompts)
"""
from __future__ import annotations

from pathlib import Path

from labkit import bench
from labkit.errors import OptionError
from labkit.kvcache import QUANT_POLICIES, check_policy, check_ratio, engine_capacity, predict


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
        raise OptionError("runs need a quant_policy 0 run: its greedy outputs are the reference for agreement")
    first = next(i for i, (_, p) in enumerate(runs) if p == 0)
    return [runs[first]] + runs[:first] + runs[first + 1:]


def sweep(model: str | Path, runs, prompts: list[str], concurrency: int = 32, new_tokens: int = 256,
          repeats: int = 2, agree_tokens: int = 64, backend: str = "pytorch", name: str = "kv-sweep",
          prompt_tokens: int = 128):
    """One engine per (ratio, quant_policy): predicted vs allocated KV, GPU memory, speed, agreement with fp16 KV."""
    import pandas as pd

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
