"""Test-suite glue for labkit's tests and the notebooks (nbval).

- Tests run on generated models and the small `test` profile unless the environment says otherwise.
- Cells tagged `gpu` and tests marked `gpu` are skipped, visibly, where CUDA is missing.
- Every run ends with a per-file summary (pass / skip / fail, wall time, peak GPU memory);
  with LABKIT_REPORT_DIR set, the summary and the executed notebooks are written there.
"""
from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

os.environ.setdefault("LABKIT_PROFILE", "test")
# The labs run on the model labkit trained (its quality checks mean something); tests that need random
# weights name generated:tiny-chat themselves.
os.environ.setdefault("LABKIT_MODEL", "trained:tiny-chat")
os.environ.setdefault("LABKIT_MODEL_VISION", "generated:tiny-vl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# lmdeploy torch.compile()s a few functions (RMSNorm; InternVL's vision encoder with max-autotune), which
# costs every engine start tens of seconds of compiling. Tests check behaviour, not speed: run them eager.
# Students' notebooks and the benchmark scripts keep compiling.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
# Every engine / server backend labkit picks is logged there (labkit.engine.choose_backend), so the summary
# names the engine that ran each file.
if os.environ.get("LABKIT_REPORT_DIR"):
    os.environ.setdefault("LABKIT_ENGINE_LOG", str(Path(os.environ["LABKIT_REPORT_DIR"]) / "engines.jsonl"))

GPU_SKIP = "needs a CUDA GPU: found none (gpu cell / gpu test)"
_stats: dict[str, dict] = defaultdict(lambda: {"passed": 0, "skipped": 0, "failed": 0, "seconds": 0.0,
                                               "peak_gpu_mib": None, "left": []})
_current = {"key": None}
_notebooks: dict[str, object] = {}
_ran: dict[str, int] = defaultdict(int)


def _nbval_keeps_history() -> None:
    """Run notebook cells as Jupyter does, with IPython's input history (nbval asks for none): labkit's evidence
    then names each record's cell (its number and source hash), and the suite's executed notebooks can be
    graded as a submission (`labkit grade`), which checks those numbers against the cells'."""
    try:
        from nbval.kernel import RunningKernel
    except ImportError:
        return

    def execute_cell_input(self, cell_input, allow_stdin=None):
        return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)

    RunningKernel.execute_cell_input = execute_cell_input


_nbval_keeps_history()


def _cuda() -> bool:
    from labkit.gpu import has_cuda

    return has_cuda()


def _is_gpu_cell(item) -> bool:
    cell = getattr(item, "cell", None)
    return cell is not None and "gpu" in cell.get("metadata", {}).get("tags", [])


def pytest_collection_modifyitems(config, items):
    for item in items:  # `-m "gpu or notebook"` selects what the GPU suite runs
        if getattr(item, "cell", None) is not None:
            item.add_marker(pytest.mark.notebook)
    if _cuda():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP)
    for item in items:
        if _is_gpu_cell(item) or item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _key(item) -> str:
    return item.nodeid.split("::")[0]


class _Sampler(threading.Thread):
    """Peak GPU memory (all processes, NVML) per test file while it runs."""

    def __init__(self):
        super().__init__(daemon=True, name="labkit-gpu-sampler")
        self.stop = threading.Event()

    def run(self):
        from labkit.gpu import memory_used

        while not self.stop.wait(0.1):
            key = _current["key"]
            if key is None:
                continue
            mib = memory_used() / 2**20
            prev = _stats[key]["peak_gpu_mib"] or 0
            _stats[key]["peak_gpu_mib"] = max(prev, round(mib))


_sampler: _Sampler | None = None


def pytest_sessionstart(session):
    global _sampler
    log = os.environ.get("LABKIT_ENGINE_LOG")
    if log and os.environ.get("LABKIT_REPORT_DIR") and Path(log).parent == Path(os.environ["LABKIT_REPORT_DIR"]):
        Path(log).unlink(missing_ok=True)  # this run's engines only
    from labkit.gpu import gpus

    if gpus():
        _sampler = _Sampler()
        _sampler.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    key = _key(item)
    _current["key"] = key
    start = time.perf_counter()
    yield
    _stats[key]["seconds"] += time.perf_counter() - start
    if nextitem is None or _key(nextitem) != key:  # the file is done (its fixtures and kernel are gone)
        _stats[key]["left"] = _lmdeploy_left()
    if hasattr(item, "test_outputs") and hasattr(item, "parent") and hasattr(item.parent, "nb"):
        _notebooks[key] = item.parent.nb
        if item.test_outputs is not None:  # the cell ran: its outputs, and its number as the kernel counted it
            item.cell["outputs"] = item.test_outputs
            _ran[key] += 1  # nbval runs the cells in order in one kernel, one execute request each
            item.cell["execution_count"] = _ran[key]


def _lmdeploy_left(grace: float = 10.0) -> list[str]:
    """lmdeploy processes still running after a file (labkit.serve.lmdeploy_processes: lmdeploy command lines
    and registered servers' groups, pytest and its parents excluded), waiting up to `grace` s for them to exit."""
    from labkit.serve import lmdeploy_processes

    deadline = time.monotonic() + grace
    while (left := lmdeploy_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [f"{p['pid']}: {p['cmdline']}" for p in left]


def pytest_runtest_logreport(report):
    key = report.nodeid.split("::")[0]
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = {"passed": "passed", "skipped": "skipped", "failed": "failed"}[report.outcome]
        _stats[key][outcome] += 1
    elif report.when == "teardown" and report.outcome == "failed":
        _stats[key]["failed"] += 1


def _engines() -> dict[str, str]:
    """File -> the backends (and models) labkit chose while it ran, from LABKIT_ENGINE_LOG: by the running
    test's file (a notebook's kernel inherits it from pytest), else by the lab's name."""
    path = os.environ.get("LABKIT_ENGINE_LOG")
    found: dict[str, set] = defaultdict(set)
    try:
        lines = Path(path).read_text().splitlines() if path else []
    except OSError:
        lines = []
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = e.get("test") or (f"notebooks/{e['lab']}.ipynb" if e.get("lab") else None)
        if key:
            found[key].add(f"{e['backend']} ({e['model']})")
    return {k: ", ".join(sorted(v)) for k, v in found.items()}


def _summary_rows() -> list[dict]:
    engines = _engines()
    return [{"file": k, **{f: v for f, v in s.items()}, "engine": engines.get(k, "-")}
            for k, s in sorted(_stats.items())]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _sampler is not None:
        _sampler.stop.set()
    rows = _summary_rows()
    if not rows:
        return
    tr = terminalreporter
    tr.section("LMDeploy Lab summary")
    tr.write_line(f"{'file':<40} {'pass':>5} {'skip':>5} {'fail':>5} {'wall s':>8} {'peak GPU MiB':>13} "
                  f"{'left':>4}  engine")
    for r in rows:
        peak = "-" if r["peak_gpu_mib"] is None else str(r["peak_gpu_mib"])
        tr.write_line(f"{r['file']:<40} {r['passed']:>5} {r['skipped']:>5} {r['failed']:>5} "
                      f"{r['seconds']:>8.1f} {peak:>13} {len(r['left']):>4}  {r['engine']}")
    for r in rows:
        for line in r["left"]:
            tr.write_line(f"left running after {r['file']}: {line}")
    out = os.environ.get("LABKIT_REPORT_DIR")
    if out:
        _write_report(Path(out), rows, exitstatus)
        tr.write_line(f"report written to {out}")


def _write_report(out: Path, rows: list[dict], exitstatus) -> None:
    import nbformat

    from labkit.gpu import gpus

    out.mkdir(parents=True, exist_ok=True)
    found = gpus()
    meta = {"exitstatus": int(exitstatus), "gpu": found[0].name if found else None,
            "profile": os.environ.get("LABKIT_PROFILE"), "model": os.environ.get("LABKIT_MODEL"),
            "backend": os.environ.get("LABKIT_BACKEND", "auto"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "files": rows}, indent=1))
    lines = [f"# GPU suite summary ({meta['gpu'] or 'no GPU'}, backend {meta['backend']}, {meta['time']}, "
             f"exit {meta['exitstatus']})", "",
             "| file | pass | skip | fail | wall s | peak GPU MiB | processes left | engine (model) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['passed']} | {r['skipped']} | {r['failed']} | {r['seconds']:.1f} | "
              f"{r['peak_gpu_mib'] if r['peak_gpu_mib'] is not None else '-'} | {len(r['left'])} | {r['engine']} |"
              for r in rows]
    lines += [f"- left running after {r['file']}: `{line}`" for r in rows for line in r["left"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if _notebooks:
        with zipfile.ZipFile(out / "executed-notebooks.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for key, nb in _notebooks.items():
                zf.writestr(Path(key).name, nbformat.writes(nb))
