"""Honest speed measurements: transformers vs LMDeploy on the same model and GPU (lab 01, and any lab
that times an engine). Every run has a fixed prompt length and a fixed number of new tokens
(`ignore_eos`), warm-up runs first, then repeats whose median is reported; GPU work is synchronised
before a clock is read. TTFT is the time until every prompt of the batch has its first token
(transformers: a streamer; lmdeploy: a `stream_infer` run of the same batch). Also the batch-1 decode
roofline (measured memory bandwidth / weight bytes) and labkit's own overhead over raw lmdeploy.

    hf = labkit.bench.measure(HFEngine(model))     # one row per batch size
    lmd = labkit.bench.measure(Engine(model))
    labkit.bench.compare(hf, lmd); labkit.bench.plot(hf, lmd)
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from labkit.engine import check_gen
from labkit.errors import EngineError, LabkitError

COLUMNS = ["engine", "batch", "output tok/s", "TTFT ms", "total s", "repeats", "prompt tokens", "new tokens"]


class BenchError(LabkitError, RuntimeError):
    """A benchmark could not run or its result would not be honest; the message says why."""


def _is_baseline(engine: Any) -> bool:
    from labkit.baseline import HFEngine

    return isinstance(engine, HFEngine)


def label(engine: Any) -> str:
    """How an engine is named in the tables: `transformers` or `lmdeploy <backend>`."""
    return "transformers" if _is_baseline(engine) else f"lmdeploy {engine.backend}"


def _tokenizer(engine: Any):
    if _is_baseline(engine):
        return engine.tokenizer
    from transformers import AutoTokenizer

    from labkit.backends import needs_remote_code

    return AutoTokenizer.from_pretrained(engine.model_dir, trust_remote_code=needs_remote_code(engine.model_dir))


def fixed_prompt(tokenizer, n: int) -> str:
    """A text the tokenizer turns into exactly `n` tokens (special tokens such as BOS included)."""
    extra = len(tokenizer("").input_ids)
    want = n - extra
    if want < 1:
        raise BenchError(f"prompt_tokens must be more than the {extra} special token(s) this tokenizer adds")

    def fits(text: str) -> bool:
        return len(tokenizer(text).input_ids) == n

    for word in (" hello", " the", " world", " and", " a", "hello", "a"):
        if fits(word * want):
            return word * want
    for tid in range(min(len(tokenizer), 5000)):  # any token that repeats cleanly
        piece = tokenizer.decode([tid])
        if piece.strip() and fits(piece * want):
            return piece * want
    raise BenchError(f"could not build a prompt of exactly {n} tokens with this tokenizer")


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _first_token_streamer():
    """A transformers streamer that notes when the first generated tokens reach the host."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # call 1 is the prompt, call 2 the first new token of every sequence
                self.first = time.perf_counter()

        def end(self):
            pass

    return FirstToken()


def _run_baseline(hf, text: str, batch: int, new_tokens: int) -> tuple[float, float, int, int]:
    """(total s, TTFT s, new tokens, prompt tokens) of one batched transformers generate."""
    import torch

    ids = hf.tokenizer(text, return_tensors="pt").input_ids.to(hf.device).repeat(batch, 1)
    kw = hf._gen_kwargs(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    timer = _first_token_streamer()
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=timer, **kw)
    _sync()
    total = time.perf_counter() - start
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens:
        raise BenchError(f"transformers made {made} tokens instead of {new_tokens}")
    return total, timer.first - start, batch * made, ids.shape[1]


def _run_lmdeploy(eng, text: str, batch: int, new_tokens: int) -> tuple[float, float, int, int]:
    """(total s, TTFT s, new tokens, prompt tokens): one timed batch, then one streamed batch for TTFT."""
    from labkit.engine import gen_config

    eng._check_open()
    cfg = gen_config(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = [text] * batch
    from labkit import deadline

    start = time.perf_counter()
    replies = deadline.guarded(lambda: eng.pipe(prompts, gen_config=cfg, do_preprocess=False), None,
                               f"benchmark batch of {batch} on engine {eng.name!r}", eng._stuck())
    total = time.perf_counter() - start
    bad = [r for r in replies if r.generate_token_len != new_tokens]
    if bad:
        raise BenchError(f"lmdeploy made {bad[0].generate_token_len} tokens instead of {new_tokens} "
                         f"(finish_reason={bad[0].finish_reason}): lower new_tokens or raise session_len")
    first: dict[int, float] = {}
    start = time.perf_counter()
    for r in deadline.iterate(lambda: eng.pipe.stream_infer(prompts, gen_config=cfg, do_preprocess=False), None,
                              f"streamed benchmark batch of {batch} on engine {eng.name!r}", eng._stuck()):
        if r.index not in first and r.generate_token_len > 0:
            first[r.index] = time.perf_counter() - start
    if len(first) != batch:
        raise BenchError(f"only {len(first)} of {batch} streamed requests produced a token")
    return total, max(first.values()), sum(r.generate_token_len for r in replies), replies[0].input_token_len


def check_sizes(batch_sizes, prompt_tokens: int, new_tokens: int, warmup: int, repeats: int) -> tuple[int, ...]:
    """The batch sizes as a tuple, or a one-line error for bad sizes (before any model loads)."""
    check_gen(max_new_tokens=new_tokens)
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise BenchError(f"batch_sizes must be whole numbers >= 1, e.g. (1, 32), not {batch_sizes!r}")
    if not isinstance(prompt_tokens, int) or prompt_tokens < 2:
        raise BenchError(f"prompt_tokens must be a whole number >= 2, not {prompt_tokens!r}")
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise BenchError(f"need repeats >= 1 and warmup >= 0, not repeats={repeats!r}, warmup={warmup!r}")
    return sizes


def measure(engine: Any, batch_sizes=(1, 32), prompt_tokens: int = 128, new_tokens: int = 256,
            warmup: int = 1, repeats: int = 3):
    """Output tokens/s, time to first token and total time (medians) per batch size, as a table."""
    import pandas as pd

    sizes = check_sizes(batch_sizes, prompt_tokens, new_tokens, warmup, repeats)
    if getattr(engine, "closed", False):
        raise EngineError(f"{engine!r} is closed: build a new one")
    text = fixed_prompt(_tokenizer(engine), prompt_tokens)
    run = _run_baseline if _is_baseline(engine) else _run_lmdeploy
    rows = []
    for batch in sizes:
        for _ in range(warmup):
            run(engine, text, batch, new_tokens)
        runs = [run(engine, text, batch, new_tokens) for _ in range(repeats)]
        rows.append({"engine": label(engine), "batch": batch,
                     "output tok/s": statistics.median(made / total for total, _, made, _ in runs),
                     "TTFT ms": statistics.median(ttft for _, ttft, _, _ in runs) * 1000,
                     "total s": statistics.median(total for total, _, _, _ in runs),
                     "repeats": repeats, "prompt tokens": runs[0][3], "new tokens": new_tokens})
    table = pd.DataFrame(rows, columns=COLUMNS).round({"output tok/s": 1, "TTFT ms": 1, "total s": 3})
    table.attrs.update(model=engine.model_dir.name, device=_device_name(engine))
    return table


def _device_name(engine: Any) -> str:
    if _is_baseline(engine) and not engine.device.startswith("cuda"):
        return "CPU"
    from labkit.gpu import gpus

    found = gpus()
    return found[0].name if found else "CPU"


def compare(*tables):
    """Side by side per batch size: each engine's tokens/s and TTFT, and its speed-up over the first."""
    if len(tables) < 2:
        raise BenchError("compare needs two or more tables from measure(), e.g. compare(hf, lmd)")
    names = _names(tables)
    out = None
    for name, t in zip(names, tables):
        part = t.set_index("batch")[["output tok/s", "TTFT ms"]].rename(
            columns={"output tok/s": f"{name} tok/s", "TTFT ms": f"{name} TTFT ms"})
        out = part if out is None else out.join(part, how="inner")
    for name in names[1:]:
        out[f"{name} / {names[0]}"] = out[f"{name} tok/s"] / out[f"{names[0]} tok/s"]
    return out.reset_index().round(2)


def _names(tables) -> list[str]:
    names = [t["engine"].iloc[0] for t in tables]
    return [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]


def plot(*tables, ax=None) -> None:
    """Bar chart of output tokens/s per batch size, one bar per engine (log scale)."""
    import pandas as pd

    from labkit.plots import speed_bars

    if not tables:
        raise BenchError("plot needs one or more tables from measure()")
    both = pd.concat([t.assign(engine=n) for n, t in zip(_names(tables), tables)], ignore_index=True)
    speed_bars(both, ax=ax)


def memory_bandwidth(gpu: int = 0, size_gib: float | None = None, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy, read + write bytes counted."""
    import torch

    from labkit.gpu import memory_free, require_gpu

    require_gpu(what="measuring memory bandwidth")
    if size_gib is None:  # two buffers; leave most of the free memory alone
        size_gib = max(0.25, min(2.0, memory_free(gpu) / 2**30 / 4))
    n = int(size_gib * 2**30)
    dev = torch.device("cuda", gpu)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    try:
        times = []
        for i in range(repeats + 2):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            if i >= 2:  # two warm-up copies
                times.append(begin.elapsed_time(end) / 1000)
        return 2 * n / statistics.median(times)
    finally:
        del src, dst
        torch.cuda.empty_cache()


def roofline(model_dir: str | Path, tables=(), gpu: int = 0):
    """Batch-1 decode roofline (bandwidth / weight bytes, tokens/s) and the fraction each engine reached."""
    import pandas as pd

    from labkit.kvcache import weights_bytes

    weights = weights_bytes(model_dir)
    if weights <= 0:
        raise BenchError(f"no weight files in {model_dir}: give the model folder (labkit.resolve(name))")
    bandwidth = memory_bandwidth(gpu)
    roof = bandwidth / weights
    rows = []
    for name, t in zip(_names(tables), tables):
        one = t[t["batch"] == 1]
        if one.empty:
            raise BenchError(f"the {name} table has no batch-1 row: measure with batch_sizes=(1, ...)")
        speed = float(one["output tok/s"].iloc[0])
        rows.append({"engine": name, "batch-1 tok/s": speed, "roofline tok/s": roof,
                     "fraction of roofline": speed / roof})
    if not rows:
        rows.append({"engine": "-", "batch-1 tok/s": float("nan"), "roofline tok/s": roof,
                     "fraction of roofline": float("nan")})
    out = pd.DataFrame(rows)
    out.attrs.update(bandwidth_GBps=bandwidth / 1e9, weights_GB=weights / 1e9)
    print(f"memory bandwidth {bandwidth / 1e9:,.0f} GB/s (device-to-device copy), weights "
          f"{weights / 1e9:.2f} GB -> at most {roof:,.0f} tokens/s for one sequence: every decode step reads "
          f"all weights once")
    return out


OVERHEAD_TOLERANCE_PCT = 3.0  # lab 01: labkit's whole call path may cost at most this much over raw lmdeploy


def _check_pairs(seconds: float, min_pairs: int) -> None:
    if not (seconds > 0 and min_pairs >= 3):
        raise BenchError("overhead needs seconds > 0 and min_pairs >= 3 so that a median means something")


def paired(ours: Callable[[], float], raw: Callable[[], float], seconds: float = 30.0,
           min_pairs: int = 20) -> dict:
    """Time two calls (each returns its own seconds) back to back, in alternating order, until two standard
    errors of the median paired ratio are under half of OVERHEAD_TOLERANCE_PCT, the median is over it by twice
    that bound, or `seconds` have passed: the statistics `overhead` reports."""
    import gc

    _check_pairs(seconds, min_pairs)
    a_s, b_s, ratios, bound = [], [], [], math.inf
    gc.collect()
    gc.disable()  # as timeit does: a collection inside one call of a pair is noise, not the code timed
    deadline_at = time.perf_counter() + seconds
    try:
        while True:
            if len(ratios) % 2 == 0:
                a = ours(); b = raw()
            else:
                b = raw(); a = ours()
            a_s.append(a), b_s.append(b), ratios.append(a / b)
            if len(ratios) >= min_pairs:
                q1, mid, q3 = statistics.quantiles(ratios, n=4)
                # Two standard errors of a median of n ratios (sigma ~ IQR / 1.349, SE ~ 1.2533 sigma / sqrt(n)):
                # a paired difference inside this bound is run-to-run noise, not the code timed.
                bound = 2 * 1.2533 * (q3 - q1) / 1.349 / len(ratios) ** 0.5 * 100
                precise = bound < OVERHEAD_TOLERANCE_PCT / 2
                # Over the tolerance beyond doubt: by four standard errors, as the loop looks after every pair (a
                # two-error margin, looked at that often, is crossed by chance in noisy runs).
                too_slow = (mid - 1) * 100 - 2 * bound > OVERHEAD_TOLERANCE_PCT
                if precise or too_slow or time.perf_counter() > deadline_at:
                    break
    finally:
        gc.enable()
    q1, mid, q3 = statistics.quantiles(ratios, n=4)
    return {"pairs": len(ratios), "seconds": round(sum(a_s) + sum(b_s), 1),
            "labkit s": statistics.median(a_s), "raw lmdeploy s": statistics.median(b_s),
            "overhead %": (mid - 1) * 100, "noise % (IQR of pairs)": (q3 - q1) * 100, "noise bound %": bound}


def overhead(model: Any, batch: int = 8, new_tokens: int = 64, seconds: float = 30.0, slowdown_s: float = 0.0,
             min_pairs: int = 20) -> dict:
    """labkit's whole path (Engine.generate: checks, gen_config, the time limit, pipe) vs the raw lmdeploy
    pipeline call on the same engine, paired call by call (`paired`): overhead in % (median of paired ratios)
    with its noise bound. Pairing one by one cancels drift over seconds (clocks, the engine's own threads).
    `slowdown_s` adds a sleep to each of labkit's calls, to show the check failing."""
    from labkit.engine import Engine, gen_config

    check_gen(max_new_tokens=new_tokens)
    _check_pairs(seconds, min_pairs)
    own = not isinstance(model, Engine)
    eng = Engine(model, name="overhead") if own else model
    try:
        from lmdeploy import GenerationConfig

        prompts = ["Tell me about the sea."] * batch

        def via_labkit():
            if slowdown_s:
                time.sleep(slowdown_s)
            return eng.generate(prompts, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

        def via_raw():  # the same work as labkit's path: greedy, as temperature=0 there
            return eng.pipe(prompts, gen_config=GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True,
                                                                 do_sample=False))

        def timed(fn) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                replies = fn()
                took = time.perf_counter() - start
                if any(r.generate_token_len != new_tokens for r in replies):
                    raise BenchError("a reply came back short: the two paths did not do the same work")
                return took
            return run

        ours, raw = timed(via_labkit), timed(via_raw)
        for _ in range(3):  # warm-up: CUDA graphs, allocator, the watchdog thread
            ours(), raw()
        stats = paired(ours, raw, seconds=seconds, min_pairs=min_pairs)
        loops = 2000  # what labkit adds per call, timed on its own: no GPU noise in it
        from labkit import deadline

        start = time.perf_counter()
        for _ in range(loops):
            eng._check_open()
            gen_config(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            deadline.guarded(lambda: None, None, "overhead", "")  # the time limit on each call
        wrapper = (time.perf_counter() - start) / loops
        return {"engine": label(eng), "batch": batch, "new tokens": new_tokens, **stats,
                "labkit work per call µs": wrapper * 1e6,
                "labkit work %": wrapper / stats["raw lmdeploy s"] * 100}
    finally:
        if own:
            eng.close()


def overhead_check(cost: dict, tolerance_pct: float = OVERHEAD_TOLERANCE_PCT) -> tuple[str, bool, str]:
    """Lab 01's check on `overhead()`: labkit's whole path within a fixed tolerance of raw lmdeploy, measured
    precisely enough to say so (run-to-run noise under the tolerance)."""
    detail = (f"paired median {cost['overhead %']:+.2f}% over {cost['pairs']} pairs of calls "
              f"(run-to-run noise +/-{cost['noise bound %']:.1f}%); "
              f"labkit's own work {cost['labkit work per call µs']:.0f} µs a call")
    if cost["overhead %"] - cost["noise bound %"] > tolerance_pct:
        detail += (f"; labkit's path is slower than raw lmdeploy beyond the noise: does it ask the engine for more "
                   f"work (the GenerationConfig it sends) or wait longer (its time limit: deadline.guarded)?")
    elif cost["noise bound %"] >= tolerance_pct:
        detail += (f"; the noise is as large as the {tolerance_pct:g}% allowed, so this run cannot tell: is another "
                   f"process using the GPU? run the cell again, or with more OVERHEAD_SECONDS")
    return (f"labkit's whole call path costs less than {tolerance_pct:g}% over raw lmdeploy",
            cost["overhead %"] < tolerance_pct and cost["noise bound %"] < tolerance_pct, detail)
