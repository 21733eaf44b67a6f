"""Prometheus metrics of lmdeploy's api_server (`/metrics`, on by default in 0.18), scraped and parsed (lab 07).

Names (lmdeploy/metrics/loggers.py): gauges `lmdeploy:num_requests_running`, `lmdeploy:num_requests_waiting`,
`lmdeploy:gpu_cache_usage_perc` (KV cache in use, 1 = full) and `lmdeploy:prefix_cache_hit_rate` are set
from the engine's scheduler every 10 s (the server's log interval); counters such as
`lmdeploy:generation_tokens_total`, `lmdeploy:cached_tokens_total` and the per-request histograms
(`lmdeploy:request_prompt_tokens`, `lmdeploy:time_to_first_token_seconds`) move with every request.
Parsing is prometheus_client's own parser (an lmdeploy dependency).
"""
from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any
from labkit.errors import LabkitError

RUNNING = "lmdeploy:num_requests_running"
WAITING = "lmdeploy:num_requests_waiting"
KV_USAGE = "lmdeploy:gpu_cache_usage_perc"
PREFIX_HIT_RATE = "lmdeploy:prefix_cache_hit_rate"
GEN_TOKENS = "lmdeploy:generation_tokens_total"
CACHED_TOKENS = "lmdeploy:cached_tokens_total"
PROMPT_TOKENS_SUM = "lmdeploy:request_prompt_tokens_sum"  # prompt tokens of finished requests
FINISHED = "lmdeploy:request_prompt_tokens_count"         # finished requests
SCHEDULER_INTERVAL_S = 10.0  # lmdeploy updates the scheduler gauges this often
SERIES = {"running": RUNNING, "waiting": WAITING, "KV cache used": KV_USAGE, "generated tokens": GEN_TOKENS}


class MetricsError(LabkitError, RuntimeError):
    """The metrics could not be read or parsed; the message says what to check."""


def _url(target: Any) -> str:
    base = getattr(target, "base_url", None) or str(target).rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + "/metrics"


def fetch(target: Any, timeout: float = 5.0) -> str:
    """The Prometheus text of a server's /metrics (a labkit Server or an http://host:port URL)."""
    url = _url(target)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")
    except OSError as err:
        raise MetricsError(f"could not read {url}: {err}; is the server up, and was it started without "
                           f"--disable-metrics?") from None


def parse(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (engines, finish reasons), from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    except ValueError as err:
        raise MetricsError(f"not Prometheus text ({err}): is this URL an lmdeploy api_server's /metrics?") from None
    return out


def scrape(target: Any, timeout: float = 5.0) -> dict[str, float]:
    """fetch + parse: the current values of a server's metrics."""
    return parse(fetch(target, timeout))


def lmdeploy_names(values: dict[str, float]) -> list[str]:
    """The lmdeploy metrics among the values (sorted)."""
    return sorted(n for n in values if n.startswith("lmdeploy:"))


def prefix_hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Share of prompt tokens served from the prefix cache between two scrapes (cached / prompt tokens of the
    requests that finished in between); None if none finished."""
    prompt = after.get(PROMPT_TOKENS_SUM, 0.0) - before.get(PROMPT_TOKENS_SUM, 0.0)
    if prompt <= 0:
        return None
    return (after.get(CACHED_TOKENS, 0.0) - before.get(CACHED_TOKENS, 0.0)) / prompt


class Sampler:
    """Scrapes /metrics of several servers every `interval` s in a thread, while something else runs.

        with labkit.metrics.Sampler(group.servers) as sampler:
            labkit.loadtest.run(group.proxy(), ...)
        sampler.table()   # one row per (time, server)
    """

    def __init__(self, targets: list[Any], interval: float = 0.5):
        if not targets:
            raise MetricsError("Sampler needs at least one server to scrape")
        if not 0.05 <= interval <= 60:
            raise MetricsError(f"interval must be between 0.05 and 60 s, not {interval!r}")
        self.targets, self.interval = list(targets), interval
        self.rows: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.time()

    def _name(self, target: Any) -> str:
        return getattr(target, "name", None) or _url(target)

    def _loop(self) -> None:
        while True:
            now = time.time()
            for t in self.targets:
                try:
                    values = scrape(t, timeout=max(self.interval, 1.0))
                except MetricsError as err:  # a killed server: noted, the others go on
                    self.errors.append(f"{now - self.t0:.1f} s {self._name(t)}: {err}")
                    continue
                row = {"t s": round(now - self.t0, 3), "server": self._name(t)}
                row.update({label: values.get(name) for label, name in SERIES.items()})
                self.rows.append(row)
            if self._stop.wait(self.interval):
                return

    def start(self) -> "Sampler":
        """Start scraping (time 0 is now)."""
        self.t0 = time.time()
        self._thread = threading.Thread(target=self._loop, name="labkit-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop scraping (one last scrape has been taken)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def table(self):
        """The samples as a pandas table: t s, server, running, waiting, KV cache used, generated tokens,
        generated tokens/s (from the counter's rise between samples)."""
        import pandas as pd

        table = pd.DataFrame(self.rows, columns=["t s", "server", *SERIES])
        if table.empty:
            return table.assign(**{"generated tokens/s": []})
        table = table.sort_values(["server", "t s"])
        rise = table.groupby("server")["generated tokens"].diff()
        dt = table.groupby("server")["t s"].diff()
        table["generated tokens/s"] = (rise / dt).round(1)
        return table.sort_values(["t s", "server"]).reset_index(drop=True)
