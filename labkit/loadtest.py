"""A small load test for a local OpenAI-compatible server (lab 02): N concurrent streaming requests
(asyncio + openai.AsyncOpenAI), bounded in count and in time, against 127.0.0.1 / localhost only.
Reports requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL: the gaps
between streamed chunks) percentiles as a pandas table; `sweep` compares concurrency levels and `plot` draws
them. The extended columns add latency and time per output token (TPOT: per request, (latency - TTFT) /
(tokens - 1), as vLLM's benchmark counts it), which, unlike chunk gaps, does not depend on how the server
groups tokens into chunks.
Lab 07 points it at `lmdeploy serve proxy` (a labkit.proxy.Proxy works like a Server here) and reads
`run(..., detail=True)`: one row per request (when it started, TTFT, latency, retries, error), with a
shared `system` prompt (prefix caching), client-side `retries`, and `require_finish` (a stream that
ends without finish_reason was cut off: its server died mid-reply).

The asyncio work runs in its own thread, so it works inside Jupyter (whose event loop is running).
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from labkit.net import LOCAL_HOSTS
from labkit.webui import list_models, openai_base
from labkit.errors import LabkitError

MAX_REQUESTS = 2000
MAX_CONCURRENCY = 512
MAX_SECONDS = 600.0
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class LoadTestError(LabkitError, ValueError):
    """The load test was asked for something it will not do (another host, too many requests...)."""


def _target(server: Any) -> tuple[str, str, str | None]:
    """(…/v1 URL, api key, model name) of a labkit Server or a URL (key: OPENAI_API_KEY, as for
    webui.list_models); refuses anything but this machine."""
    try:
        url, key = openai_base(server)
    except ValueError as err:
        raise LoadTestError(str(err)) from None
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise LoadTestError(f"the load test only runs against this machine (127.0.0.1 / localhost), not {host!r}: "
                            f"load-testing someone else's server is an attack")
    return url, key, getattr(server, "model_name", None)


@dataclass
class _Req:
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    cached: int = 0
    finish: str | None = None
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


@dataclass
class _Opts:
    model: str
    prompt: str
    max_tokens: int
    system: str | None = None
    retries: int = 0
    require_finish: bool = False


async def _attempt(client, o: _Opts, req: _Req) -> None:
    """One try of one request; raises on transport errors, sets req.error on an empty or cut-off reply."""
    last = None
    chunks = 0
    messages = ([{"role": "system", "content": o.system}] if o.system else []) + [{"role": "user", "content": o.prompt}]
    stream = await client.chat.completions.create(
        model=o.model, messages=messages, max_tokens=o.max_tokens, stream=True,
        temperature=0.7, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if req.first is None:
                req.first = now
            else:
                req.gaps.append(now - last)
            last = now
        if chunk.choices and chunk.choices[0].finish_reason:
            req.finish = chunk.choices[0].finish_reason
        usage = getattr(chunk, "usage", None)
        if usage is not None and usage.completion_tokens:
            req.tokens = usage.completion_tokens
            details = getattr(usage, "prompt_tokens_details", None)
            req.cached = int(getattr(details, "cached_tokens", 0) or 0)
    req.tokens = req.tokens or chunks
    req.ok = req.first is not None and (req.finish is not None or not o.require_finish)
    if req.first is None:
        req.error = "the stream ended without any text (through a proxy: the node it chose did not answer)"
    elif not req.ok:
        req.error = f"cut off after {chunks} pieces: the stream ended without a finish_reason"


async def _one(client, o: _Opts, req: _Req) -> None:
    req.start = time.perf_counter()
    try:
        while True:
            req.error = None
            try:
                await _attempt(client, o, req)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                req.error = f"{type(err).__name__}: {str(err)[:200]}"
            # retry only what produced no text at all (a half-streamed reply cannot be taken back)
            if req.ok or req.first is not None or req.retries >= o.retries:
                break
            req.errors.append(req.error or "?")
            req.retries += 1
            await asyncio.sleep(0.05 * req.retries)
    except asyncio.CancelledError:
        req.error = "cancelled: the time limit was reached"
        raise
    finally:
        req.end = time.perf_counter()


async def _run(url: str, key: str, o: _Opts, concurrency: int, n: int, time_limit: float) -> tuple[list[_Req], float]:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=time_limit) as http:
        client = openai.AsyncOpenAI(base_url=url, api_key=key, http_client=http, max_retries=0)
        reqs = [_Req() for _ in range(n)]
        sem = asyncio.Semaphore(concurrency)

        async def bounded(r: _Req) -> None:
            async with sem:
                await _one(client, o, r)

        start = time.perf_counter()
        tasks = [asyncio.create_task(bounded(r)) for r in reqs]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    for r in reqs:
        if not r.ok and r.error is None:
            r.error = "not started: the time limit was reached"
        r.t0 = start  # type: ignore[attr-defined]
    return reqs, wall


def _in_thread(coro_fn, *args) -> Any:
    """Run an asyncio coroutine function in a fresh event loop on its own thread (Jupyter-safe)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro_fn(*args))
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    t = threading.Thread(target=target, name="labkit-loadtest", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q)) * 1000.0


def _tpot(r: _Req) -> float | None:
    """Seconds per output token after the first, of one finished request (None with fewer than 2 tokens)."""
    return (r.end - r.first) / (r.tokens - 1) if r.ok and r.first is not None and r.tokens > 1 else None


def records(reqs: list[_Req]):
    """One row per request: start s (from the test's start), TTFT ms, latency ms, TPOT ms, tokens, cached prompt
    tokens, finish reason, retries, ok, error."""
    import pandas as pd

    rows = [{"start s": round(r.start - r.t0, 3) if r.start else None,  # type: ignore[attr-defined]
             "TTFT ms": (r.first - r.start) * 1000 if r.first else None,
             "latency ms": (r.end - r.start) * 1000 if r.start else None,
             "TPOT ms": _tpot(r) * 1000 if _tpot(r) is not None else None, "tokens": r.tokens,
             "cached tokens": r.cached, "finish": r.finish, "retries": r.retries, "ok": r.ok,
             "error": r.error or ("; ".join(r.errors) if r.errors else None)} for r in reqs]
    return pd.DataFrame(rows)


def run(server: Any, concurrency: int = 8, requests: int | None = None, max_tokens: int = 128,
        prompt: str = DEFAULT_PROMPT, model: str | None = None, time_limit: float = 120.0,
        system: str | None = None, retries: int = 0, require_finish: bool = False, detail: bool = False,
        extended: bool = False):
    """`requests` streaming chat requests, `concurrency` at a time, stopped after `time_limit` s; one row
    (with detail=True: (row, one row per request)). `retries`: tries again what got no text at all;
    `extended`: lab 07's columns too (latency, TPOT, tokens per request...), as detail, retries, system and
    require_finish do."""
    url, key, default_model = _target(server)
    model = model or default_model
    if not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise LoadTestError(f"concurrency must be a whole number in 1..{MAX_CONCURRENCY}, not {concurrency!r}")
    requests = requests if requests is not None else max(8, 2 * concurrency)
    if not isinstance(requests, int) or not 1 <= requests <= MAX_REQUESTS:
        raise LoadTestError(f"requests must be a whole number in 1..{MAX_REQUESTS}, not {requests!r}")
    if not 0 < time_limit <= MAX_SECONDS:
        raise LoadTestError(f"time_limit must be in (0, {MAX_SECONDS:.0f}] seconds, not {time_limit!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise LoadTestError(f"max_tokens must be a whole number >= 1, not {max_tokens!r}")
    if not isinstance(retries, int) or not 0 <= retries <= 10:
        raise LoadTestError(f"retries must be a whole number in 0..10, not {retries!r}")
    if getattr(server, "stopped", False):
        raise LoadTestError(f"server {getattr(server, 'name', '')!r} is stopped: start it again (labkit.serve.Server)")
    if model is None:
        try:
            names = list_models(server)
        except Exception as err:  # nothing listens, or it is not an OpenAI server: one line, not a traceback
            raise LoadTestError(f"no server answers at {url}/models ({type(err).__name__}): start it "
                                f"(labkit.serve.Server) or fix the URL") from None
        if not names:
            raise LoadTestError(f"the server at {url} lists no model: pass model=...")
        model = names[0]
    opts = _Opts(model, prompt, max_tokens, system, retries, require_finish)
    reqs, wall = _in_thread(_run, url, key, opts, concurrency, requests, time_limit)
    ok = [r for r in reqs if r.ok]
    ttft = [r.first - r.start for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in reqs if not r.ok]
    latency = [r.end - r.start for r in ok]
    tpot = [t for t in map(_tpot, ok) if t is not None]
    row = {"concurrency": concurrency, "requests": requests, "ok": len(ok), "failed": len(errors),
           "seconds": round(wall, 2), "requests/s": round(len(ok) / wall, 2) if wall else 0.0,
           "output tokens/s": round(tokens / wall, 1) if wall else 0.0,
           "TTFT p50 ms": _pct(ttft, 50), "TTFT p90 ms": _pct(ttft, 90), "TTFT p99 ms": _pct(ttft, 99),
           "ITL p50 ms": _pct(gaps, 50), "ITL p90 ms": _pct(gaps, 90), "ITL p99 ms": _pct(gaps, 99),
           "first error": errors[0] if errors else None}
    if extended or detail or retries or system or require_finish:  # lab 07's columns; lab 02's table stays as it was
        row.update({"latency p50 ms": _pct(latency, 50), "latency p90 ms": _pct(latency, 90),
                    "latency p99 ms": _pct(latency, 99), "TPOT p50 ms": _pct(tpot, 50), "TPOT p90 ms": _pct(tpot, 90),
                    "tokens per request": round(tokens / len(ok), 1) if ok else None,
                    "retries": sum(r.retries for r in reqs),
                    "cached prompt tokens": sum(r.cached for r in ok)})
    return (row, records(reqs)) if detail else row


def sweep(server: Any, concurrency: tuple[int, ...] | list[int] = (1, 8, 32), requests: int | None = None,
          max_tokens: int = 128, prompt: str = DEFAULT_PROMPT, model: str | None = None,
          time_limit: float = 120.0, warmup: bool = True):
    """`run` at each concurrency level (after one warm-up request); a pandas table, one row per level."""
    import pandas as pd

    _target(server)  # refuse other hosts before anything is sent
    if warmup:
        run(server, concurrency=1, requests=1, max_tokens=8, prompt=prompt, model=model, time_limit=time_limit)
    rows = [run(server, c, requests, max_tokens, prompt, model, time_limit) for c in concurrency]
    table = pd.DataFrame(rows)
    num = [c for c in table.columns if c.endswith(" ms")]
    table[num] = table[num].astype(float).round(1)
    return table


def plot(table) -> None:
    """Throughput and latency against concurrency, side by side."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    x = table["concurrency"].astype(str)
    a.bar(x, table["output tokens/s"], color="tab:blue")
    a.set_xlabel("concurrent requests")
    a.set_ylabel("output tokens/s (all requests)")
    a.set_title("throughput")
    for col, style in (("TTFT p50 ms", "o-"), ("TTFT p99 ms", "o--"), ("ITL p50 ms", "s-"), ("ITL p99 ms", "s--")):
        b.plot(x, table[col], style, label=col)
    b.set_xlabel("concurrent requests")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.set_title("latency: time to first token, inter-token")
    b.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
