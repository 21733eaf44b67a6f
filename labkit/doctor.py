"""The environment doctor (lab 00, `labkit doctor`): one table of what this machine can run,
and for every failed check the fix. Fast (< 5 s), works offline, never imports torch or lmdeploy.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from labkit import config, models
from labkit.evidence import version
from labkit.gpu import gpus, nvml_problem

OK, WARN, FAIL = "ok", "warn", "fail"
HUB_TIMEOUT = 2.0


@dataclass
class Row:
    """One line of the doctor's table."""

    check: str
    status: str
    value: str
    fix: str = ""


@dataclass(repr=False)
class Report:
    """The doctor's findings; `ready` is False when any check failed."""

    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ready(self) -> bool:
        """True when nothing failed (warnings allowed)."""
        return not self.failures

    @property
    def failures(self) -> list[Row]:
        """The rows whose check failed."""
        return [r for r in self.rows if r.status == FAIL]

    def get(self, check: str) -> Row:
        """The row named `check`."""
        return next(r for r in self.rows if r.check == check)

    def as_dict(self) -> dict:
        """Plain data, for `--json` and evidence."""
        return {"ready": self.ready, "seconds": round(self.seconds, 2), "rows": [asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        w = max(len(r.check) for r in self.rows)
        lines = [f"{'check':<{w}}  status  value"]
        for r in self.rows:
            lines.append(f"{r.check:<{w}}  {r.status:<6}  {r.value}")
            if r.fix and r.status != OK:
                lines.append(f"{'':<{w}}  {'':<6}  fix: {r.fix}")
        lines.append(f"-> {'READY' if self.ready else 'NOT READY'} ({self.seconds:.1f} s)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        import html

        color = {OK: "green", WARN: "darkorange", FAIL: "red"}
        rows = "".join(
            f"<tr><td>{html.escape(r.check)}</td><td style='color:{color[r.status]}'><b>{r.status}</b></td>"
            f"<td style='text-align:left'>{html.escape(r.value)}</td>"
            f"<td style='text-align:left'>{html.escape(r.fix) if r.status != OK else ''}</td></tr>" for r in self.rows)
        verdict = "READY" if self.ready else "NOT READY"
        return (f"<table><tr><th>check</th><th>status</th><th>value</th><th>fix</th></tr>{rows}</table>"
                f"<p><b>{verdict}</b> ({self.seconds:.1f} s)</p>")


def _torch_build() -> tuple[str | None, str | None]:
    """torch's version and the CUDA it was built for, read from torch/version.py (no import)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    ver = re.search(r"__version__\s*=\s*'([^']+)'", text)
    cuda = re.search(r"^cuda\s*(?::\s*[^=]+)?=\s*'([^']+)'", text, re.M)
    return (ver.group(1) if ver else None), (cuda.group(1) if cuda else None)


def _lib_loadable(name: str, search: list[Path]) -> bool:
    for d in search:
        if (d / name).exists():
            return True
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def _turbomind_state(has_gpu: bool, cc: float) -> tuple[bool, str]:
    spec = importlib.util.find_spec("lmdeploy")
    if spec is None:
        return False, "lmdeploy is not installed"
    root = Path(list(spec.submodule_search_locations)[0])
    if not list((root / "turbomind").glob("_turbomind*.so")):
        return False, "this lmdeploy build has no TurboMind binary"
    site = root.parent
    libs = [site / "nvidia" / sub / "lib" for sub in ("cuda_runtime", "cublas")]
    if not _lib_loadable("libcudart.so.12", libs):
        return False, "TurboMind needs the CUDA 12 runtime (libcudart.so.12), not found"
    if not has_gpu:
        return False, "no GPU"
    if cc < 7.0:
        return False, f"compute capability {cc} < 7.0"
    return True, "TurboMind can run"


def _probe(url: str) -> tuple[bool, str]:
    import httpx  # proxy settings honoured: the hubs are on the internet

    start = time.perf_counter()
    try:
        resp = httpx.head(url, timeout=HUB_TIMEOUT, follow_redirects=True)
        return True, f"HTTP {resp.status_code} in {time.perf_counter() - start:.1f} s"  # any answer: reachable
    except Exception as err:  # any failure means the same: not reachable from here
        return False, f"no answer ({type(err).__name__}: {str(err)[:60]})"


def no_gpu_row(problem: str | None) -> Row:
    """The doctor's gpu row when NVML lists no GPU: a broken driver (e.g. a version mismatch) said as such."""
    if problem:
        what, _, fix = problem.partition("; ")
        return Row("gpu", FAIL, what, fix or "check `nvidia-smi`")
    return Row("gpu", FAIL, "no NVIDIA GPU visible (NVML found no driver or device)",
               "run the labs on a machine with an NVIDIA GPU (8 GB+); here only CPU cells run "
               "and %%gpu cells are skipped")


def verdict(report: Report) -> bool:
    """Print READY or NOT READY with the reasons and fixes; return report.ready."""
    if report.ready:
        warns = [r.check for r in report.rows if r.status == WARN]
        print("READY: every lab can run here." + (f" Warnings (fine to go on): {', '.join(warns)}." if warns else ""))
    else:
        print("NOT READY for the GPU labs:")
        for r in report.failures:
            print(f"  - {r.check}: {r.value}\n    fix: {r.fix}")
        print("CPU cells of every lab still run, on a generated model.")
    return report.ready


def hubs() -> dict[str, str]:
    """The model hubs labkit may download from (HF_ENDPOINT honoured)."""
    return {"Hugging Face": models.hf_endpoint(),
            "ModelScope": "https://www.modelscope.cn"}


def doctor(check_hubs: bool = True) -> Report:
    """Check this machine for the labs; returns a Report (printable, a table in a notebook)."""
    start = time.perf_counter()
    hub_results: dict[str, tuple[bool, str]] = {}
    probes = []
    if check_hubs:  # daemon threads: a DNS lookup with no network can block far longer than any socket timeout
        for name, url in hubs().items():
            t = threading.Thread(target=lambda n=name, u=url: hub_results.__setitem__(n, _probe(u)), daemon=True)
            t.start()
            probes.append((name, t))
    rows: list[Row] = []
    py = sys.version_info
    rows.append(Row("python", OK if py >= (3, 10) else FAIL, sys.version.split()[0],
                    "use Python 3.10-3.12 (environment.yml pins 3.11)"))

    found = gpus()
    cc = 0.0
    if found:
        g = found[0]
        cc = float(g.compute_capability)
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        rows.append(Row("gpu", OK if g.total_gib >= 7.5 else WARN,
                        f"{g.name}{more}, {g.total_gib:.1f} GiB total, {g.free_gib:.1f} GiB free, "
                        f"compute {g.compute_capability}",
                        "the 1.8B course model needs ~6 GiB free; use a bigger slice or trained:tiny-chat"))
        rows.append(Row("driver", OK, f"{g.driver} (supports CUDA {g.cuda_driver})"))
    else:
        rows.append(no_gpu_row(nvml_problem()))

    tv, tcuda = _torch_build()
    if tv is None:
        rows.append(Row("torch", FAIL, "not installed", "run `make lab` (it installs the pinned stack)"))
    elif tcuda is None:
        rows.append(Row("torch", WARN if not found else FAIL, f"{tv}, CPU-only build",
                        "install a CUDA build of torch (pip install lmdeploy pulls one)"))
    else:
        usable = bool(found) and float(found[0].cuda_driver) >= float(".".join(tcuda.split(".")[:2]))
        rows.append(Row("torch", OK if usable or not found else FAIL, f"{tv}, built for CUDA {tcuda}",
                        f"the driver supports CUDA {found[0].cuda_driver if found else '?'}: "
                        f"update the driver or install a torch built for an older CUDA"))

    lv = version("lmdeploy")
    rows.append(Row("lmdeploy", OK if lv == "0.18.0" else WARN if lv else FAIL,
                    lv or "not installed",
                    "the labs are written for lmdeploy 0.18.0: run `make lab` to install the pinned stack"))
    tm_ok, tm_why = _turbomind_state(bool(found), cc)
    torch_gpu = bool(found) and tcuda is not None and cc >= 7.0
    rows.append(Row("backend turbomind", OK if tm_ok else WARN, tm_why if not tm_ok else "can run",
                    "fine: labkit falls back to the PyTorch engine" if torch_gpu else
                    "TurboMind needs an NVIDIA GPU with CUDA 12"))
    rows.append(Row("backend pytorch", OK if torch_gpu else FAIL,
                    "can run" if torch_gpu else "cannot run: " + ("no GPU" if not found else
                                                                  "torch has no CUDA" if tcuda is None else
                                                                  f"compute capability {cc} < 7.0"),
                    "lmdeploy's engines need a CUDA GPU; CPU cells of the labs still run"))

    for pkg, want, fix in [("ipywidgets", "8.", "make lab installs ipywidgets 8 (lab 06 needs it)"),
                           ("openai", "2.", "make lab installs openai 2.x (lmdeploy 0.18 needs >= 2.45)"),
                           ("jupyterlab", "4.", "make lab installs JupyterLab 4")]:
        v = version(pkg)
        rows.append(Row(pkg, OK if v and v.startswith(want) else WARN, v or "not installed", fix))

    for label, path in [("disk labkit home", config.home()), ("disk hub cache", models.hub_cache_dir())]:
        probe = path
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 1024**3
        rows.append(Row(label, OK if free >= 10 else WARN if free >= 4 else FAIL,
                        f"{free:.0f} GiB free at {path}",
                        "the course model needs ~4 GiB and its AWQ copy ~2 GiB: free some space or "
                        "set HF_HOME / LABKIT_HOME to a bigger disk"))

    deadline = start + HUB_TIMEOUT + 0.5
    for name, t in probes:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))
        ok, detail = hub_results.get(name, (False, f"no answer within {HUB_TIMEOUT:.0f} s"))
        rows.append(Row(f"hub {name}", OK if ok else WARN, f"{hubs()[name]}: {detail}",
                        "downloads will fail: use the course's shared folder (LABKIT_SHARE), set "
                        "HF_ENDPOINT to a mirror, LABKIT_HUB=modelscope, or LABKIT_MODEL=trained:tiny-chat"))
    return Report(rows, time.perf_counter() - start)
