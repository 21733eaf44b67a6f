"""The course's models: a catalogue, and `resolve(name)` that turns a name into a local folder.

Order tried: `generated:NAME` (random weights, built here) and `trained:NAME` (trained here on generated
text, shipped with labkit: labkit.train) -> an explicit folder -> the course's
shared folders -> the Hugging Face cache -> a download (Hugging Face, honouring HF_ENDPOINT, or
ModelScope with LABKIT_HUB=modelscope) -> a ModelNotFoundError that says what to fix.
Used by every lab.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from labkit import config
from labkit.errors import LabkitError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
HF_ENDPOINT = "https://huggingface.co"  # Hugging Face's own hub; the HF_ENDPOINT variable picks a mirror


@dataclass(frozen=True)
class CourseModel:
    """A model of the catalogue: where it is published and what it needs."""

    name: str
    kind: str                      # "chat" or "vision"
    hf_id: str
    modelscope_id: str
    share_paths: tuple[str, ...]
    disk_gib: float                # bf16 weights on disk
    min_gpu_gib: float             # weights + a small KV cache
    tool_parser: str | None = None
    notes: str = ""
    labs: tuple[str, ...] = field(default=())


CATALOGUE: dict[str, CourseModel] = {
    m.name: m for m in [
        CourseModel(
            "internlm2_5-1_8b-chat", "chat", "internlm/internlm2_5-1_8b-chat",
            "Shanghai_AI_Laboratory/internlm2_5-1_8b-chat",
            ("/root/share/new_models/Shanghai_AI_Laboratory/internlm2_5-1_8b-chat",
             "/share/new_models/Shanghai_AI_Laboratory/internlm2_5-1_8b-chat"),
            disk_gib=3.6, min_gpu_gib=6.0, tool_parser="internlm",
            notes="the course's text model (InternLM2.5 1.8B chat)", labs=("01", "02", "03", "04")),
        CourseModel(
            "internlm2_5-7b-chat", "chat", "internlm/internlm2_5-7b-chat",
            "Shanghai_AI_Laboratory/internlm2_5-7b-chat",
            ("/root/share/new_models/Shanghai_AI_Laboratory/internlm2_5-7b-chat",
             "/share/new_models/Shanghai_AI_Laboratory/internlm2_5-7b-chat"),
            disk_gib=14.5, min_gpu_gib=18.0, tool_parser="internlm",
            notes="the course's larger text model; needs a 24 GB slice", labs=("01", "03")),
        CourseModel(  # the -hf layout (transformers' own InternVL classes) is what tiny-vl mirrors and tests
            "InternVL3-1B-hf", "vision", "OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-1B-hf",
            ("/root/share/new_models/OpenGVLab/InternVL3-1B-hf", "/share/new_models/OpenGVLab/InternVL3-1B-hf"),
            disk_gib=1.9, min_gpu_gib=5.0,
            notes="vision-language model for lab 05 (the course used LLaVA, which lmdeploy 0.18 loads only "
                  "with the LLaVA repository installed, and XComposer2, which 0.15 dropped)", labs=("05",)),
    ]
}

DEFAULTS = {"chat": "internlm2_5-1_8b-chat", "vision": "InternVL3-1B-hf"}
GENERATED_FALLBACK = {"chat": "trained:tiny-chat", "vision": "generated:tiny-vl"}
FALLBACK_ABOUT = {"chat": "a model of under 1M parameters trained here on generated text (greetings, stories, "
                          "sums, the add/mul tools), not InternLM2.5",
                  "vision": "random weights, nonsense text"}


def catalogue():
    """The course models as a table (lab 00)."""
    import pandas as pd

    return pd.DataFrame([{"name": m.name, "kind": m.kind, "hugging face": m.hf_id, "modelscope": m.modelscope_id,
                          "disk GiB": m.disk_gib, "min GPU GiB": m.min_gpu_gib, "labs": ", ".join(m.labs),
                          "notes": m.notes} for m in CATALOGUE.values()])


class ModelNotFoundError(LabkitError, FileNotFoundError):
    """No usable model folder; the message lists every place tried and how to fix it."""


def default(kind: str = "chat") -> str:
    """The model a lab uses: LABKIT_MODEL_<NN> for lab NN (e.g. LABKIT_MODEL_02), else LABKIT_MODEL, else the
    course model, else (no GPU) a generated one."""
    from labkit.evidence import _context

    lab = (_context.get("notebook") or "")[:2]
    per_lab = os.environ.get(f"LABKIT_MODEL_{lab}") if kind == "chat" and lab.isdigit() else None
    env = per_lab or os.environ.get("LABKIT_MODEL_VISION" if kind == "vision" else "LABKIT_MODEL")
    if env:
        return env
    from labkit.gpu import has_cuda

    if has_cuda():
        return DEFAULTS[kind]
    print(f"No CUDA GPU here: using {GENERATED_FALLBACK[kind]} ({FALLBACK_ABOUT[kind]}) "
          f"so the lab still runs. Set LABKIT_MODEL to choose another model.")
    return GENERATED_FALLBACK[kind]


def is_model_dir(path: Path) -> bool:
    """True for a folder that holds config.json and weight files."""
    return (path / "config.json").is_file() and any(
        next(path.glob(p), None) is not None for p in WEIGHT_PATTERNS)


def check_model_dir(path: Path) -> Path:
    """The folder itself if it is a model folder, else a ModelNotFoundError saying what is missing."""
    if not path.exists():
        raise ModelNotFoundError(
            f"model folder {path} does not exist: check the path, or give a catalogue name "
            f"({', '.join(CATALOGUE)}) or `generated:tiny-chat`")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file, not a model folder: give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a model folder: no config.json in it. Point at the folder that holds "
            f"config.json and the *.safetensors files (for a hub download, the snapshot folder)")
    if not is_model_dir(path):
        raise ModelNotFoundError(
            f"{path} has config.json but no weights (*.safetensors / *.bin): the download is "
            f"incomplete; delete the folder and resolve the model again")
    return path.resolve()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.sep in name and not _looks_like_hub_id(name)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def share_candidates(entry: CourseModel | None, name: str) -> list[Path]:
    """Local folders where a course model may already be (LABKIT_SHARE first)."""
    base = name.split("/")[-1]
    out = []
    if os.environ.get("LABKIT_SHARE"):
        share = Path(os.environ["LABKIT_SHARE"]).expanduser()
        out += [share / base, share / name]
    if entry:
        out += [Path(p) for p in entry.share_paths]
    out.append(config.home() / "models" / base)
    return out


def resolve(name: str, fallback: str | None = None, download: bool = True) -> Path:
    """A local model folder for `name` (catalogue name, hub id, folder or `generated:NAME`)."""
    try:
        return _resolve(name, download)
    except ModelNotFoundError as err:
        if fallback is None or fallback == name:
            raise
        print(f"{name} is not available here ({str(err).splitlines()[0]}).\nUsing {fallback} instead.")
        return _resolve(fallback, download)


def _resolve(name: str, download: bool) -> Path:
    name = name.strip()
    if name.startswith("generated:"):
        from labkit.generate import ensure

        return ensure(name.split(":", 1)[1])
    if name.startswith("trained:"):
        from labkit.train import ensure as ensure_trained

        return ensure_trained(name.split(":", 1)[1])
    if _looks_like_path(name) or Path(name).expanduser().exists():
        return check_model_dir(Path(name).expanduser())
    entry = CATALOGUE.get(name)
    if entry is None and not _looks_like_hub_id(name):
        raise ModelNotFoundError(
            f"unknown model {name!r}: give a folder path, a hub id like 'internlm/internlm2_5-1_8b-chat', "
            f"a catalogue name ({', '.join(CATALOGUE)}), trained:tiny-chat or generated:tiny-chat")
    tried = []
    for cand in share_candidates(entry, name):
        if cand.exists():
            try:
                return check_model_dir(cand)
            except ModelNotFoundError as err:
                tried.append(f"{cand}: {err}")
        else:
            tried.append(f"{cand}: not there")
    hub_id = entry.hf_id if entry else name
    cached = _from_hf_cache(hub_id)
    if cached is not None:
        return cached
    tried.append(f"Hugging Face cache ({hub_cache_dir()}): no complete snapshot of {hub_id}")
    if download:
        try:
            return _download(entry, hub_id)
        except Exception as err:  # network errors come in many types; all mean the same here
            tried.append(f"download: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
    raise ModelNotFoundError(
        f"model {name!r} not found. Tried:\n  - " + "\n  - ".join(tried) +
        "\nFix one of: put the model in one of those folders (or set LABKIT_SHARE to the folder "
        "that holds it); set HF_ENDPOINT to a reachable mirror, or LABKIT_HUB=modelscope; or use "
        "LABKIT_MODEL=trained:tiny-chat to run the lab on the small model labkit trained.")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache that downloads go to (huggingface_hub's HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_endpoint() -> str:
    """The Hugging Face hub labkit downloads from: HF_ENDPOINT if set, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")


def _from_hf_cache(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None
    return path if is_model_dir(path) else None


def _download(entry: CourseModel | None, hub_id: str) -> Path:
    hub = os.environ.get("LABKIT_HUB", "huggingface").lower()
    if hub == "modelscope":
        from modelscope import snapshot_download as ms_download  # optional dependency

        path = Path(ms_download(entry.modelscope_id if entry else hub_id))
    else:
        from huggingface_hub import snapshot_download

        print(f"Downloading {hub_id} from {hf_endpoint()} (set HF_ENDPOINT for a mirror) ...")
        path = Path(snapshot_download(hub_id, etag_timeout=5))
    return check_model_dir(path)
