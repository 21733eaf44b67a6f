"""GPU facts and memory probes through NVIDIA's management library (nvidia-ml-py / pynvml).

Used by every lab: the doctor (00), memory before/after an engine (01-05), the peak-memory
column of the GPU suite's summary.
"""
from __future__ import annotations

import functools
import threading
import time
from dataclasses import asdict, dataclass
from labkit.errors import LabkitError

GiB = 1024**3
NO_GPU_HINT = "needs a CUDA GPU: found none; see 00_setup"


class NoGPUError(LabkitError, RuntimeError):
    """Raised where a step needs a CUDA GPU and there is none (or it is too small)."""


@dataclass
class GpuInfo:
    """One GPU as NVML sees it."""

    index: int
    name: str
    total_gib: float
    used_gib: float
    free_gib: float
    driver: str
    cuda_driver: str
    compute_capability: str

    def as_dict(self) -> dict:
        """Plain dict, for tables and evidence."""
        return asdict(self)


_NVML_ERROR: dict[str, BaseException | None] = {"error": None}


@functools.lru_cache(maxsize=1)
def _nvml():
    """The initialised pynvml module, or None when NVML cannot start (no driver, or a broken one)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as err:
        _NVML_ERROR["error"] = err
        return None


MISMATCH = ("NVIDIA driver/library version mismatch (NVML: {err}): the driver was updated but the running "
            "kernel module is the old one; reboot the machine (or reload the nvidia kernel module), then "
            "check `nvidia-smi`")


def explain_nvml_error(err: BaseException | None) -> str | None:
    """What an NVML start-up error means for the lab, one line; None for 'no NVIDIA driver / library here'."""
    if err is None:
        return None
    name, text = type(err).__name__, str(err)
    if "Mismatch" in name or "mismatch" in text.lower() or getattr(err, "value", None) == 18:
        return MISMATCH.format(err=text)
    if "LibraryNotFound" in name or "DriverNotLoaded" in name or "not found" in text.lower():
        return None  # simply no NVIDIA driver here
    return f"NVML could not start ({name}: {text}): check `nvidia-smi`"


def nvml_problem() -> str | None:
    """Why NVML sees no GPU although a driver is installed (e.g. a driver/library version mismatch), or None."""
    _nvml()
    return explain_nvml_error(_NVML_ERROR["error"])


def gpus() -> list[GpuInfo]:
    """Every GPU NVML can see (an empty list on a machine without an NVIDIA driver)."""
    nv = _nvml()
    if nv is None:
        return []
    driver = _text(nv.nvmlSystemGetDriverVersion())
    cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
        out.append(GpuInfo(i, _text(nv.nvmlDeviceGetName(h)), round(mem.total / GiB, 2),
                           round(mem.used / GiB, 2), round(mem.free / GiB, 2), driver,
                           f"{cuda // 1000}.{cuda % 1000 // 10}", f"{major}.{minor}"))
    return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def memory_used(index: int = 0) -> int:
    """Bytes in use on GPU `index`, all processes together (what nvidia-smi shows)."""
    nv = _nvml()
    if nv is None:
        raise NoGPUError(NO_GPU_HINT)
    return nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(index)).used


def memory_free(index: int = 0) -> int:
    """Bytes free on GPU `index`."""
    nv = _nvml()
    if nv is None:
        raise NoGPUError(NO_GPU_HINT)
    return nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(index)).free


def memory_used_or_none(index: int = 0) -> int | None:
    """Bytes in use on GPU `index`, or None on a machine without an NVIDIA driver."""
    return memory_used(index) if _nvml() is not None else None


def process_memory(pids: set[int]) -> int | None:
    """Bytes of GPU memory that processes `pids` hold on any GPU; None where NVML cannot attribute it
    (no driver, or process ids that NVML reports from another PID namespace)."""
    nv = _nvml()
    if nv is None:
        return None
    total, seen = 0, False
    for i in range(nv.nvmlDeviceGetCount()):
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(i))
        except Exception:
            return None
        for p in procs:
            if p.pid in pids and p.usedGpuMemory is not None:
                total += p.usedGpuMemory
                seen = True
    return total if seen else None


def has_cuda() -> bool:
    """True when an NVIDIA GPU is visible and torch can use it (what lmdeploy needs)."""
    if not gpus():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def require_gpu(min_free_gib: float = 0.0, what: str = "this step") -> GpuInfo:
    """The first GPU, or a NoGPUError that says what is missing and what to do."""
    found = gpus()
    if not found and nvml_problem():
        raise NoGPUError(f"{what} needs a CUDA GPU, and NVML cannot start: {nvml_problem()}")
    if not found or not has_cuda():
        raise NoGPUError(f"{what} {NO_GPU_HINT}")
    gpu = found[0]
    if gpu.free_gib < min_free_gib:
        raise NoGPUError(
            f"{what} needs about {min_free_gib:.1f} GiB free on the GPU, but {gpu.name} has "
            f"{gpu.free_gib:.1f} GiB free of {gpu.total_gib:.1f}: stop other engines or servers "
            f"(`labkit servers --stop`), pick a smaller model, or lower the cache ratio")
    return gpu


class MemoryWatcher:
    """Samples GPU memory in a background thread; `peak` and `baseline` are in bytes.

    with MemoryWatcher() as w: ...   ->  w.peak - w.baseline is what the block added at its peak
    """

    def __init__(self, index: int = 0, interval: float = 0.05):
        self.index, self.interval = index, interval
        self.baseline = self.peak = self.last = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "MemoryWatcher":
        """Start sampling (no-op without a GPU)."""
        if _nvml() is None:
            return self
        self.baseline = self.peak = self.last = memory_used(self.index)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="labkit-memwatch")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        """Take one sample now and return it."""
        if _nvml() is not None:
            self.last = memory_used(self.index)
            self.peak = max(self.peak, self.last)
        return self.last

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        self.sample()

    def __enter__(self) -> "MemoryWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_memory_release(baseline: int, index: int = 0, slack: int = 256 * 1024**2,
                            timeout: float = 30.0) -> int:
    """Wait until GPU memory is back within `slack` bytes of `baseline`; return the reading."""
    deadline = time.monotonic() + timeout
    used = memory_used(index)
    while used > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.25)
        used = memory_used(index)
    return used


def init_cuda_context(device: str = "cuda") -> None:
    """Create the CUDA context on `device` now (it never goes back), so no engine counts it as its own."""
    import torch

    torch.empty(1, device=device)
