"""AWQ W4A16 quantization through lmdeploy's own `auto_awq` (lab 03), and what it changes:
size on disk, the course's command next to today's, and quality (perplexity on a GPU,
next-token agreement on any machine).

    out = labkit.quant.awq("generated:tiny-chat")          # cached under LABKIT_HOME/quantized
    labkit.quant.compare_sizes({"bf16": model_dir, "awq": out})

Calibration: lmdeploy's built-in sets (wikitext2, c4, ...) download from a hub with `datasets`.
labkit uses them when that can work and otherwise says so and calibrates on the text it ships
(labkit/data/corpus.txt) or on a text file you name (`calib_text=`). The swap happens in one
place, `_calibration_loader`, and is undone afterwards.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit import config
from labkit.engine import needs_remote_code
from labkit.gpu import GiB
from labkit.kvcache import text_config, weight_files
from labkit.errors import LabkitError

HUB_SETS = ("wikitext2", "c4", "pileval", "gsm8k", "neuralmagic_calibration", "open-platypus", "openwebtext")
STATS_FILES = ("inputs_stats.pth", "outputs_stats.pth")  # calibration intermediates auto_awq leaves behind
META = "labkit-awq.json"
LOG = "awq-log.txt"

COURSE_COMMAND = ("lmdeploy lite auto_awq {model} --calib-dataset ptb --calib-samples 128 --calib-seqlen 2048 "
                  "--w-bits 4 --w-group-size 128 --batch-size 1 --search-scale False --work-dir {out}")


def lab_settings() -> dict:
    """The AWQ settings labs 03 and 04 share (so lab 04 finds lab 03's cached model): test profile is smaller."""
    return {"w_group_size": config.param("W_GROUP_SIZE", full=128),
            "calib_samples": config.param("CALIB_SAMPLES", full=32, test=8),
            "calib_seqlen": config.param("CALIB_SEQLEN", full=256, test=128)}


class QuantError(LabkitError, ValueError):
    """Bad input for quantization; the message says what to change."""


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


def calibration_source(calib_text: str | Path | None = None, calib_dataset: str = "wikitext2",
                       probe: bool = True) -> CalibSource:
    """Pick the calibration text: your file, else the hub set if `datasets` and the hub answer, else labkit's corpus."""
    if calib_text is not None:
        p = check_calib_text(calib_text)
        return CalibSource("local", p.name, str(p), "the file you named")
    if calib_dataset not in HUB_SETS:
        raise QuantError(f"calib_dataset {calib_dataset!r} is not one of lmdeploy 0.18's sets "
                         f"({', '.join(HUB_SETS)}); 'ptb' was removed in lmdeploy 0.12. "
                         f"Or give your own text with calib_text='file.txt'")
    corpus = str(config.data_file("corpus.txt"))
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
    return CalibSource("local", "corpus.txt", corpus,
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


def awq(model: str | Path, work_dir: str | Path | None = None, w_bits: int = 4, w_group_size: int = 128,
        calib_samples: int = 32, calib_seqlen: int = 256, calib_text: str | Path | None = None,
        batch_size: int = 1, search_scale: bool = False, device: str | None = None,
        calib_dataset: str = "wikitext2") -> Path:
    """Quantize `model` to AWQ W4A16 with lmdeploy's auto_awq; returns the folder (cached by model + settings)."""
    from labkit.models import resolve

    model_dir = resolve(str(model))
    shape = check_params(model_dir, w_bits, w_group_size, calib_samples, calib_seqlen, batch_size)
    device = _device(device)
    source = calibration_source(calib_text, calib_dataset)
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
    local = source if source.kind == "local" else CalibSource("local", "corpus.txt",
                                                              str(config.data_file("corpus.txt")), "fallback")
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


# ----------------------------------------------------------------------------- the course's command vs today's

def course_command(model: str | Path = "<model>", out: str | Path = "<out>") -> str:
    """The command the course gave (lmdeploy 0.3-0.5)."""
    return COURSE_COMMAND.format(model=model, out=out)


def current_command(model: str | Path = "<model>", out: str | Path = "<out>", w_bits: int = 4,
                    w_group_size: int = 128, calib_samples: int = 128, calib_seqlen: int = 2048,
                    batch_size: int = 1, search_scale: bool = False, calib_dataset: str = "wikitext2",
                    device: str = "cuda") -> str:
    """The same quantization as an lmdeploy 0.18 command line."""
    cmd = (f"lmdeploy lite auto_awq {model} --calib-dataset {calib_dataset} --calib-samples {calib_samples} "
           f"--calib-seqlen {calib_seqlen} --w-bits {w_bits} --w-group-size {w_group_size} "
           f"--batch-size {batch_size}")
    if search_scale:
        cmd += " --search-scale"
    if device != "cuda":
        cmd += f" --device {device} --dtype float16"
    return cmd + f" --work-dir {out}"


_PARSER: dict = {}


def _cli_parser():
    """lmdeploy's own argument parser with its `lite auto_awq` sub-command (built once)."""
    if "p" not in _PARSER:
        from lmdeploy.cli.cli import CLI
        from lmdeploy.cli.lite import SubCliLite

        if "auto_awq" not in SubCliLite.subparsers.choices:
            SubCliLite.add_parser_auto_awq()
        _PARSER["p"] = CLI.parser
        _PARSER["awq"] = SubCliLite.subparsers.choices["auto_awq"]
    return _PARSER["p"]


def check_command(command: str) -> tuple[bool, str]:
    """(accepted, what lmdeploy 0.18's own CLI parser says) for an `lmdeploy lite auto_awq ...` line; runs nothing."""
    argv = shlex.split(command)
    if argv and argv[0] == "lmdeploy":
        argv = argv[1:]
    parser = _cli_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
        return False, lines[-1] if lines else "rejected"
    return True, "accepted"


def _dataset_choices() -> str:
    _cli_parser()
    action = next(a for a in _PARSER["awq"]._actions if "--calib-dataset" in a.option_strings)
    return ", ".join(action.choices)


def cli_flags():
    """The flags of `lmdeploy lite auto_awq` as lmdeploy 0.18's parser defines them (a table)."""
    import argparse

    import pandas as pd

    _cli_parser()
    rows = []
    for action in _PARSER["awq"]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kind = "switch (no value)" if isinstance(action, argparse._StoreTrueAction) else \
            (action.type.__name__ if callable(action.type) and hasattr(action.type, "__name__") else "str")
        rows.append({"flag": max(action.option_strings, key=len), "kind": kind, "default": action.default,
                     "choices": ", ".join(action.choices) if action.choices else ""})
    return pd.DataFrame(rows)


def command_changes(model: str | Path = "<model>", out: str | Path = "<out>"):
    """The course's command next to lmdeploy 0.18's, each difference checked with lmdeploy's own parser."""
    import pandas as pd

    now = current_command(model, out)
    fixed_scale = course_command(model, out).replace(" --search-scale False", "")
    fixed_ptb = course_command(model, out).replace("--calib-dataset ptb", "--calib-dataset wikitext2")
    rows = [
        {"what": "the course's command", "command": course_command(model, out)},
        {"what": "only --calib-dataset ptb changed to wikitext2", "command": fixed_ptb},
        {"what": "only --search-scale False dropped", "command": fixed_scale},
        {"what": "lmdeploy 0.18 (same quantization)", "command": now},
    ]
    for r in rows:
        ok, msg = check_command(r["command"])
        r["lmdeploy 0.18 says"] = msg
    why = {
        0: "fails at the first problem argparse meets",
        1: "--search-scale is a switch since it became store_true: 'False' is left over as an extra argument",
        2: f"ptb was removed from lmdeploy's calibration sets in 0.12: the choices are {_dataset_choices()} "
           f"(all downloaded from a hub)",
        3: "the default is already 'no scale search'; add --search-scale to turn it on",
    }
    for i, r in enumerate(rows):
        r["why"] = why[i]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- quality

def _windows(tokenizer, text_path: Path, seqlen: int, windows: int | None) -> list[list[int]]:
    ids = tokenizer(Path(text_path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    n = len(ids) // seqlen
    if n < 1:
        raise QuantError(f"{Path(text_path).name} has {len(ids)} tokens, fewer than one window of {seqlen}: "
                         f"lower seqlen")
    n = n if windows is None else min(n, windows)
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]


def dequantized_model(awq_dir: str | Path, original_dir: str | Path, dtype: str = "float32"):
    """A transformers model whose weights are the AWQ model's, dequantized with lmdeploy's own W4A16 formula (CPU)."""
    import torch
    from lmdeploy.pytorch.backends.default.awq_modules import dequantize_gemm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    awq_dir = Path(awq_dir)
    qcfg = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    remote = needs_remote_code(original_dir)
    model = AutoModelForCausalLM.from_pretrained(str(original_dir), dtype=getattr(torch, dtype),
                                                 trust_remote_code=remote).eval()
    state: dict[str, Any] = {}
    for f in sorted(awq_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    weights: dict[str, Any] = {}
    for name, t in state.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            w = dequantize_gemm(t, state[p + ".qzeros"], state[p + ".scales"], qcfg["bits"], qcfg["group_size"])
            weights[p + ".weight"] = w.t().contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            weights[name] = t  # norms (AWQ folded its smoothing scales into them), embeddings, biases
    target = model.state_dict()
    missing = [k for k in weights if k not in target]
    if missing:
        raise QuantError(f"the AWQ weights do not match {Path(original_dir).name}'s layout ({missing[:3]}...): "
                         f"was {awq_dir.name} made from this model?")
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in weights.items()}, strict=False)
    return model


def next_token_agreement(original: str | Path, quantized: str | Path, text: str | Path | None = None,
                         seqlen: int = 256, windows: int = 2) -> dict:
    """Top-1 agreement and KL(original || AWQ) of next-token distributions on held-out text (runs on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labkit.kvcache import weights_bytes
    from labkit.models import resolve

    original = resolve(str(original))
    remote = needs_remote_code(original)
    dtype = "float32" if weights_bytes(original) < GiB else "bfloat16"
    tok = AutoTokenizer.from_pretrained(str(original), trust_remote_code=remote)
    ids = torch.tensor(_windows(tok, Path(text or config.data_file("heldout.txt")), seqlen, windows))
    start = time.perf_counter()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(original), dtype=getattr(torch, dtype),
                                                   trust_remote_code=remote).eval()
        a = ref(ids).logits.float().log_softmax(-1)
        del ref
        b = dequantized_model(quantized, original, dtype)(ids).logits.float().log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float()
    return {"tokens": int(ids.numel()), "top-1 agreement": float(agree.mean()), "KL mean (nats)": float(kl.mean()),
            "KL max (nats)": float(kl.max()), "chance agreement": 1 / a.shape[-1],
            "entropy of original (nats)": float(-(a.exp() * a).sum(-1).mean()),
            "seconds": round(time.perf_counter() - start, 1), "dtype": dtype}


def perplexity(engine, text: str | Path | None = None, seqlen: int = 512, windows: int | None = 8) -> float:
    """Perplexity of an engine's model on held-out text, via lmdeploy's `pipeline.get_ppl` (GPU)."""
    from transformers import AutoTokenizer

    model_dir = Path(engine.model_dir)
    remote = needs_remote_code(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=remote)
    chunks = _windows(tok, Path(text or config.data_file("heldout.txt")), seqlen, windows)
    from labkit import deadline

    losses = deadline.call(lambda: engine.pipe.get_ppl(chunks), None, f"perplexity on engine {engine.name!r}",
                           engine._stuck())  # mean cross-entropy per window (nats/token)
    return float(math.exp(sum(losses) / len(losses)))


def _tok_s(table, batch: int) -> float | None:
    """Output tokens/s at `batch` from a labkit.bench.measure table."""
    rows = table[table["batch"] == batch]
    return float(rows["output tok/s"].iloc[0]) if len(rows) else None


def profile_engine(engine, batch_sizes=(1, 32), new_tokens: int = 256, repeats: int = 3, prompt_tokens: int = 128,
                   ppl_seqlen: int = 512, ppl_windows: int | None = 8) -> dict:
    """One row for the lab-03 table: GPU memory (split into KV cache and the rest), decode speed, perplexity."""
    from labkit import bench
    from labkit.kvcache import engine_capacity

    row: dict[str, Any] = {"model": engine.model_dir.name, "engine": engine.backend,
                           "GPU memory GiB": round(engine.memory_gib, 3)}
    try:
        cap = engine_capacity(engine)
        row["KV cache GiB"] = round(cap["kv_bytes"] / GiB, 3)
        row["weights + runtime GiB"] = round(engine.memory_gib - cap["kv_bytes"] / GiB, 3)
    except ValueError as err:  # TurboMind does not report its blocks
        print(f"note: {err}")
    speed = bench.measure(engine, batch_sizes=tuple(batch_sizes), prompt_tokens=prompt_tokens,
                          new_tokens=new_tokens, warmup=1, repeats=repeats)
    for b in batch_sizes:
        row[f"tok/s batch {b}"] = _tok_s(speed, b)
    row["perplexity"] = round(perplexity(engine, seqlen=ppl_seqlen, windows=ppl_windows), 2)
    return row
