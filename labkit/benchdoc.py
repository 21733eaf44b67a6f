"""Benchmark sections for docs/benchmarks.md: a markdown table, the section's first line and command, printing
and writing a section, putting it into a file in place of an earlier run's (between its begin/end markers),
and the --out / --append / --from-file options every scripts/bench_*.py shares.

    BEGIN, END = labkit.benchdoc.markers("bench_scale")
    labkit.benchdoc.publish(text, args, BEGIN, END)
"""
from __future__ import annotations

import argparse
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of a script's section, e.g. `<!-- bench_scale: begin -->`."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--out, --append and --from-file on a benchmark script's parser."""
    p.add_argument("--out", type=Path, help="write the markdown section here")
    p.add_argument("--append", type=Path, help="put the section into this file (replacing an earlier one)")
    p.add_argument("--from-file", type=Path, help="measure nothing: put this earlier --out file into --append")


def merge_from_file(p: argparse.ArgumentParser, args: argparse.Namespace, begin: str, end: str) -> bool:
    """With --from-file: put that earlier --out file into --append (e.g. a GPU run's file) and return True."""
    if not args.from_file:
        return False
    if not args.append:
        p.error("--from-file needs --append FILE")
    write_section(args.append, args.from_file.read_text(encoding="utf-8"), begin, end)
    print(f"section from {args.from_file} written to {args.append}")
    return True


def publish(text: str, args: argparse.Namespace, begin: str, end: str) -> str:
    """Print the section, write it to --out, and put it into --append where given; return the text."""
    text = report(text, args.out)
    if args.append:
        write_section(args.append, text, begin, end)
        print(f"section written to {args.append}")
    return text


def write_section(path: Path, text: str, begin: str, end: str) -> None:
    """Put `text` (which starts with `begin` and ends with `end`) into `path`, replacing an earlier run's section."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def markdown(table) -> str:
    """A DataFrame as a GitHub markdown table (numbers with thousands separators)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def report_header(script: str, argv: list[str] | None, gpu_name: str, model: str, model_dir: str | Path,
                  setup: str, seconds: float) -> tuple[str, str]:
    """(a benchmark section's first line: GPU, model, setup, versions, time; the command line that ran it)."""
    import shlex
    import sys

    from labkit.evidence import versions

    installed = ", ".join(f"{pkg} {v or '-'}" for pkg, v in versions().items())
    command = " ".join(["python", script, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    line = f"GPU: {gpu_name}; model `{model}` ({Path(model_dir).name}); {setup}; {installed}; {seconds:.0f} s in all."
    return line, command


def report(text: str, out: str | Path | None = None) -> str:
    """Print a benchmark's markdown section and, if `out` is given, write it there; return the text."""
    print("\n" + text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"written to {out}")
    return text
