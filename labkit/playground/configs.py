"""The playground's configurations: what can be loaded (`LoadConfig`), checked and predicted before anything
loads (`make_plan`: the model folder, the engine, the memory `kvcache.predict` expects, an image's session),
and built (`build_engine`: labkit's `engine.Engine` or `baseline.HFEngine`). Presets for the generation panel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.errors import EngineError

ENGINES = {"turbomind": "LMDeploy TurboMind", "pytorch": "LMDeploy PyTorch engine",
           "transformers": "transformers baseline"}
GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "random_seed")
DEFAULT_SYSTEM = "You are a helpful assistant."
STORY_PROMPT = "Write a short story of about 300 characters about a robot who learns to paint."
PRESETS: dict[str, dict[str, Any]] = {
    "precise": dict(temperature=0.0, top_p=1.0, top_k=1, repetition_penalty=1.0, max_new_tokens=256),
    "balanced": dict(temperature=0.7, top_p=0.8, top_k=40, repetition_penalty=1.05, max_new_tokens=256),
    "creative": dict(temperature=1.1, top_p=0.95, top_k=100, repetition_penalty=1.1, max_new_tokens=512),
    # the course's homework: a ~300-character short story
    "story homework": dict(temperature=0.8, top_p=0.8, top_k=40, repetition_penalty=1.05, max_new_tokens=400,
                           system="You are a storyteller. Write vivid, complete short stories.",
                           prompt=STORY_PROMPT),
}


class PlaygroundError(EngineError):
    """The playground cannot do what was asked; the message says what to do instead."""


@dataclass(frozen=True)
class LoadConfig:
    """One configuration the playground can load: a model and how an engine runs it."""

    model: str
    engine: str = "auto"            # auto, turbomind, pytorch or transformers
    cache_ratio: float = 0.4
    quant_policy: int = 0
    session_len: int | None = None  # None: the model's own
    awq: bool = False

    def label(self) -> str:
        """A short name for tables and charts."""
        name = Path(self.model).name if "/" in self.model else self.model.replace("generated:", "")
        if self.engine == "transformers":
            return f"{name}{' awq' if self.awq else ''} · transformers"
        return f"{name}{' awq' if self.awq else ''} · {self.engine} · kv{self.quant_policy} · {self.cache_ratio:g}"


@dataclass
class Plan:
    """A configuration checked before anything loads: the folder, the engine, and the memory it will take."""

    config: LoadConfig
    model_dir: Path
    engine: str
    why: str
    vision: bool
    session_len: int
    prediction: str


def one_line(err: BaseException) -> str:
    """An error as one line: its type where the message alone is not clear, whitespace collapsed."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (EngineError, ValueError, FileNotFoundError, RuntimeError)) \
        else f"{type(err).__name__}: {text}"


def awq_copies(model_dir: str | Path) -> list[Path]:
    """AWQ folders labkit.quant.awq made from `model_dir` (under LABKIT_HOME/quantized), newest first."""
    import json

    from labkit import config
    from labkit.quant import META

    src = str(Path(model_dir).resolve())
    found = []
    for meta in (config.home() / "quantized").glob(f"*/{META}"):
        try:
            if str(Path(json.loads(meta.read_text())["source_model"]).resolve()) == src:
                found.append(meta.parent)
        except (ValueError, KeyError, OSError):
            continue
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def engine_choices() -> list[tuple[str, str]]:
    """(label, value) of the engines that can run on this machine: LMDeploy's on a CUDA GPU, transformers always."""
    from labkit.gpu import has_cuda

    if not has_cuda():
        return [("transformers baseline (CPU: LMDeploy needs a CUDA GPU)", "transformers")]
    return [("auto (TurboMind where it runs)", "auto"), (ENGINES["turbomind"], "turbomind"),
            (ENGINES["pytorch"], "pytorch"), (ENGINES["transformers"] + " (GPU)", "transformers")]


def make_plan(cfg: LoadConfig, download: bool = False) -> Plan:
    """Check a configuration and predict its memory (kvcache.predict) before anything loads; PlaygroundError if bad."""
    from labkit import kvcache, vision
    from labkit.backends import check_backend, choose_backend
    from labkit.engine import check_options
    from labkit.gpu import has_cuda
    from labkit.models import resolve

    if not cfg.model.strip():
        raise PlaygroundError("no model given: pick one from the list or type a folder path")
    if cfg.engine != "transformers":
        try:
            check_backend(cfg.engine)
        except EngineError as err:
            raise PlaygroundError(f"{err}, or 'transformers'") from err
        if not has_cuda():
            raise PlaygroundError(f"engine {cfg.engine!r} needs a CUDA GPU and there is none here: "
                                  f"pick the transformers baseline")
    model_dir = resolve(cfg.model, download=download)
    is_vl = vision.is_vision_model(model_dir)
    if cfg.awq:
        copies = awq_copies(model_dir)
        if not copies:
            raise PlaygroundError(f"{model_dir.name} has no AWQ copy yet: make one in lab 03 "
                                  f"(labkit.quant.awq), or switch AWQ off")
        model_dir = copies[0]
    engine, why = cfg.engine, "asked for"
    if engine == "transformers":
        if is_vl:
            raise PlaygroundError(f"{model_dir.name} is a vision-language model, which the transformers baseline "
                                  f"cannot run: pick an LMDeploy engine (GPU)")
        if cfg.awq:
            raise PlaygroundError("the transformers baseline cannot run AWQ weights: pick an LMDeploy engine")
    else:
        engine, why = choose_backend(model_dir, cfg.engine)
        if engine == "turbomind" and is_vl and _vit_head_dim(model_dir) == 16:
            raise PlaygroundError(f"TurboMind aborts on {model_dir.name}'s vision tower (head_dim 16): "
                                  f"pick the PyTorch engine")
    try:
        check_options(cfg.cache_ratio, cfg.quant_policy, cfg.session_len, 1, engine if engine != "transformers" else None)
    except (ValueError, EngineError) as err:
        raise PlaygroundError(one_line(err)) from err
    text = kvcache.text_config(model_dir)
    session_len = cfg.session_len or int(text.get("max_position_embeddings") or 4096)
    weights = _gib(kvcache.weights_bytes(model_dir))
    free, where = kvcache.assumed_free(model_dir)
    try:
        got = kvcache.predict(model_dir, min(cfg.cache_ratio, 0.99), cfg.quant_policy, free_bytes=free,
                              gpu_name=None if has_cuda() else "A100")
    except ValueError as err:  # the GPU is too full for this model and ratio: say so before loading
        raise PlaygroundError(f"{model_dir.name} will not fit: {one_line(err)}") from err
    kv = f"KV cache {_gib(got['kv_bytes'])} = {got['tokens']:,} tokens that fit ({where})"
    if engine == "transformers":
        prediction = (f"weights {weights}. transformers keeps no KV-cache pool (it grows per request); "
                      f"on LMDeploy this ratio and KV policy would give: {kv}")
    else:
        prediction = f"weights {weights} + {kv}" + (
            "; TurboMind sizes its cache like this too, give or take its own buffers" if engine == "turbomind" else "")
    return Plan(cfg, model_dir, engine, why, is_vl, session_len, prediction)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _vit_head_dim(model_dir: Path) -> int | None:
    import json

    vc = json.loads((model_dir / "config.json").read_text()).get("vision_config") or {}
    heads = vc.get("num_attention_heads")
    return vc.get("hidden_size", 0) // heads if heads else None


def build_engine(plan: Plan, name: str):
    """The engine for a checked plan: labkit's Engine (LMDeploy) or HFEngine (transformers)."""
    if plan.engine == "transformers":
        from labkit.baseline import HFEngine

        return HFEngine(plan.model_dir, name=name)
    from labkit.engine import Engine

    cfg = plan.config
    return Engine(plan.model_dir, backend=plan.engine, name=name, cache_ratio=cfg.cache_ratio,
                  quant_policy=cfg.quant_policy, session_len=cfg.session_len,
                  model_format="awq" if cfg.awq and plan.engine == "turbomind" else None)
