"""Labs 03 and 04 from the command line: bf16 vs AWQ W4A16 (disk, GPU memory, tokens/s at batch 1 and 32,
perplexity) and KV cache fp16 vs int8 vs int4 (tokens that fit, tokens/s at 32 concurrent requests,
agreement with fp16 KV), one engine alive at a time, four engine starts in all. Writes a markdown
section for docs/benchmarks.md.

usage: python scripts/bench_quant.py --model generated:bench-1.5b --out bench-quant.md
       python scripts/bench_quant.py ... --append docs/benchmarks.md   # replace/append its section there
       python scripts/bench_quant.py --from-file bench-quant.md --append docs/benchmarks.md   # merge a GPU run's file
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing labkit
from labkit.cli import run_script

BEGIN, END = "<!-- bench_quant: begin -->", "<!-- bench_quant: end -->"
PROMPTS = ["Explain what a KV cache stores.", "Write a haiku about memory.", "List three uses of a GPU.",
           "What is quantization, in one sentence?", "Describe the sea to someone who has never seen it.",
           "Give two reasons to serve a model behind an API.", "Summarise the idea of attention.",
           "Why do larger batches raise throughput?"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="generated:bench-1.5b", help="model name, folder or generated:NAME")
    p.add_argument("--cache-ratio", type=float, default=0.4, help="cache_max_entry_count for every engine")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes for bf16 vs AWQ")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent requests for the KV comparison")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared with fp16 KV")
    p.add_argument("--ppl-windows", type=int, default=8, help="512-token windows of held-out text")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    p.add_argument("--backend", default="pytorch", choices=["auto", "turbomind", "pytorch"],
                   help="engine for bf16 vs AWQ (the KV-cache part always runs on the PyTorch engine: its KV blocks "
                        "and labkit's predictor are that engine's); both engines side by side: bench_engines.py")
    p.add_argument("--out", type=Path, help="write the markdown section here")
    p.add_argument("--append", type=Path, help="append the section to this file (replacing an earlier one)")
    p.add_argument("--from-file", type=Path, help="measure nothing: put this earlier --out file into --append")
    args = p.parse_args(argv)
    if args.from_file:  # e.g. the GPU runner wrote --out $OUT/bench-quant.md; merge it here
        if not args.append:
            p.error("--from-file needs --append FILE")
        write_section(args.append, args.from_file.read_text(encoding="utf-8"))
        print(f"section from {args.from_file} written to {args.append}")
        return 0

    from labkit import bench, kvcache, models, quant
    from labkit.engine import Engine
    from labkit.gpu import require_gpu

    start = time.perf_counter()
    ratio = kvcache.check_runs([(args.cache_ratio, 0)])[0][0]  # bad settings fail before anything loads
    bench.check_sizes(tuple(args.batches) + (args.concurrency,), args.prompt_tokens, args.new_tokens, 1, args.repeats)
    gpu = require_gpu(what="the quantization benchmark")
    print(f"GPU: {gpu.name} ({gpu.total_gib:.0f} GiB), driver {gpu.driver}", flush=True)
    model_dir = models.resolve(args.model)
    stamp = lambda what: print(f"[{time.perf_counter() - start:5.0f} s] {what}", flush=True)  # noqa: E731
    stamp(f"model {model_dir}")

    awq_dir = quant.awq(model_dir, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
    awq_info = quant.info(awq_dir)
    stamp(f"AWQ {awq_dir.name} ({awq_info['seconds']} s when made, calibration: {awq_info['calibration']['name']})")

    kv_kw = dict(backend="pytorch", cache_ratio=ratio, eager=args.eager, name="bench-quant")
    engine_kw = {**kv_kw, "backend": args.backend}
    if args.backend != "pytorch":
        print(f"bf16 vs AWQ on backend {args.backend}; the KV-cache part on the PyTorch engine (TurboMind keeps its "
              f"KV blocks in C++, and labkit's predictor is the PyTorch engine's)")
    measure = dict(batch_sizes=tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats,
                   prompt_tokens=args.prompt_tokens, ppl_windows=args.ppl_windows)
    weights_rows, kv_rows, reference = [], [], None
    for label, folder in (("bf16", model_dir), ("AWQ W4A16", awq_dir)):
        predicted = kvcache.predict(folder, ratio, 0) if label == "bf16" else None
        with Engine(folder, **engine_kw) as eng:
            stamp(f"{label} engine up in {eng.start_seconds:.0f} s ({eng.backend}: {eng.backend_reason})")
            row = quant.profile_engine(eng, **measure)
            if label == "bf16" and eng.backend == "pytorch":  # this engine is also the fp16-KV reference
                same_batch = args.concurrency in args.batches
                kv_row, reference = kvcache.measure_engine(
                    eng, PROMPTS, args.concurrency, args.new_tokens, args.repeats, args.agree_tokens, predicted,
                    tok_s=row[f"tok/s batch {args.concurrency}"] if same_batch else None,
                    prompt_tokens=args.prompt_tokens)
                kv_rows.append(kv_row)
        row = {"model": label, "disk MiB": quant.disk_size(folder) / 2**20, **{k: v for k, v in row.items() if k != "model"}}
        weights_rows.append(row)
        stamp(f"{label}: {row}")
    for policy in ((8, 4) if kv_rows else (0, 8, 4)):  # 0 too when the bf16 engine above was not the PyTorch one
        predicted = kvcache.predict(model_dir, ratio, policy)
        with Engine(model_dir, quant_policy=policy, **kv_kw) as eng:
            stamp(f"kv policy {policy} engine up in {eng.start_seconds:.0f} s")
            kv_row, ids = kvcache.measure_engine(eng, PROMPTS, args.concurrency, args.new_tokens, args.repeats,
                                                 args.agree_tokens, predicted, prompt_tokens=args.prompt_tokens)
        kv_rows.append(kv_row)
        stamp(f"kv {policy}: {kv_row}")
        if reference is None:
            reference = ids
            continue
        kv_row["same tokens as fp16 KV %"], kv_row["identical prefix (tokens)"] = kvcache.agreement(reference, ids)
    kv_rows[0]["same tokens as fp16 KV %"], kv_rows[0]["identical prefix (tokens)"] = 100.0, float(args.agree_tokens)

    import pandas as pd

    weights = pd.DataFrame(weights_rows)
    kv = pd.DataFrame(kv_rows)[["kv", "blocks", "tokens that fit", "predicted tokens", "prediction error %",
                                "KV cache GiB", "GPU memory GiB", f"tok/s at {args.concurrency} concurrent",
                                "same tokens as fp16 KV %", "identical prefix (tokens)"]]
    print(weights.to_string(index=False))
    print(kv.to_string(index=False))

    header, command = bench.report_header(
        "scripts/bench_quant.py", argv, gpu.name, args.model, model_dir,
        f"LMDeploy {weights_rows[0].get('engine', args.backend)} engine for bf16 vs AWQ, PyTorch engine for the KV "
        f"cache, cache_max_entry_count {ratio}, {'eager' if args.eager else 'CUDA graphs'}; "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (ignore_eos), warm-up 1, median of "
        f"{args.repeats}", time.perf_counter() - start)
    cal = awq_info["calibration"]
    lines = [BEGIN, "## Quantization: AWQ W4A16 weights and int8 / int4 KV cache (labs 03, 04)", "",
             header, "",
             f"AWQ: w_bits 4, group 128, {args.calib_samples} x {args.calib_seqlen} calibration tokens from "
             f"{cal['name']} ({cal['kind']}), made on {awq_info['device']} in {awq_info['seconds']} s. "
             f"GPU memory is what the engine took (NVML); the KV cache part is read from the engine, the rest is "
             f"weights + runtime buffers. Perplexity: lmdeploy `get_ppl` on labkit/data/heldout.txt "
             f"({args.ppl_windows} windows of 512 tokens; random weights, so only the two models' ratio means "
             f"something).", "",
             bench.markdown(weights.round(2)), "",
             f"KV cache at the same ratio ({ratio}), bf16 weights: blocks of 64 tokens read from the engine, "
             f"labkit's prediction made before each start, tokens/s with {args.concurrency} concurrent requests, "
             f"greedy replies to {len(PROMPTS)} prompts ({args.agree_tokens} tokens) compared position by position "
             f"with fp16 KV.", "",
             bench.markdown(kv.round(2)), "",
             "Command:", "", "```bash", command, "```", END, ""]
    text = bench.report("\n".join(lines), args.out)
    if args.append:
        write_section(args.append, text)
        print(f"section written to {args.append}")
    return 0


def write_section(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Put `text` (which starts with `begin` and ends with `end`) into `path`, replacing an earlier run's section."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")



if __name__ == "__main__":
    sys.exit(run_script(main))
