"""Which LMDeploy backend runs a model: TurboMind where it can (its binary, its CUDA 12 libraries, the
model's architecture), else the PyTorch engine; the LABKIT_BACKEND override; the architecture and
remote-code checks made before anything loads. labkit.engine, labkit.serve and the
playground use it; labkit.engine re-exports its public names.

    backend, why = labkit.backends.choose_backend(model_dir)
"""
from __future__ import annotations

from pathlib import Path

from labkit import kvcache
from labkit.errors import EngineError

BACKENDS = ("auto", "turbomind", "pytorch")


def check_backend(backend: str) -> str:
    """The backend name itself, or an EngineError listing the valid ones."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)} "
                          f"('auto' picks TurboMind where it can run, else the PyTorch engine)")
    return backend


# What TurboMind's binary links besides the GPU driver (lmdeploy's wheel pulls them in with pip).
TURBOMIND_LIBS = ("libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12")
TURBOMIND_HOWTO = ("`pip install nvidia-cuda-runtime-cu12 nvidia-cublas-cu12` (what `pip install lmdeploy` brings); "
                   "on the offline GPU runner: `make turbomind-chunks`, then scripts/gpu-suite.sh --backend turbomind")


def turbomind_missing() -> list[str]:
    """What TurboMind lacks to load here: its binary or CUDA 12 libraries (empty when nothing is missing)."""
    import importlib.util

    from labkit.doctor import _lib_loadable

    spec = importlib.util.find_spec("lmdeploy")
    if spec is None:
        return ["lmdeploy"]
    root = Path(list(spec.submodule_search_locations)[0])
    if not list((root / "turbomind").glob("_turbomind*.so")):
        return ["lmdeploy/turbomind/_turbomind*.so (this lmdeploy build has no TurboMind binary)"]
    search = [root.parent / "nvidia" / sub / "lib" for sub in ("cuda_runtime", "cublas")]
    return [lib for lib in TURBOMIND_LIBS if not _lib_loadable(lib, search)]


def requested_backend(backend: str = "auto") -> tuple[str, str]:
    """(backend, who asked): `backend` itself, or for 'auto' the LABKIT_BACKEND variable where it is set."""
    import os

    check_backend(backend)
    env = os.environ.get("LABKIT_BACKEND", "").strip().lower()
    if backend != "auto" or env in ("", "auto"):
        return backend, "asked for"
    if env not in BACKENDS:
        raise EngineError(f"LABKIT_BACKEND={env!r} is not one of {', '.join(BACKENDS)}: unset it or pick one")
    return env, "LABKIT_BACKEND"


def choose_backend(model_dir: str | Path, requested: str = "auto") -> tuple[str, str]:
    """(backend, reason): TurboMind where it can run this model, else the PyTorch engine. 'auto' honours
    LABKIT_BACKEND; TurboMind asked for a model it cannot run gives the PyTorch engine and says why."""
    from labkit.doctor import _turbomind_state
    from labkit.gpu import gpus

    check_architecture(model_dir)
    requested, who = requested_backend(requested)
    if requested == "pytorch":
        return _noted(model_dir, "pytorch", who)
    found = gpus()
    tm_ok, why = _turbomind_state(bool(found), float(found[0].compute_capability) if found else 0.0)
    missing = turbomind_missing() if requested == "turbomind" or tm_ok else []
    if missing and tm_ok:  # e.g. cuBLAS absent while the CUDA 12 runtime is there
        tm_ok, why = False, f"TurboMind lacks {', '.join(missing)}"
    if requested == "turbomind" and (missing or not tm_ok):
        what = f"missing {', '.join(missing)}; get them with {TURBOMIND_HOWTO}" if missing else why
        raise EngineError(f"backend 'turbomind' ({who}) cannot run here: {what}; or use backend='pytorch'")
    model_ok = tm_ok
    if tm_ok:
        try:
            from lmdeploy.turbomind.supported_models import is_supported

            if not is_supported(str(model_dir), trust_remote_code=needs_remote_code(model_dir)):
                model_ok, why = False, f"TurboMind does not support the architecture of {Path(model_dir).name}"
            elif (vision_problem := _turbomind_vision_problem(model_dir)) is not None:
                model_ok, why = False, vision_problem
        except Exception as err:  # its import needs the CUDA 12 runtime
            tm_ok = model_ok = False
            why = f"TurboMind failed to load ({type(err).__name__}: {str(err)[:80]})"
            if requested == "turbomind":
                raise EngineError(f"backend 'turbomind' ({who}) cannot run here: {why}; check `labkit doctor`, "
                                  f"or use backend='pytorch'") from err
    if requested == "turbomind":
        if model_ok:
            return _noted(model_dir, "turbomind", who)
        print(f"TurboMind cannot run {Path(model_dir).name}: {why}; using the PyTorch engine instead.")
        return _noted(model_dir, "pytorch", f"{who} turbomind, but {why}, so the PyTorch engine")
    if model_ok:
        return _noted(model_dir, "turbomind", "auto: TurboMind can run")
    return _noted(model_dir, "pytorch", f"auto: {why}, so the PyTorch engine")


def _noted(model_dir: str | Path, backend: str, why: str) -> tuple[str, str]:
    """(backend, why), also appended to LABKIT_ENGINE_LOG where set (the GPU suite names each file's engine)."""
    import json
    import os

    log = os.environ.get("LABKIT_ENGINE_LOG")
    if log:
        from labkit.evidence import _context

        entry = {"lab": _context.get("notebook"), "test": os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0],
                 "model": Path(model_dir).name, "backend": backend, "why": why}
        try:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError:
            pass
    return backend, why


def _turbomind_vision_problem(model_dir: str | Path) -> str | None:
    from labkit.vision.engines import turbomind_vision_problem

    return turbomind_vision_problem(model_dir)


def check_architecture(model_dir: str | Path) -> str:
    """The model's architecture if an lmdeploy 0.18 engine runs it, else an EngineError saying so (before any load)."""
    import json

    try:
        arch = (kvcache.text_config(model_dir).get("architectures") or [None])[0]
    except (OSError, json.JSONDecodeError) as err:
        raise EngineError(f"cannot read {Path(model_dir) / 'config.json'} ({type(err).__name__}): "
                          f"is {model_dir} a model folder?") from None
    if arch is None:
        raise EngineError(f"{Path(model_dir).name}/config.json names no architecture: lmdeploy cannot pick a "
                          f"model class for it; use a model from `labkit models list`")
    from lmdeploy.pytorch.models.module_map import MODULE_MAP, REMOVED_MODEL_MAP
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    if arch in REMOVED_MODEL_MAP:
        raise EngineError(f"lmdeploy 0.18 dropped {REMOVED_MODEL_MAP[arch]} ({arch}): use a model from "
                          f"`labkit models list`, or an older lmdeploy")
    if arch not in MODULE_MAP and arch not in SUPPORTED_ARCHS:
        raise EngineError(f"lmdeploy 0.18 has no engine for {arch} ({Path(model_dir).name}): use a model from "
                          f"`labkit models list` or generated:tiny-chat")
    return arch


def needs_remote_code(model_dir: str | Path) -> bool:
    """True when a model ships its own Python code (config or tokenizer `auto_map`, e.g. InternLM2.5)."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if path.is_file() and "auto_map" in json.loads(path.read_text(encoding="utf-8")):
            return True
    return False
