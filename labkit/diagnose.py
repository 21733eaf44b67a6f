"""Why an lmdeploy engine or api_server failed to start, read from its error or log text, with what to do.
Used by labkit.engine (in-process pipelines, labs 01, 03-06) and labkit.serve (api_server, labs 02, 04, 05).
"""
from __future__ import annotations

from pathlib import Path

_CAUSES = [
    (("killed by sigkill",),
     "killed by SIGKILL: out of host memory (the kernel's OOM killer; `dmesg | tail` says so)? killed by hand? "
     "Free host memory or use a smaller model, then start it again"),
    (("killed by sigterm", "killed by sigint", "killed by sighup"),
     "stopped by a signal while loading (`labkit servers --stop`, kill, or the machine shutting down): "
     "start it again"),
    (("out of memory", "outofmemoryerror", "no enough gpu memory", "not enough gpu memory", "cuda error: out of"),
     "out of GPU memory: lower cache_ratio (now {ratio}), use the AWQ model (lab 03) or a smaller one, or stop "
     "other servers and engines (`labkit servers --stop`)"),
    (("address already in use", "errno 98", "error while attempting to bind"),
     "port {port} is busy: another server took it (`labkit servers`); leave port=None for a free one"),
    (("found no nvidia driver", "no cuda gpus are available", "cuda is not available", "torch not compiled with cuda",
      "no cuda-capable device", "cuda driver version is insufficient", "nvidia-smi has failed"),
     "no usable CUDA GPU here: lmdeploy's engines need one (see 00_setup / `labkit doctor`)"),
    (("is not in the parser list",),
     "unknown --tool-call-parser: use one of labkit.tools.PARSERS"),
    (("unrecognized arguments", "error: argument", "invalid choice"),
     "lmdeploy rejected a command-line option: check extra_args against `lmdeploy serve api_server --help`"),
    (("no such file or directory", "does not appear to have a file", "is not a local folder", "repository not found",
      "can't load", "could not locate", "does not exist"),
     "lmdeploy could not read the model in {model_dir}: check the folder (labkit.resolve) or re-download it"),
    (("not supported", "unsupported", "is not registered", "not implemented for", "unknown architecture"),
     "lmdeploy cannot run this model with this backend: try backend='pytorch', or a model from the catalogue"),
]


def diagnose(log_text: str, port: int | None = None, model_dir: Path | str | None = None,
             ratio: float | None = None, unknown: str = "not recognised: read the last lines below") -> str:
    """The likely cause of a failed start, from the server's log text."""
    low = log_text.lower()
    for needles, cause in _CAUSES:
        if any(n in low for n in needles):
            return cause.format(port=port, model_dir=model_dir, ratio=ratio)
    return unknown
