"""Lab 01's speed comparison from the command line: transformers vs LMDeploy on the same model and
GPU, in one process, one engine alive at a time. Writes a markdown section for docs/benchmarks.md.

usage: python scripts/bench_chat.py --model generated:bench-1.5b --batches 1 32 --new-tokens 256 \
           --repeats 3 --out bench-01.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing labkit
from labkit import benchdoc
from labkit.cli import run_script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="generated:bench-1.5b", help="model name, folder or generated:NAME")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=["auto", "turbomind", "pytorch"])
    p.add_argument("--cache-ratio", type=float, default=0.8, help="lmdeploy cache_max_entry_count")
    p.add_argument("--no-overhead", action="store_true", help="skip the labkit-vs-raw-lmdeploy overhead check")
    p.add_argument("--out", type=Path, help="write the markdown section here")
    args = p.parse_args(argv)

    from labkit import bench, models
    from labkit.baseline import HFEngine
    from labkit.engine import Engine
    from labkit.gpu import require_gpu

    gpu = require_gpu(what="the speed comparison")
    print(f"GPU: {gpu.name} ({gpu.total_gib:.0f} GiB), driver {gpu.driver}", flush=True)
    bench.check_sizes(args.batches, args.prompt_tokens, args.new_tokens, args.warmup, args.repeats)
    model_dir = models.resolve(args.model)
    sizes = dict(batch_sizes=tuple(args.batches), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                 warmup=args.warmup, repeats=args.repeats)
    start = time.perf_counter()

    import json

    quant = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    hf_table = None
    if quant.get("quant_method") == "awq":  # transformers needs an extra GPU package (gptqmodel) for these files
        print(f"transformers baseline skipped: {model_dir.name} is an AWQ model, which transformers cannot load "
              f"without gptqmodel; measuring LMDeploy only (bench_engines.py compares it with bf16)", flush=True)
    else:
        with HFEngine(model_dir) as hf:  # closed (GPU memory freed) before lmdeploy starts
            print("transformers:", hf.describe(), flush=True)
            hf_table = bench.measure(hf, **sizes)
        print(hf_table.to_string(index=False), flush=True)

    with Engine(model_dir, backend=args.backend, cache_ratio=args.cache_ratio, name="bench") as eng:
        print("lmdeploy:", eng.describe(), flush=True)
        lmd_table = bench.measure(eng, **sizes)
        print(lmd_table.to_string(index=False), flush=True)
        over = None if args.no_overhead else bench.overhead(eng)
    tables = (lmd_table,) if hf_table is None else (hf_table, lmd_table)
    roof = bench.roofline(model_dir, tables) if 1 in args.batches else None
    table = lmd_table if hf_table is None else bench.compare(hf_table, lmd_table)
    print(table.to_string(index=False))

    header, command = benchdoc.report_header(
        "scripts/bench_chat.py", argv, gpu.name, args.model, model_dir,
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (ignore_eos), warm-up {args.warmup}, "
        f"median of {args.repeats}; " + ("" if hf_table is None else "transformers `generate` (bf16) vs ")
        + f"LMDeploy's {lmd_table['engine'].iloc[0].split()[-1]} engine", time.perf_counter() - start)
    lines = [header, "", benchdoc.markdown(table.rename(columns=lambda c: c.replace("TTFT ms", "TTFT ms (median)"))), ""]
    if roof is not None:
        lines += [f"Batch-1 decode roofline: {roof.attrs['bandwidth_GBps']:,.0f} GB/s measured bandwidth / "
                  f"{roof.attrs['weights_GB']:.2f} GB of weights = {roof['roofline tok/s'].iloc[0]:,.0f} tokens/s; "
                  + "; ".join(f"{r['engine']} reaches {r['fraction of roofline']:.1%}" for _, r in roof.iterrows())
                  + ".", ""]
    if over is not None:
        lines += [f"labkit overhead over the raw lmdeploy pipeline call (same engine, {over['pairs']} pairs of calls, "
                  f"batch {over['batch']}): {over['overhead %']:+.2f} % (median; noise bound +/-"
                  f"{over['noise bound %']:.2f} %, IQR of the pairs {over['noise % (IQR of pairs)']:.2f} %), of which "
                  f"labkit's own work "
                  f"{over['labkit work per call µs']:.0f} µs per call = {over['labkit work %']:.3f} %.", ""]
    lines += ["Command:", "", "```bash", command, "```", ""]
    benchdoc.report("\n".join(lines), args.out)
    return 0



if __name__ == "__main__":
    sys.exit(run_script(main))
