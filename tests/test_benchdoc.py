"""labkit.benchdoc: every scripts/bench_*.py puts its section into docs/benchmarks.md the same way, in place
of an earlier run's section and without touching the rest of the file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from labkit import benchdoc

ROOT = Path(__file__).resolve().parents[1]


def test_write_section_creates_appends_and_replaces(tmp_path):
    begin, end = benchdoc.markers("bench_x")
    doc = tmp_path / "docs" / "benchmarks.md"
    benchdoc.write_section(doc, f"{begin}\nrun 1\n{end}\n", begin, end)
    assert doc.read_text() == f"{begin}\nrun 1\n{end}\n"  # a new file: the section alone
    doc.write_text(f"# Benchmarks\n\n{begin}\nold\n{end}\n\nafter\n")
    benchdoc.write_section(doc, f"{begin}\nrun 2\n{end}\n", begin, end)
    assert doc.read_text() == f"# Benchmarks\n\n{begin}\nrun 2\n{end}\n\nafter\n"
    other_begin, other_end = benchdoc.markers("bench_y")
    benchdoc.write_section(doc, f"{other_begin}\ny\n{other_end}\n", other_begin, other_end)
    assert doc.read_text().endswith(f"after\n\n{other_begin}\ny\n{other_end}\n") and "run 2" in doc.read_text()


@pytest.mark.parametrize("script", ["bench_engines", "bench_quant", "bench_scale"])
def test_each_bench_script_merges_an_earlier_run_into_its_own_section(tmp_path, script):
    begin, end = benchdoc.markers(script)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{begin}\nrun 0\n{end}\n")
    run = tmp_path / "run.md"
    run.write_text(f"{begin}\nrun 1\n{end}\n")
    done = subprocess.run([sys.executable, f"scripts/{script}.py", "--from-file", str(run), "--append", str(doc)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert doc.read_text() == f"# Benchmarks\n\n{begin}\nrun 1\n{end}\n"
    done = subprocess.run([sys.executable, f"scripts/{script}.py", "--from-file", str(run)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--from-file needs --append FILE" in done.stderr
