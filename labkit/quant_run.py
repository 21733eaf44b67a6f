"""The AWQ run (lab 03): settings checked before any work, lmdeploy's own `auto_awq` with a progress bar,
the result cached under LABKIT_HOME/quantized by model + settings + calibration, and sizes on disk."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from labkit import config
from labkit.backends import needs_remote_code
from labkit.kvcache import text_config, weight_files
from labkit.quant_calib import (CalibSource, QuantError, _calibration_loader, _local_samples, calibration_source,
                                local_text)
from labkit.quant_command import current_command

STATS_FILES = ("inputs_stats.pth", "outputs_stats.pth")  # calibration intermediates auto_awq leaves behind
META = "labkit-awq.json"
LOG = "awq-log.txt"


def lab_settings() -> dict:
    """The AWQ settings labs 03 and 04 share (so lab 04 finds lab 03's cached model): test profile is smaller."""
    return {"w_group_size": config.param("W_GROUP_SIZE", full=128),
            "calib_samples": config.param("CALIB_SAMPLES", full=32, test=8),
            "calib_seqlen": config.param("CALIB_SEQLEN", full=256, test=128)}


# ----------------------------------------------------------------------------- checks (fast, no torch)

def check_params(model_dir: str | Path, w_bits: int = 4, w_group_size: int = 128, calib_samples: int = 32,
                 calib_seqlen: int = 256, batch_size: int = 1) -> dict:
    """Check AWQ settings against the model's shape before any work; returns the shape read."""
    if w_bits != 4:
        raise QuantError(f"w_bits must be 4, not {w_bits!r}: lmdeploy's AWQ (W4A16) packs 4-bit weights "
                         f"for its kernels; for 8-bit use `lmdeploy lite smooth_quant` (W8A8)")
    for name, value in (("calib_samples", calib_samples), ("calib_seqlen", calib_seqlen),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QuantError(f"{name} must be a whole number >= 1, not {value!r}")
    cfg = text_config(model_dir)
    hidden = cfg["hidden_size"]
    heads = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or hidden // heads
    dims = {"hidden size": hidden, "intermediate size": cfg.get("intermediate_size", hidden),
            "attention width (heads x head_dim)": heads * head_dim}
    if not isinstance(w_group_size, int) or isinstance(w_group_size, bool) or w_group_size < 1:
        raise QuantError(f"w_group_size must be a whole number >= 1 (the course uses 128), not {w_group_size!r}")
    bad = {k: v for k, v in dims.items() if v % w_group_size}
    if bad:
        ok = [g for g in (32, 64, 128, 256) if all(v % g == 0 for v in dims.values())]
        what = ", ".join(f"the {k} {v}" for k, v in bad.items())
        raise QuantError(f"w_group_size {w_group_size} does not divide {what} of {Path(model_dir).name}: "
                         f"every group of input channels shares one scale, so use a size that divides them "
                         f"({', '.join(map(str, ok)) or 'none of 32/64/128/256 fits this model'}; the course uses 128)")
    return {"layers": cfg["num_hidden_layers"], **dims, "architecture": (cfg.get("architectures") or ["?"])[0]}


# ----------------------------------------------------------------------------- progress from lmdeploy's prints

class _Progress(io.TextIOBase):
    """Turns auto_awq's per-layer prints into a tqdm bar over its stages; keeps the raw lines in a log."""

    STAGES = (("samples:", "calibrate"), ("smooth weight done", "smooth"), ("weight packed", "quantize"),
              ("weight skipped", "quantize"))

    def __init__(self, bar, layers: int, log):
        self.bar, self.layers, self.log = bar, layers, log
        self.seen: set[tuple[str, str]] = set()
        self.buf = ""

    def write(self, s: str) -> int:
        self.log.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            for marker, stage in self.STAGES:
                m = re.search(r"layers\.(\d+)", line)
                if marker in line and m and (stage, m.group(1)) not in self.seen:
                    self.seen.add((stage, m.group(1)))
                    self.bar.set_description(f"AWQ {stage}")
                    self.bar.update(1)
        return len(s)


# ----------------------------------------------------------------------------- quantize

def _device(device: str | None) -> str:
    from labkit.gpu import has_cuda

    if device is None:
        return "cuda" if has_cuda() else "cpu"
    if device not in ("cpu", "cuda"):
        raise QuantError(f"device must be 'cuda', 'cpu' or None (pick for me), not {device!r}")
    if device == "cpu" and has_cuda():
        raise QuantError("device='cpu' cannot run where a GPU is visible: lmdeploy 0.18's AWQ calibration then "
                         "reads CUDA memory statistics of the CPU device and fails. Use device='cuda' or None, "
                         "or hide the GPU with CUDA_VISIBLE_DEVICES=''")
    if device == "cuda" and not has_cuda():
        from labkit.gpu import NO_GPU_HINT

        raise QuantError(f"device='cuda' {NO_GPU_HINT}; use device='cpu' (fine for small models) or None")
    return device


def _key(model_dir: Path, params: dict, identity: str) -> str:
    weights = [(f.name, f.stat().st_size) for f in weight_files(model_dir)]
    blob = json.dumps({"model": str(model_dir), "config": (model_dir / "config.json").read_text(),
                       "weights": weights, "params": params, "calibration": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _done(folder: Path, key: str) -> bool:
    meta = folder / META
    return meta.is_file() and json.loads(meta.read_text()).get("key") == key


def _forget_observers() -> None:
    """Empty lmdeploy's class-level registry of calibration observers (GlobalAvailMixin._instances, keyed by
    module name): it outlives a run, so a second AWQ in the same kernel on a model with fewer layers looked
    for the first model's modules (KeyError 'model.layers.2.self_attn.q_proj')."""
    from lmdeploy.lite.utils.global_avail import GlobalAvailMixin

    GlobalAvailMixin._instances.clear()
    GlobalAvailMixin._instances["default"] = {}


def awq(model: str | Path, work_dir: str | Path | None = None, w_bits: int = 4, w_group_size: int = 128,
        calib_samples: int = 32, calib_seqlen: int = 256, calib_text: str | Path | None = None,
        batch_size: int = 1, search_scale: bool = False, device: str | None = None,
        calib_dataset: str = "wikitext2") -> Path:
    """Quantize `model` to AWQ W4A16 with lmdeploy's auto_awq; returns the folder (cached by model + settings)."""
    from labkit.models import resolve

    model_dir = resolve(str(model))
    shape = check_params(model_dir, w_bits, w_group_size, calib_samples, calib_seqlen, batch_size)
    device = _device(device)
    source = calibration_source(calib_text, calib_dataset, model_dir=model_dir)
    params = dict(w_bits=w_bits, w_group_size=w_group_size, calib_samples=calib_samples,
                  calib_seqlen=calib_seqlen, batch_size=batch_size, search_scale=bool(search_scale))
    key = _key(model_dir, params, source.identity)
    base = config.home() / "quantized"
    out = Path(work_dir).expanduser().resolve() if work_dir else base / f"{model_dir.name}-awq-w{w_bits}g{w_group_size}-{key}"
    if _done(out, key):
        print(f"AWQ model already made with these settings (cached): {out}")
        return out
    if work_dir and out.exists() and any(out.iterdir()):
        raise QuantError(f"work_dir {out} is not empty and holds no AWQ model made with these settings: "
                         f"pick an empty folder, delete it, or leave work_dir=None (labkit's cache)")
    print(f"calibration: {source.name} ({source.reason})")

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    remote = needs_remote_code(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=remote)
    local = source if source.kind == "local" else CalibSource("local", *local_text(model_dir), "fallback")
    if source.kind == "local":  # too little text is an error now, not after the model has loaded
        _local_samples(tokenizer, source.path, calib_samples, calib_seqlen)

    from lmdeploy.lite.apis.auto_awq import auto_awq
    from lmdeploy.lite.apis.calibrate import LAYER_TYPE_MAP

    if shape["architecture"] not in LAYER_TYPE_MAP:
        raise QuantError(f"lmdeploy's AWQ does not support {shape['architecture']} "
                         f"(it supports {', '.join(sorted(LAYER_TYPE_MAP))})")
    dtype = "float16" if device == "cpu" or not torch.cuda.is_bf16_supported() else "auto"
    (base if not work_dir else out.parent).mkdir(parents=True, exist_ok=True)
    used: dict = {}
    start = time.perf_counter()
    layers = shape["layers"]
    tmp, bar = None, None
    try:  # from the moment the half-written folder exists, Ctrl-C (or any error) removes it
        _forget_observers()
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-awq-", dir=base if not work_dir else out.parent))
        bar = tqdm(total=3 * layers + 1, desc="AWQ load + calibrate", unit="step")
        with open(tmp / LOG, "w") as log, _calibration_loader(source, local, tokenizer, calib_samples,
                                                              calib_seqlen, used), \
                contextlib.redirect_stdout(_Progress(bar, layers, log)):
            auto_awq(str(model_dir), work_dir=str(tmp), calib_dataset=calib_dataset if source.kind == "hub"
                     else "wikitext2", calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                     batch_size=batch_size, w_bits=w_bits, w_group_size=w_group_size,
                     search_scale=bool(search_scale), device=device, dtype=dtype, trust_remote_code=remote)
        bar.set_description("AWQ saved")
        bar.update(bar.total - bar.n)
        for name in STATS_FILES:
            (tmp / name).unlink(missing_ok=True)
        actual = CalibSource(**used["source"])
        if actual.identity != source.identity and not work_dir:  # fell back: file it under what it really used
            key = _key(model_dir, params, actual.identity)
            out = base / f"{model_dir.name}-awq-w{w_bits}g{w_group_size}-{key}"
        seconds = time.perf_counter() - start
        (tmp / META).write_text(json.dumps({
            "key": key, "source_model": str(model_dir), "params": params, "device": device, "dtype": dtype,
            "calibration": asdict(actual), "seconds": round(seconds, 1),
            "lmdeploy_command": current_command(model_dir, out, **params, device=device)}, indent=1))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _forget_observers()  # their statistics tensors too
        if bar is not None:
            bar.close()
        if device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    print(f"AWQ W{w_bits} (group {w_group_size}) done in {seconds:.0f} s on {device}: {out}")
    return out


def info(awq_dir: str | Path) -> dict:
    """What labkit recorded about an AWQ folder it made (settings, calibration, time)."""
    return json.loads((Path(awq_dir) / META).read_text())


# ----------------------------------------------------------------------------- sizes

def disk_size(path: str | Path) -> int:
    """Bytes of every file under `path` (what `du -sb` counts)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def compare_sizes(models: dict[str, str | Path]):
    """Size on disk of each model folder, and its ratio to the first (a table)."""
    import pandas as pd

    rows = [{"model": name, "folder": Path(path).name, "MiB on disk": disk_size(path) / 2**20} for name, path in
            models.items()]
    df = pd.DataFrame(rows)
    df["vs first"] = df["MiB on disk"] / df["MiB on disk"].iloc[0]
    return df.round(3)
