"""LMDeploy engines for the labs: `Engine` builds a pipeline from a model name and a few
friendly options, says which backend ran, is always closable (a `with` block, `close()`, or
re-running the cell that made it), and gives GPU memory back. Used by labs 01, 03, 04, 05, 06.

    with labkit.engine.Engine("generated:tiny-chat", cache_ratio=0.4) as eng:
        print(eng.generate("hi", max_new_tokens=32).text)
"""
from __future__ import annotations

import atexit
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit import config, kvcache
from labkit.gpu import GiB, memory_used, require_gpu, wait_for_memory_release

if TYPE_CHECKING:
    import pandas

BACKENDS = ("auto", "turbomind", "pytorch")
_live: dict[str, "Engine"] = {}


class EngineError(RuntimeError):
    """An engine could not be built or used; the message says what to do."""


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

    requested, who = requested_backend(requested)
    if requested == "pytorch":
        return _noted(model_dir, "pytorch", who)
    found = gpus()
    tm_ok, why = _turbomind_state(bool(found), float(found[0].compute_capability) if found else 0.0)
    missing = turbomind_missing() if requested == "turbomind" else []
    if requested == "turbomind" and (missing or not tm_ok):
        what = f"missing {', '.join(missing)}; get them with {TURBOMIND_HOWTO}" if missing else why
        raise EngineError(f"backend 'turbomind' ({who}) cannot run here: {what}; or use backend='pytorch'")
    model_ok = tm_ok
    if tm_ok:
        try:
            from lmdeploy.turbomind.supported_models import is_supported

            if not is_supported(str(model_dir), trust_remote_code=needs_remote_code(model_dir)):
                model_ok, why = False, f"TurboMind does not support the architecture of {Path(model_dir).name}"
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
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError:
            pass
    return backend, why


def needs_remote_code(model_dir: str | Path) -> bool:
    """True when a model ships its own Python code (config or tokenizer `auto_map`, e.g. InternLM2.5)."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if path.is_file() and "auto_map" in json.loads(path.read_text(encoding="utf-8")):
            return True
    return False


def chat_command(model_dir: str | Path, backend: str = "auto", session_len: int | None = None,
                 cache_ratio: float | None = None, eager: bool = False) -> str:
    """The `lmdeploy chat` command line for a model and backend (end it with `exit`, then Enter twice)."""
    import shlex

    from labkit.models import resolve

    path = resolve(str(model_dir))
    chosen, _ = choose_backend(path, backend)
    parts = ["lmdeploy", "chat", shlex.quote(str(path)), "--backend", chosen]
    if needs_remote_code(path):
        parts.append("--trust-remote-code")
    if session_len is not None:
        parts += ["--session-len", str(int(session_len))]
    if cache_ratio is not None:
        parts += ["--cache-max-entry-count", str(kvcache.check_ratio(cache_ratio))]
    if eager and chosen == "pytorch":
        parts.append("--eager-mode")
    return " ".join(parts)


# What `lmdeploy chat` (lmdeploy/cli/chat.py) understands: a prompt ends with an empty line
# ("double enter"); `exit` quits, `end` clears the conversation, Ctrl-C quits too.
CHAT_EXIT_WORD = "exit"


def check_options(cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None,
                  tp: int = 1, backend: str | None = None) -> None:
    """Check engine options before anything loads (engine_config and labkit.serve use it); with the
    chosen `backend`, also what that backend needs."""
    kvcache.check_ratio(cache_ratio, backend)
    kvcache.check_policy(quant_policy)
    if session_len is not None and (not isinstance(session_len, int) or session_len < 16):
        raise EngineError(f"session_len must be a whole number of tokens >= 16 (or None for the model's), "
                          f"not {session_len!r}")
    if not isinstance(tp, int) or tp < 1:
        raise EngineError(f"tp (GPUs per model) must be 1 or more, not {tp!r}")


def engine_config(backend: str, cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None,
                  tp: int = 1, max_batch_size: int | None = None, eager: bool | None = None,
                  model_format: str | None = None):
    """An lmdeploy TurbomindEngineConfig / PytorchEngineConfig from checked, friendly options."""
    check_options(cache_ratio, quant_policy, session_len, tp, backend)
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

    options = dict(cache_max_entry_count=cache_ratio, quant_policy=quant_policy, session_len=session_len,
                   tp=tp, max_batch_size=max_batch_size, model_format=model_format)
    common = {k: v for k, v in options.items() if v is not None}  # None: lmdeploy's default (it refuses None)
    if backend == "turbomind":
        return TurbomindEngineConfig(**common)
    return PytorchEngineConfig(eager_mode=default_eager() if eager is None else eager, **common)


def default_eager() -> bool:
    """Eager mode (no CUDA-graph capture) in the test profile: capture costs start time, and tests start
    many small engines. Students get CUDA graphs."""
    return config.profile() == "test"


def check_gen(max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 40,
              repetition_penalty: float = 1.0) -> None:
    """Check generation inputs (shared by gen_config and the transformers baseline); EngineError if bad."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be a whole number >= 1, not {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise EngineError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (0: off), repetition_penalty > 0")


def gen_config(max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 40,
               repetition_penalty: float = 1.0, random_seed: int | None = None, ignore_eos: bool = False,
               do_sample: bool | None = None, **extra: Any):
    """An lmdeploy GenerationConfig, with the inputs checked first (sampling on unless temperature is 0)."""
    check_gen(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    from lmdeploy import GenerationConfig

    # lmdeploy's own default is greedy (do_sample=False), which silently ignores temperature/top_p/top_k.
    if do_sample is None:
        do_sample = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, random_seed=random_seed,
                            ignore_eos=ignore_eos, do_sample=do_sample, **extra)


class Engine:
    """An LMDeploy pipeline with a name, the backend it chose, and its GPU memory measured."""

    def __init__(self, model: str | Path, backend: str = "auto", name: str = "engine", cache_ratio: float = 0.8,
                 quant_policy: int = 0, session_len: int | None = None, tp: int = 1,
                 max_batch_size: int | None = None, eager: bool | None = None, model_format: str | None = None,
                 log_level: str = "ERROR", **pipeline_kwargs: Any):
        from labkit.models import resolve

        check_backend(backend)
        self.name = name
        self.model_dir = resolve(str(model))
        close_engine(name)  # re-running the cell that built it replaces it (and frees its memory) before the check
        weights = kvcache.weights_bytes(self.model_dir)
        require_gpu(min_free_gib=weights / GiB + 1.0, what=f"loading {self.model_dir.name}")
        self.backend, self.backend_reason = choose_backend(self.model_dir, backend)
        self.config = engine_config(self.backend, cache_ratio, quant_policy, session_len, tp, max_batch_size,
                                    eager, model_format)
        pipeline_kwargs.setdefault("trust_remote_code", needs_remote_code(self.model_dir))
        _init_cuda_context()  # so the baseline holds this process's CUDA context, which never goes back
        self.memory_before = memory_used()
        start = time.perf_counter()
        from lmdeploy import pipeline

        logging.getLogger("lmdeploy").setLevel(log_level)
        try:
            self.pipe = pipeline(str(self.model_dir), backend_config=self.config, log_level=log_level,
                                 **pipeline_kwargs)
        except Exception as err:
            gc.collect()
            raise EngineError(_explain(err, self.model_dir, cache_ratio)) from err
        self.start_seconds = time.perf_counter() - start
        self.memory_after = memory_used()
        self.closed = False
        _live[name] = self

    @property
    def memory_gib(self) -> float:
        """GPU memory the engine took when it started (weights + KV cache + runtime), GiB."""
        return (self.memory_after - self.memory_before) / GiB

    def describe(self) -> dict:
        """What ran: model, backend and why, start time, memory."""
        return {"model": self.model_dir.name, "backend": self.backend, "why": self.backend_reason,
                "cache_ratio": self.config.cache_max_entry_count, "quant_policy": int(self.config.quant_policy),
                "start s": round(self.start_seconds, 1), "GPU memory GiB": round(self.memory_gib, 2)}

    def _check_open(self) -> None:
        if self.closed:
            raise EngineError(f"engine {self.name!r} is closed: build a new one")

    def _stuck(self) -> str:
        return (f"the {self.backend} engine may be stuck (the lmdeploy log above may say why) and the request goes on "
                f"in the background: close the engine (`.close()`, or restart the kernel) to free the GPU, then try "
                f"fewer tokens, a shorter prompt or the other backend")

    def generate(self, prompts, timeout: float | None = None, **gen: Any):
        """pipe(prompts) with gen_config(**gen): one Response, or a list for a batch; a RequestTimeout after
        `timeout` seconds (default: labkit.deadline.default_timeout())."""
        from labkit import deadline

        self._check_open()
        cfg = gen_config(**gen)
        return deadline.call(lambda: self.pipe(prompts, gen_config=cfg), timeout, f"engine {self.name!r}",
                             self._stuck())

    def stream(self, prompt, timeout: float | None = None, **gen: Any) -> Iterator[Any]:
        """Stream one prompt: yields lmdeploy Responses whose .text is the new piece; a RequestTimeout when
        no piece comes for `timeout` seconds."""
        from labkit import deadline

        self._check_open()
        cfg = gen_config(**gen)
        yield from deadline.iterate(lambda: self.pipe.stream_infer(prompt, gen_config=cfg), timeout,
                                    f"engine {self.name!r} (streaming)", self._stuck())

    def chat_turns(self, prompts: list, timeout: float | None = None, **gen: Any) -> "pandas.DataFrame":
        """A multi-turn chat in one `pipe.chat` session (prompts: text or (text, image)), one row per turn
        (each turn limited to `timeout` seconds)."""
        import pandas as pd

        from labkit import deadline

        self._check_open()
        cfg, session, rows = gen_config(**gen), None, []
        try:
            for turn, prompt in enumerate(prompts, 1):
                session = deadline.call(lambda p=prompt, s=session: self.pipe.chat(p, session=s, gen_config=cfg),
                                        timeout, f"engine {self.name!r} (chat turn {turn})", self._stuck())
                r = session.response
                rows.append({"turn": turn, "prompt": prompt[0] if isinstance(prompt, tuple) else prompt,
                             "reply": r.text, "input_token_len": r.input_token_len,
                             "generate_token_len": r.generate_token_len})
        finally:
            if session is not None:
                session.close()
        for prev, row in zip(rows, rows[1:]):  # the earlier turns were sent again: history kept
            row["history kept"] = row["input_token_len"] >= prev["input_token_len"] + prev["generate_token_len"]
        if rows:
            rows[0]["history kept"] = None
        return pd.DataFrame(rows, columns=["turn", "prompt", "reply", "input_token_len", "generate_token_len",
                                           "history kept"])

    def close(self) -> None:
        """Stop the engine and wait until its GPU memory is back."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        _live.pop(self.name, None)
        try:
            self.pipe.close()
        finally:
            del self.pipe
            gc.collect()
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:
                pass
            wait_for_memory_release(self.memory_before, timeout=20)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.memory_gib:.1f} GiB"
        return f"Engine({self.model_dir.name}, {self.backend}, {state})"


def _init_cuda_context(device: str = "cuda") -> None:
    """Create the CUDA context on `device` now (it never goes back), so no engine counts it as its own."""
    import torch

    torch.empty(1, device=device)


def close_engine(name: str) -> bool:
    """Close the live engine called `name`, if any; True if one was closed."""
    from labkit.live import replace_earlier

    return replace_earlier(_live, name, "engine")


def close_all() -> None:
    """Close every engine this kernel started."""
    for name in list(_live):
        _live[name].close()


atexit.register(close_all)


def _explain(err: Exception, model_dir: Path, ratio: float) -> str:
    from labkit.diagnose import diagnose

    text = f"{type(err).__name__}: {err}"
    cause = diagnose(text, model_dir=model_dir, ratio=ratio, unknown="not recognised: see the error text")
    return f"the engine for {model_dir.name} failed to start: {text[:300]} (likely cause: {cause})"
