"""LMDeploy engines for the labs: `Engine` builds a pipeline from a model name and a few
friendly options, says which backend ran, is always closable (a `with` block, `close()`, or
re-running the cell that made it), and gives GPU memory back. Used by labs 01, 03, 04, 05, 06.
Which backend runs a model is labkit.backends (its names are importable from here too).

    with labkit.engine.Engine("generated:tiny-chat", cache_ratio=0.4) as eng:
        print(eng.generate("hi", max_new_tokens=32).text)
"""
from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit import config, kvcache
from labkit.backends import (BACKENDS, TURBOMIND_HOWTO, TURBOMIND_LIBS, check_architecture,  # noqa: F401 (re-exported)
                             check_backend, choose_backend, needs_remote_code, requested_backend,
                             turbomind_missing)
from labkit.errors import EngineError  # noqa: F401 (re-exported)
from labkit.gpu import GiB, init_cuda_context, memory_used, require_gpu, wait_for_memory_release
from labkit.live import Live

if TYPE_CHECKING:
    import pandas


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
                  tp: int = 1, backend: str | None = None, model_dir: str | Path | None = None) -> None:
    """Check engine options before anything loads (engine_config and labkit.serve use it); with the
    chosen `backend` (and the model), also what that backend needs."""
    if backend is not None and backend not in BACKENDS and backend != "custom":
        check_backend(backend)
    kvcache.check_ratio(cache_ratio, backend)
    head_dim = None
    if model_dir is not None and quant_policy in (4, kvcache.TURBO_QUANT):  # the two whose checks need head_dim
        try:
            head_dim = kvcache.ModelShape.from_dir(model_dir).head_dim
        except (OSError, KeyError, ValueError):
            head_dim = None
    kvcache.check_policy(quant_policy, backend, head_dim)
    if session_len is not None and (not isinstance(session_len, int) or session_len < 16):
        raise EngineError(f"session_len must be a whole number of tokens >= 16 (or None for the model's), "
                          f"not {session_len!r}")
    if not isinstance(tp, int) or tp < 1:
        raise EngineError(f"tp (GPUs per model) must be 1 or more, not {tp!r}")


def engine_config(backend: str, cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None,
                  tp: int = 1, max_batch_size: int | None = None, eager: bool | None = None,
                  model_format: str | None = None):
    """An lmdeploy TurbomindEngineConfig / PytorchEngineConfig from checked, friendly options."""
    if backend not in ("turbomind", "pytorch"):
        raise EngineError(f"engine_config needs backend 'turbomind' or 'pytorch', not {backend!r} "
                          f"('auto' is resolved first: labkit.engine.choose_backend)")
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
    rules = [("temperature", temperature, lambda v: v >= 0, ">= 0 (0: greedy)"),
             ("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
             ("top_k", top_k, lambda v: v >= 0, ">= 0 (0: off)"),
             ("repetition_penalty", repetition_penalty, lambda v: v > 0, "> 0 (1: off)")]
    for name, value, ok, want in rules:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
            raise EngineError(f"{name} must be {want}, not {value!r}")


OPENAI_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "seed": "random_seed"}


def gen_config(max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 40,
               repetition_penalty: float = 1.0, random_seed: int | None = None, ignore_eos: bool = False,
               do_sample: bool | None = None, **extra: Any):
    """An lmdeploy GenerationConfig, with the inputs checked first (sampling on unless temperature is 0)."""
    for openai_name, ours in OPENAI_NAMES.items():
        if openai_name in extra:
            raise EngineError(f"{openai_name}= is the OpenAI name: use {ours}= (lmdeploy's GenerationConfig)")
    check_gen(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    from lmdeploy import GenerationConfig

    # lmdeploy's own default is greedy (do_sample=False), which silently ignores temperature/top_p/top_k.
    if do_sample is None:
        do_sample = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, random_seed=random_seed,
                            ignore_eos=ignore_eos, do_sample=do_sample, **extra)


_INTERRUPTED = {"load": False}  # a Ctrl-C cut a load short in this kernel (it may have cut an import short too)


@contextlib.contextmanager
def _noting_ctrl_c() -> Iterator[dict]:
    """While it lasts, a Ctrl-C (SIGINT) is noted, then handled as before: {"seen": True} once one came."""
    seen = {"seen": False}
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    before = signal.getsignal(signal.SIGINT)

    def note(signum, frame):
        seen["seen"] = True
        if callable(before):
            before(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, before)


class Engine(Live):
    """An LMDeploy pipeline with a name, the backend it chose, and its GPU memory measured."""

    kind = "engine"

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
        check_options(cache_ratio, quant_policy, session_len, tp, self.backend, self.model_dir)
        self.config = engine_config(self.backend, cache_ratio, quant_policy, session_len, tp, max_batch_size,
                                    eager, model_format)
        pipeline_kwargs.setdefault("trust_remote_code", needs_remote_code(self.model_dir))
        init_cuda_context()  # so the baseline holds this process's CUDA context, which never goes back
        self.memory_before = memory_used()
        start = time.perf_counter()
        from lmdeploy import pipeline

        logging.getLogger("lmdeploy").setLevel(log_level)
        self.closed = True  # until the pipeline exists
        try:
            with _noting_ctrl_c() as ctrl_c:
                self.pipe = pipeline(str(self.model_dir), backend_config=self.config, log_level=log_level,
                                     **pipeline_kwargs)
        except BaseException as err:  # Ctrl-C too: whatever was half built goes, so the cell can be re-run
            _free_partial(self.memory_before)
            if isinstance(err, SystemExit):  # the PyTorch engine checks its environment in a child process and
                # calls exit(1) when anything stops the check, a Ctrl-C included (measured on the GPU runner)
                if not ctrl_c["seen"]:
                    raise EngineError(f"the engine for {self.model_dir.name} failed lmdeploy's environment check "
                                      f"(the '<...> check failed!' line above says which part): fix that, or run "
                                      f"`labkit doctor`") from None
                err = KeyboardInterrupt()
            if isinstance(err, KeyboardInterrupt):
                _INTERRUPTED["load"] = True
                print(f"\ninterrupted: engine {name!r} not started; its memory is given back")
                raise err from None
            if isinstance(err, ImportError) and _INTERRUPTED["load"]:
                raise EngineError(f"the engine for {self.model_dir.name} failed to start: {type(err).__name__} "
                                  f"({str(err)[:120]}): an earlier Ctrl-C stopped Python halfway through importing "
                                  f"the engine's modules, which stay broken in this kernel: restart the kernel "
                                  f"(Kernel > Restart) and run the cells again") from err
            if isinstance(err, Exception):
                raise EngineError(_explain(err, self.model_dir, cache_ratio)) from err
            raise
        self.start_seconds = time.perf_counter() - start
        self.memory_after = memory_used()
        self.closed = False
        self._keep()

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
        return deadline.guarded(lambda: self.pipe(prompts, gen_config=cfg), timeout, f"engine {self.name!r}",
                                self._stuck())

    def stream(self, prompt, timeout: float | None = None, stop: threading.Event | None = None,
               **gen: Any) -> Iterator[Any]:
        """Stream one prompt: yields lmdeploy Responses whose .text is the new piece; a RequestTimeout when
        no piece comes for `timeout` seconds; setting `stop` aborts the request in the engine (not only the
        reading of it)."""
        from labkit import deadline

        self._check_open()
        cfg = gen_config(**gen)
        what = f"engine {self.name!r} (streaming)"
        if stop is None:
            yield from deadline.iterate(lambda: self.pipe.stream_infer(prompt, gen_config=cfg), timeout, what,
                                        self._stuck())
            return
        session = self.pipe.session()  # its own session, so that abort() cancels this request in the engine
        try:
            pieces = deadline.iterate(lambda: self.pipe.stream_infer(prompt, sessions=session, gen_config=cfg),
                                      timeout, what, self._stuck())
            for piece in pieces:
                if stop.is_set():
                    session.abort()
                    break
                yield piece
        finally:
            session.close()  # aborts a request still running (the reader stopped early), then frees the session

    def chat_turns(self, prompts: list, timeout: float | None = None, **gen: Any) -> "pandas.DataFrame":
        """A multi-turn chat in one `pipe.chat` session (prompts: text or (text, image)), one row per turn
        (each turn limited to `timeout` seconds)."""
        import pandas as pd

        from labkit import deadline

        self._check_open()
        cfg, session, rows = gen_config(**gen), None, []
        tok = getattr(getattr(self.pipe, "async_engine", None), "tokenizer", None)
        try:
            for turn, prompt in enumerate(prompts, 1):
                session = deadline.call(lambda p=prompt, s=session: self.pipe.chat(p, session=s, gen_config=cfg),
                                        timeout, f"engine {self.name!r} (chat turn {turn})", self._stuck())
                r = session.response
                rows.append({"turn": turn, "prompt": prompt[0] if isinstance(prompt, tuple) else prompt,
                             "reply": r.text, "input_token_len": r.input_token_len,
                             "generate_token_len": r.generate_token_len,
                             "reply tokens as history": len(tok.encode(r.text, add_bos=False)) if tok
                             else r.generate_token_len})
        finally:
            if session is not None:
                session.close()
        return pd.DataFrame(history_kept(rows), columns=["turn", "prompt", "reply", "input_token_len",
                                                         "generate_token_len", "reply tokens as history",
                                                         "history kept"])

    def close(self) -> None:
        """Stop the engine and wait until its GPU memory is back."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        self._forget()
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


def history_kept(rows: list[dict]) -> list[dict]:
    """Mark each turn after the first "history kept" when its prompt held the turn before and that turn's reply:
    input_token_len >= the previous input + the reply's tokens *as text* (a session sends the history as text,
    and a reply's stop token or skipped special tokens do not come back), else False."""
    for prev, row in zip(rows, rows[1:]):
        row["history kept"] = row["input_token_len"] >= prev["input_token_len"] + prev["reply tokens as history"]
    if rows:
        rows[0]["history kept"] = None
    return rows


def _free_partial(memory_before: int) -> None:
    """After a failed or interrupted pipeline(): collect what it left and wait (briefly) for its GPU memory."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
    wait_for_memory_release(memory_before, timeout=10)


_live = Engine._live  # name -> running Engine (labkit.live.Live keeps it)


def close_engine(name: str) -> bool:
    """Close the live engine called `name`, if any; True if one was closed."""
    return Engine.replace(name)


def close_all() -> None:
    """Close every engine this kernel started."""
    Engine.end_all()


def _explain(err: Exception, model_dir: Path, ratio: float) -> str:
    from labkit.diagnose import diagnose

    text = f"{type(err).__name__}: {err}"
    cause = diagnose(text, model_dir=model_dir, ratio=ratio, unknown="not recognised: see the error text")
    return f"the engine for {model_dir.name} failed to start: {text[:300]} (likely cause: {cause})"
