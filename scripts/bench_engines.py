"""bf16 vs AWQ W4A16 on TurboMind and on LMDeploy's PyTorch engine, side by side in one run: output tokens/s
at batch 1 and 32 (warm-up, median of repeats), engine start time and GPU memory after load, on
generated:bench-1.5b by default. Lab 03's claim (4-bit decodes faster on TurboMind) measured. Writes a
markdown section for docs/benchmarks.md.

usage: python scripts/bench_engines.py --out $OUT/bench-engines.md        # about 4 minutes on an H200
       scripts/gpu-suite.sh --bench                                        # the same on the offline runner
       python scripts/bench_engines.py --from-file bench-engines.md --append docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing labkit
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import write_section  # noqa: E402

from labkit.cli import run_script  # noqa: E402

BEGIN, END = "<!-- bench_engines: begin -->", "<!-- bench_engines: end -->"
ENGINES = ("turbomind", "pytorch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="generated:bench-1.5b", help="model name, folder or generated:NAME")
    p.add_argument("--backends", nargs="+", default=list(ENGINES), choices=ENGINES, help="engines to compare")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-ratio", type=float, default=0.05,
                   help="cache_max_entry_count (small: memory after load is then mostly weights + runtime)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--out", type=Path, help="write the markdown section here")
    p.add_argument("--append", type=Path, help="put the section into this file (replacing an earlier one)")
    p.add_argument("--from-file", type=Path, help="measure nothing: put this earlier --out file into --append")
    args = p.parse_args(argv)
    if args.from_file:
        if not args.append:
            p.error("--from-file needs --append FILE")
        write_section(args.append, args.from_file.read_text(encoding="utf-8"), BEGIN, END)
        print(f"section from {args.from_file} written to {args.append}")
        return 0

    from labkit import bench, kvcache, models, quant
    from labkit.engine import TURBOMIND_HOWTO, Engine, turbomind_missing
    from labkit.gpu import require_gpu

    start = time.perf_counter()
    stamp = lambda what: print(f"[{time.perf_counter() - start:5.0f} s] {what}", flush=True)  # noqa: E731
    ratio = kvcache.check_ratio(args.cache_ratio, "pytorch")
    sizes = dict(batch_sizes=bench.check_sizes(args.batches, args.prompt_tokens, args.new_tokens, args.warmup,
                                               args.repeats),
                 prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=args.warmup,
                 repeats=args.repeats)
    gpu = require_gpu(what="the engine benchmark")
    stamp(f"GPU: {gpu.name} ({gpu.total_gib:.0f} GiB), driver {gpu.driver}")
    skipped = {}
    if "turbomind" in args.backends and turbomind_missing():
        skipped["turbomind"] = f"TurboMind cannot load here: missing {', '.join(turbomind_missing())}"
        print(f"{skipped['turbomind']}; get them with {TURBOMIND_HOWTO}. Measuring the PyTorch engine only.")
    model_dir = models.resolve(args.model)
    stamp(f"model {model_dir}")
    awq_dir = quant.awq(model_dir, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
    stamp(f"AWQ {awq_dir.name} ({quant.info(awq_dir)['seconds']} s when made)")

    rows = []
    for backend in args.backends:
        for weights, folder in (("bf16", model_dir), ("AWQ W4A16", awq_dir)):
            row = {"engine": backend, "weights": weights, "disk GiB": round(quant.disk_size(folder) / 2**30, 2)}
            if backend in skipped:
                rows.append({**row, "note": skipped[backend]})
                continue
            try:
                with Engine(folder, backend=backend, cache_ratio=ratio, name="bench-engines") as eng:
                    stamp(f"{backend} {weights}: engine up in {eng.start_seconds:.1f} s ({eng.backend})")
                    table = bench.measure(eng, **sizes)
                row.update({"engine": eng.backend, "start s": round(eng.start_seconds, 1),
                            "GPU memory GiB": round(eng.memory_gib, 2)})
                if eng.backend != backend:
                    row["note"] = eng.backend_reason
                for _, r in table.iterrows():
                    row[f"tok/s batch {r['batch']}"] = round(float(r["output tok/s"]), 1)
            except Exception as err:  # one engine failing must not lose the others' figures
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            stamp(f"{row}")

    import pandas as pd

    table = pd.DataFrame(rows)
    for b in args.batches:
        col = f"tok/s batch {b}"
        if col not in table:
            continue
        base = table[table["weights"] == "bf16"].set_index("engine")[col]
        table[f"W4A16 / bf16 batch {b}"] = [
            round(r[col] / base[r["engine"]], 2) if r["weights"] != "bf16" and r["engine"] in base
            and pd.notna(r[col]) and pd.notna(base[r["engine"]]) else None for _, r in table.iterrows()]
    print(table.to_string(index=False))

    header, command = bench.report_header(
        "scripts/bench_engines.py", argv, gpu.name, args.model, model_dir,
        f"TurboMind and the PyTorch engine (CUDA graphs), cache_max_entry_count {ratio}; prompt "
        f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens (ignore_eos), warm-up {args.warmup}, median of "
        f"{args.repeats}; AWQ w4 g128 from {args.calib_samples} x {args.calib_seqlen} calibration tokens",
        time.perf_counter() - start)
    lines = [BEGIN, "## Engines: TurboMind vs the PyTorch engine, bf16 vs AWQ W4A16 (lab 03)", "", header, "",
             "GPU memory is what each engine took when it started (NVML): weights, runtime buffers and a KV cache "
             f"of {ratio} of the free memory. Start time includes loading the weights (and, for the PyTorch engine, "
             "capturing CUDA graphs). Random weights: speed and memory are real, the text is not.", "",
             bench.markdown(table), "", "Command:", "", "```bash", command, "```", END, ""]
    text = bench.report("\n".join(lines), args.out)
    if args.append:
        write_section(args.append, text, BEGIN, END)
        print(f"section written to {args.append}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
