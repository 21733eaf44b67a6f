"""Calibration text for AWQ (lab 03): lmdeploy's hub sets when they can load, else a local text, and the
one place labkit swaps lmdeploy's calibration loader (`_calibration_loader`, undone afterwards)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit import config
from labkit.errors import LabkitError


class QuantError(LabkitError, ValueError):
    """Bad input for quantization; the message says what to change."""


HUB_SETS = ("wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext")


def check_calib_text(path: str | Path) -> Path:
    """The calibration text file itself, or a QuantError if it is missing or empty."""
    p = Path(path).expanduser()
    if not p.exists():
        raise QuantError(f"calibration text {p} does not exist: give a plain-text file "
                         f"(or leave calib_text=None for the hub set / labkit's corpus)")
    if not p.is_file():
        raise QuantError(f"calibration text {p} is a folder, not a text file")
    if not p.read_text(encoding="utf-8", errors="replace").strip():
        raise QuantError(f"calibration text {p} is empty: put a few thousand words of text like your "
                         f"model's use in it, or leave calib_text=None")
    return p.resolve()


# ----------------------------------------------------------------------------- calibration source

@dataclass
class CalibSource:
    """Where calibration text comes from: a hub set through `datasets`, or a local file."""

    kind: str          # "hub" or "local"
    name: str          # dataset name, or the file's name
    path: str | None   # local file
    reason: str        # why this source

    @property
    def identity(self) -> str:
        """What the cached result depends on (a hub set's name, or a local file's content hash)."""
        if self.kind == "hub":
            return f"hub:{self.name}"
        return "text:" + hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]


def local_text(model_dir: str | Path | None = None) -> tuple[str, str]:
    """(name, path) of the local calibration text: a trained model's own kind of text, else labkit's corpus."""
    if model_dir is not None and (Path(model_dir) / "labkit-trained.json").is_file():
        from labkit.train import arch_of, calibration_text

        path = calibration_text(arch_of(model_dir))
        return path.name, str(path)
    return "corpus.txt", str(config.data_file("corpus.txt"))


def calibration_source(calib_text: str | Path | None = None, calib_dataset: str = "wikitext2",
                       probe: bool = True, model_dir: str | Path | None = None) -> CalibSource:
    """Pick the calibration text: your file, else the hub set if `datasets` and the hub answer, else labkit's corpus."""
    if calib_text is not None:
        p = check_calib_text(calib_text)
        return CalibSource("local", p.name, str(p), "the file you named")
    if calib_dataset not in HUB_SETS:
        raise QuantError(f"calib_dataset {calib_dataset!r} is not one of lmdeploy 0.18's sets "
                         f"({', '.join(HUB_SETS)}); 'ptb' was removed in lmdeploy 0.12. "
                         f"Or give your own text with calib_text='file.txt'")
    local_name, corpus = local_text(model_dir)
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        why = "the `datasets` package is not installed"
    elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False"):
        why = "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    elif not probe:
        why = "the hub was not asked"
    else:
        from labkit.doctor import _probe, hubs

        url = hubs()["Hugging Face"]
        ok, detail = _probe(url)
        if ok:
            return CalibSource("hub", calib_dataset, None, f"{url} answered ({detail})")
        why = f"{url} did not answer ({detail})"
    return CalibSource("local", local_name, corpus,
                       f"lmdeploy's {calib_dataset} downloads from a hub, but {why}: "
                       f"calibrating on labkit's local corpus instead")


def _local_samples(tokenizer, path: str, nsamples: int, seqlen: int) -> list:
    """`nsamples` consecutive [1, seqlen] id tensors from a text file; QuantError if it is too short."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    have, need = ids.shape[1], nsamples * seqlen
    if have < need:
        raise QuantError(f"calibration text {Path(path).name} has {have:,} tokens, but calib_samples x calib_seqlen "
                         f"= {nsamples} x {seqlen} = {need:,}: lower calib_samples (e.g. {max(1, have // seqlen)}) "
                         f"or calib_seqlen, or give a longer calib_text")
    return [ids[:, i * seqlen:(i + 1) * seqlen] for i in range(nsamples)]


@contextlib.contextmanager
def _calibration_loader(source: CalibSource, local: CalibSource, tokenizer, nsamples: int, seqlen: int,
                        used: dict):
    """THE one place labkit changes lmdeploy: `calibrate.get_calib_loaders` is swapped, then restored.

    lmdeploy's `calibrate()` calls `get_calib_loaders(name, tokenizer, nsamples, seed, seqlen)` and wants a
    list of [1, seqlen] token-id tensors. The replacement serves the hub set through lmdeploy's own
    loader when `source` is the hub (falling back to `local`, saying so, if that download fails),
    else samples from the local text file.
    """
    import lmdeploy.lite.apis.calibrate as calibrate_mod

    original = calibrate_mod.get_calib_loaders
    local_cache: list = []

    def local_samples():
        if not local_cache:
            local_cache.extend(_local_samples(tokenizer, local.path, nsamples, seqlen))
        return local_cache

    def get_calib_loaders(name, tok, nsamples=nsamples, seed=0, seqlen=seqlen):
        if source.kind == "hub":
            try:
                samples = original(name, tok, nsamples=nsamples, seed=seed, seqlen=seqlen)
                used.update(source=asdict(source))
                return samples
            except Exception as err:  # a hub download fails in many ways; all mean "use local text"
                note = (f"lmdeploy could not load {source.name} ({type(err).__name__}: {str(err)[:120]}): "
                        f"calibrating on labkit's local corpus instead")
                print(note, file=sys.stderr)
                used.update(source=asdict(CalibSource("local", local.name, local.path, note)))
                return local_samples()
        used.update(source=asdict(source))
        return local_samples()

    calibrate_mod.get_calib_loaders = get_calib_loaders
    try:
        yield
    finally:
        calibrate_mod.get_calib_loaders = original
