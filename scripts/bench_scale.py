"""Lab 07 from the command line: one api_server vs two behind `lmdeploy serve proxy` with each routing strategy,
prefix caching off vs on with a long shared system prompt, structured output, the capacity planner's
prediction against the load test, and one server killed mid-test. Writes a markdown section for
docs/benchmarks.md. On one GPU the servers share it; with as many GPUs as servers, each gets its own
(`--tp N`: N GPUs each).

usage: python scripts/bench_scale.py --model generated:bench-1.5b --out $OUT/bench-scale.md   # ~3 min on an H200
       python scripts/bench_scale.py --from-file bench-scale.md --append docs/benchmarks.md   # merge a GPU run's file
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing labkit
from labkit import benchdoc
from labkit.cli import run_script

BEGIN, END = benchdoc.markers("bench_scale")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="generated:bench-1.5b", help="model name, folder or generated:NAME")
    p.add_argument("--backend", default="auto", choices=["auto", "turbomind", "pytorch"])
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--tp", type=int, default=1, help="GPUs per server")
    p.add_argument("--cache-ratio", type=float, default=0.2, help="cache_max_entry_count of each server")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=256, help="requests per load test")
    p.add_argument("--tokens", type=int, default=128, help="reply tokens per request (ignore_eos)")
    p.add_argument("--system-words", type=int, default=2000, help="words of the shared system prompt")
    p.add_argument("--kill-requests", type=int, default=1500, help="requests of the kill test (outlast the heartbeat)")
    p.add_argument("--kill-at", type=float, default=3.0)
    p.add_argument("--forms", type=int, default=4, help="structured-output requests with and without the schema")
    benchdoc.add_output_args(p)
    args = p.parse_args(argv)
    if benchdoc.merge_from_file(p, args, BEGIN, END):  # e.g. the GPU runner wrote --out $OUT/...; merge it here
        return 0

    from labkit import models, proxy, scale, structured
    from labkit.gpu import gpus, require_gpu

    start = time.perf_counter()
    gpu = require_gpu(what="the serving-at-scale benchmark")
    stamp = lambda what: print(f"[{time.perf_counter() - start:5.0f} s] {what}", flush=True)  # noqa: E731
    model_dir = models.resolve(args.model)
    stamp(f"GPU {gpu.name} x {len(gpus())}; model {model_dir}")
    server_args = [[]] + [["--enable-prefix-caching"]] * (args.servers - 1)
    with proxy.Group(args.model, servers=args.servers, strategies=list(proxy.ROUTING_STRATEGIES), tp=args.tp,
                     cache_ratio=args.cache_ratio, backend=args.backend, server_args=server_args,
                     name="bench-scale") as group:
        stamp(f"group up in {group.start_seconds:.0f} s; GPUs per server: {group.devices}")
        procs = group.describe()[["name", "role", "start s", "GPU memory GiB"]]
        load = dict(concurrency=args.concurrency, requests=args.requests, max_tokens=args.tokens)
        results, samples = scale.compare(group, **load)
        stamp("compare done")
        calib = scale.calibrate(group.servers[0], **load)
        planned, cal = scale.planner_check(calib, results, model_dir, reply_tokens=args.tokens,
                                           share_gpu=group.devices[0] is None)
        stamp("planner check done")
        prefix = None
        if args.servers > 1:
            prefix = scale.prefix_cache(group.servers[0], group.servers[-1], scale.long_system_prompt(args.system_words))
            stamp("prefix cache done")
        forms = structured.summary(structured.trials(group.proxy(), n=args.forms))
        stamp(f"structured: {forms}")
        kill = None
        if args.servers > 1:  # with one server, a kill leaves nothing to route to
            kill = scale.kill_test(group, strategy="random", at=args.kill_at, concurrency=args.concurrency,
                                   requests=args.kill_requests, max_tokens=args.tokens)
            stamp("kill test done")
        backend = group.servers[0].backend
    stamp("group stopped")
    import pandas as pd

    cols = ["setup", "ok", "failed", "requests/s", "output tokens/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms",
            "ITL p50 ms", "latency p50 ms", "latency p90 ms", "share per server"]
    kill_lines = ["(one server: no prefix-cache comparison and no kill test; run with --servers 2)", ""]
    if kill is not None:
        kill_row = {k: kill["summary"][k] for k in ("requests", "ok", "failed", "retries", "killed at s",
                                                    "proxy dropped it after s", "heartbeat s")}
        kill_lines = [f"One server SIGKILLed {args.kill_at} s into a load test through the `random` proxy (clients "
                      "retry twice what got no text):", "", benchdoc.markdown(pd.DataFrame([kill_row])), "",
                      benchdoc.markdown(kill["by phase"]), ""]
    prefix_lines = [] if prefix is None else [
        f"Prefix caching: a {args.system_words}-word system prompt shared by every request, one request at a "
        f"time, server 0 without and server {args.servers - 1} with `--enable-prefix-caching`; hit rate from "
        "/metrics (`lmdeploy:cached_tokens_total` over prompt tokens):", "", benchdoc.markdown(prefix), ""]
    header, command = benchdoc.report_header(
        "scripts/bench_scale.py", argv, gpu.name, args.model, model_dir,
        f"{args.servers} api_server(s), tp {args.tp}, backend {backend}, cache_max_entry_count {args.cache_ratio} each, "
        f"GPUs per server {group.devices}; closed loop, {args.concurrency} clients, {args.requests} requests of "
        f"{args.tokens} tokens (ignore_eos)", time.perf_counter() - start)
    lines = [BEGIN, "## Serving at scale: the proxy, routing strategies, prefix caching, the planner (lab 07)", "",
             header, "", "Processes (start seconds overlap: the servers start together):", "",
             benchdoc.markdown(procs), "",
             "One server (direct) against all servers behind `lmdeploy serve proxy`, per routing strategy; "
             "`share per server` from the proxy's log:", "", benchdoc.markdown(results[cols].round(1)), "",
             *prefix_lines,
             f"The planner, fitted to server 0 alone at concurrency 1 and {args.concurrency} "
             f"(time per output token = {1000 * cal.c0:.2f} ms + {1000 * cal.c1:.3f} ms x batch, host part "
             f"{1000 * cal.host_s:.2f} ms; TTFT = {1000 * (cal.ttft_c0 or 0):.1f} ms + {1000 * cal.ttft_c1:.2f} ms x batch), "
             "against the load test:", "", benchdoc.markdown(planned), "",
             f"Structured output ({args.forms} requests with the lab's JSON schema, {args.forms} without): {forms}.", "",
             *kill_lines, "Command:", "", "```bash", command, "```", END, ""]
    benchdoc.publish("\n".join(lines), args, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
