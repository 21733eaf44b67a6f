"""The playground's controller: what is loaded (configurations A and B), the conversation, and the work
(load, unload, send, stop, retry, undo, compare), each long step in a background thread so the kernel
stays free for the Stop button. The view (labkit.playground.view) only turns widgets into calls here;
the tests drive the same calls. Engines are labkit's own: `engine.Engine` (LMDeploy) and
`baseline.HFEngine` (transformers); memory predictions are `kvcache.predict`, image costs `labkit.vision`,
reply speed `show.stream_to_notebook`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.playground.configs import (DEFAULT_SYSTEM, ENGINES, GEN_KEYS, PRESETS, LoadConfig, Plan, PlaygroundError,
                                     build_engine, make_plan, one_line)


@dataclass
class Slot:
    """A loaded (or loading, or failed) configuration."""

    key: str
    state: str = "empty"            # empty, loading, ready, failed
    config: LoadConfig | None = None
    plan: Plan | None = None
    engine: Any = None
    message: str = "nothing loaded: pick a model and press Load"
    load_seconds: float = 0.0


@dataclass
class Reply:
    """One reply and how it came: tokens, time to first token, speed, why it ended, memory."""

    text: str
    prompt_tokens: int | None
    reply_tokens: int
    ttft_s: float | None
    tokens_per_s: float
    seconds: float
    finish_reason: str | None
    config: str
    memory_gib: float | None = None
    peak_gib: float | None = None

    def summary(self) -> str:
        """One line for the panel."""
        first = f"{self.ttft_s * 1000:,.0f} ms" if self.ttft_s is not None else "-"
        mem = f" · engine {self.memory_gib:.2f} GiB of GPU memory" if self.memory_gib else ""
        if self.peak_gib is not None:
            mem += f" (+{self.peak_gib * 1024:,.0f} MiB at the reply's peak)"
        return (f"{self.prompt_tokens if self.prompt_tokens is not None else '?'} prompt + {self.reply_tokens} reply "
                f"tokens · first token {first} · {self.tokens_per_s:,.1f} tok/s · finish_reason={self.finish_reason}"
                f"{mem}")


class Controller:
    """State and work of one playground: slots A (the chat's) and B (compare), the conversation, the last replies."""

    def __init__(self, name: str = "playground", system: str = DEFAULT_SYSTEM):
        from labkit.gpu import memory_used_or_none

        self.name = name
        self.system = system
        self.slots = {"A": Slot("A"), "B": Slot("B")}
        self.history: list[dict] = []
        self.replies: list[Reply] = []
        self.compares: list[dict] = []
        self.image: Any = None
        self.status = "ready"
        self.error: str | None = None
        self.pending: str | None = None
        self.returned: str | None = None
        self.listeners: list[Callable[[str], None]] = []
        self.baseline_memory = memory_used_or_none()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- plumbing
    def notify(self, event: str) -> None:
        """Tell the view something changed ('slot', 'chat', 'piece', 'compare', 'status', 'gauge')."""
        for fn in list(self.listeners):
            try:
                fn(event)
            except Exception:  # a view that fails must not break the work
                pass

    @property
    def busy(self) -> bool:
        """True while a load, reply or compare runs."""
        return self._thread is not None and self._thread.is_alive()

    def _say(self, text: str, error: bool = False) -> None:
        self.status, self.error = text, (text if error else None)
        self.notify("status")

    def _run(self, what: str, fn: Callable[[], Any], wait: bool) -> threading.Thread | None:
        with self._lock:
            if self.busy:
                self._say(f"busy ({self.status}): wait for it, or press Stop", error=True)
                return None
            self._stop.clear()
            self.error = None

            def body():
                threading.Thread(target=self._tick, daemon=True, name="labkit-playground-gauge").start()
                try:
                    fn()
                except BaseException as err:  # shown in the panel; the playground stays usable
                    self._say(f"{what} failed: {one_line(err)}", error=True)
                finally:
                    self.pending = None
                    self.notify("gauge")
                    self.notify("chat")

            self._thread = threading.Thread(target=body, daemon=True, name=f"labkit-playground-{what}")
            self._thread.start()
        if wait:
            self.wait()
        return self._thread

    def _tick(self) -> None:
        """Redraw the GPU gauge (and a load's progress) twice a second while work runs."""
        while self.busy:
            self.notify("gauge")
            time.sleep(0.5)

    def wait(self, timeout: float | None = 600) -> None:
        """Wait until the running load / reply / compare is done (notebooks and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        """Stop the reply being generated (the engine stops too, not only the reading)."""
        self._stop.set()
        if self.busy:
            self._say("stopping ...")

    # ----------------------------------------------------------------------------- loading
    def plan(self, cfg: LoadConfig) -> Plan:
        """The checked plan for a configuration (no download, nothing loaded)."""
        return make_plan(cfg)

    def load(self, cfg: LoadConfig, key: str = "A", wait: bool = False) -> threading.Thread | None:
        """Load a configuration into slot `key` in the background, closing what the slot held first."""
        slot = self.slots[key]

        def work():
            self._close_slot(slot, f"closing the previous engine ({slot.config.label() if slot.config else ''})")
            slot.state, slot.config, slot.message = "loading", cfg, f"checking {cfg.label()} ..."
            self.notify("slot")
            try:
                slot.plan = make_plan(cfg, download=True)
                slot.message = f"loading {slot.plan.model_dir.name} on {ENGINES[slot.plan.engine]} ..."
                self._say(slot.message)
                self.notify("slot")
                start = time.perf_counter()
                slot.engine = build_engine(slot.plan, f"{self.name}-{key}")
                slot.load_seconds = time.perf_counter() - start
                slot.engine.generate("hi", max_new_tokens=1, temperature=0)  # warm-up: first replies time fairly
            except BaseException as err:
                slot.state, slot.engine = "failed", None
                slot.message = f"load failed: {one_line(err)}"
                self.notify("slot")
                raise
            slot.state = "ready"
            mem = getattr(slot.engine, "memory_gib", 0.0)
            slot.message = (f"loaded {slot.plan.model_dir.name} on {ENGINES[slot.plan.engine]} in "
                            f"{slot.load_seconds:.1f} s" + (f", {mem:.2f} GiB of GPU memory" if mem else ""))
            self._say(slot.message)
            self.notify("slot")

        return self._run(f"load {key}", work, wait)

    def _close_slot(self, slot: Slot, note: str) -> None:
        if slot.engine is not None:
            self._say(note)
            try:
                slot.engine.close()
            finally:
                slot.engine = None

    def unload(self, key: str = "A") -> str:
        """Close slot `key`'s engine and free its memory; returns what the panel says."""
        if self.busy:
            self.stop()
            self.wait(60)
        slot = self.slots[key]
        had = slot.engine is not None
        self._close_slot(slot, f"unloading {key} ...")
        slot.state, slot.message = "empty", ("unloaded: memory freed; press Load to start again" if had
                                             else "nothing loaded: pick a model and press Load")
        self._say(slot.message)
        self.notify("slot")
        self.notify("gauge")
        return slot.message

    def close(self) -> None:
        """Unload both configurations (the notebook's last cell, run by hand)."""
        for key in self.slots:
            self.unload(key)

    def _ready(self, key: str) -> Slot:
        slot = self.slots[key]
        if slot.state == "loading":
            raise PlaygroundError(f"configuration {key} is still loading: wait for it")
        if slot.engine is None:
            raise PlaygroundError(f"configuration {key} is not loaded: pick a model and press Load"
                                  + (" B (Compare tab)" if key == "B" else ""))
        if getattr(slot.engine, "closed", False):
            raise PlaygroundError(f"configuration {key}'s engine was closed outside the playground: press Load to "
                                  f"start it again")
        return slot

    # ----------------------------------------------------------------------------- chat
    def messages(self, history: list[dict] | None = None) -> list[dict]:
        """The conversation as OpenAI-style messages, system prompt first."""
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        turns = self.history if history is None else history
        return system + [{"role": m["role"], "content": m["content"]} for m in turns]  # without the reply stats

    def attach_image(self, image: Any) -> str:
        """Attach an image (path, bytes or PIL image) to the next message; returns its token cost line."""
        from labkit import vision

        model_dir, session_len = self._vision_target()
        if model_dir is None or not vision.is_vision_model(model_dir):
            raise PlaygroundError("configuration A reads text only: pick a vision-language model "
                                  "(e.g. generated:tiny-vl, InternVL3-1B-hf) to send images")
        img = vision.load(image)
        cost = vision.token_cost(model_dir, img)
        fit = vision.fits(model_dir, img, session_len)
        self.image = img
        return f"image {img.size[0]}x{img.size[1]}: {cost:,} image tokens; {fit.why}"

    def _vision_target(self) -> tuple[Path | None, int]:
        """(model folder, session_len) that an image is priced for: slot A's plan, else its configuration."""
        from labkit.kvcache import text_config
        from labkit.models import resolve

        slot = self.slots["A"]
        if slot.plan is not None:
            return slot.plan.model_dir, slot.plan.session_len
        if slot.config is None:
            return None, 0
        model_dir = resolve(slot.config.model, download=False)
        return model_dir, slot.config.session_len or int(text_config(model_dir).get("max_position_embeddings") or 4096)

    def send(self, text: str, gen: dict, wait: bool = False) -> threading.Thread | None:
        """Send `text` (and the attached image) with generation options `gen`; the reply streams in the background."""
        text = text.strip()
        if not text:
            self._say("type a prompt first", error=True)
            return None
        content: Any = text
        if self.image is not None:
            slot = self.slots["A"]
            if slot.plan is not None and slot.plan.engine == "transformers":
                self._say("the transformers baseline sends text only: load the model on an LMDeploy engine "
                          "to send the image", error=True)
                return None
            from labkit.vision import user_message

            content = user_message(text, self.image)["content"]
        turn = {"role": "user", "content": content}

        def work():
            self.history.append(turn)
            self.notify("chat")
            try:
                reply = self._reply("A", self.messages(), gen)
            except BaseException:
                self.history.remove(turn)  # a failed Send keeps the conversation as it was
                self.returned = text       # and gives the typed text back to the prompt box
                raise
            self.image = None
            self.history.append({"role": "assistant", "content": reply.text, "reply": reply})

        return self._run("send", work, wait)

    def retry(self, gen: dict, wait: bool = False) -> threading.Thread | None:
        """Generate the last reply again (the old one comes back if that fails)."""
        if not self.history or self.history[-1]["role"] != "assistant":
            self._say("nothing to retry: send a message first", error=True)
            return None

        def work():
            removed = self.history.pop()
            self.notify("chat")
            try:
                reply = self._reply("A", self.messages(), gen)
            except BaseException:
                self.history.append(removed)
                raise
            self.history.append({"role": "assistant", "content": reply.text, "reply": reply})

        return self._run("retry", work, wait)

    def undo(self) -> None:
        """Remove the last exchange (your message and the reply)."""
        if self.busy:
            self._say("busy: press Stop first", error=True)
            return
        while self.history:
            if self.history.pop()["role"] == "user":
                break
        self._say("removed the last exchange")
        self.notify("chat")

    def clear(self) -> None:
        """Forget the conversation and the attached image."""
        if self.busy:
            self._say("busy: press Stop first", error=True)
            return
        self.history.clear()
        self.image = None
        self._say("conversation cleared")
        self.notify("chat")

    def last_reply(self) -> str:
        """The last reply's text (what Copy copies)."""
        return next((m["content"] for m in reversed(self.history) if m["role"] == "assistant"), "")

    def _reply(self, key: str, messages: list[dict], gen: dict) -> Reply:
        from labkit.gpu import MemoryWatcher
        from labkit.show import stream_to_notebook

        slot = self._ready(key)
        options = {k: gen[k] for k in GEN_KEYS if k in gen}
        pieces = slot.engine.stream(messages, stop=self._stop, **options)  # bad options fail here
        self.pending = ""
        self._say(f"{key} is generating ...")

        def watched():
            for piece in pieces:
                self.pending += piece.text or ""
                self.notify("piece")
                yield piece
                if self._stop.is_set():
                    break

        try:
            with MemoryWatcher(interval=0.1) as watch:  # what the reply adds at its peak (no-op without a GPU)
                result = stream_to_notebook(watched(), show=False)
        finally:
            pieces.close() if hasattr(pieces, "close") else None
        reason = "stopped" if self._stop.is_set() else result.finish_reason
        mem = getattr(slot.engine, "memory_gib", 0.0) or None
        peak = (watch.peak - watch.baseline) / 2**30 if watch.peak else None
        reply = Reply(result.text, result.input_tokens, result.tokens, result.ttft_s, result.tokens_per_s,
                      result.seconds, reason, slot.config.label(), mem, peak)
        self.replies.append(reply)
        self._say(f"{key}: {reply.summary()}")
        return reply

    # ----------------------------------------------------------------------------- compare
    def compare(self, text: str, gen: dict, wait: bool = False) -> threading.Thread | None:
        """The same prompt through A and B, one after the other; a row per configuration in `compares`."""
        text = text.strip()
        if not text:
            self._say("type a prompt to compare first", error=True)
            return None

        def work():
            self._ready("A"), self._ready("B")
            run = 1 + max((r["run"] for r in self.compares), default=0)
            for key in "AB":
                reply = self._reply(key, self.messages([{"role": "user", "content": text}]), gen)
                self.compares.append({"run": run, "slot": key, **asdict(reply)})
                self.notify("compare")
                if self._stop.is_set():
                    break
            self._say(f"compared A and B (run {run})")

        return self._run("compare", work, wait)

    def compare_table(self):
        """Every compare row so far as a table (config, tok/s, first token, tokens, memory)."""
        import pandas as pd

        cols = ["run", "slot", "config", "tokens_per_s", "ttft_s", "prompt_tokens", "reply_tokens",
                "finish_reason", "memory_gib"]
        return pd.DataFrame(self.compares, columns=cols + ["text"])[cols]

    def gauge(self) -> tuple[float, float] | None:
        """(used GiB, total GiB) of GPU 0 now, or None without a GPU."""
        from labkit.gpu import gpus

        found = gpus()
        return (found[0].used_gib, found[0].total_gib) if found else None

    def with_preset(self, gen: dict, preset: str) -> dict:
        """`gen` with a preset's options over it; PlaygroundError for an unknown preset."""
        if preset not in PRESETS:
            raise PlaygroundError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        return {**gen, **{k: v for k, v in PRESETS[preset].items() if k in GEN_KEYS}}
