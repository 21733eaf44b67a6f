"""The widget playground (lab 06): chat with any labkit engine from sliders and buttons.

Works with `engine.Engine` (LMDeploy, GPU) and `baseline.HFEngine` (transformers, also CPU): both
have `.stream(messages, **gen)` yielding pieces with `.text`.
"""
from __future__ import annotations

import html
import time
from typing import Any
from labkit.errors import InputError

DEFAULT_SYSTEM = "You are a helpful assistant."


def default_engine(model: str, name: str = "playground", engine: str = "auto"):
    """An LMDeploy Engine where a CUDA GPU is usable (engine='auto'), else the transformers baseline."""
    from labkit.gpu import has_cuda

    if engine not in ("auto", "lmdeploy", "transformers"):
        raise InputError(f"engine must be 'auto', 'lmdeploy' or 'transformers', not {engine!r}")
    if engine == "lmdeploy" or (engine == "auto" and has_cuda()):
        from labkit.engine import Engine

        return Engine(model, name=name, cache_ratio=0.2)
    from labkit.baseline import HFEngine

    if engine == "auto":
        print("No CUDA GPU: the playground uses the transformers baseline on the CPU (slow, but it runs).")
    return HFEngine(model, name=name)


class Playground:
    """Prompt box, generation sliders, Send / Retry / Undo / Clear, and the conversation so far."""

    def __init__(self, engine: Any, system: str = DEFAULT_SYSTEM):
        import ipywidgets as w

        self.engine = engine
        self.history: list[dict] = []
        self.system = w.Text(value=system, description="system", layout=w.Layout(width="100%"))
        self.prompt = w.Textarea(placeholder="Ask something, then press Send", description="you",
                                 layout=w.Layout(width="100%", height="70px"))
        style = {"description_width": "140px"}
        self.max_new_tokens = w.IntSlider(256, 1, 2048, description="max_new_tokens", style=style)
        self.temperature = w.FloatSlider(0.8, min=0.0, max=2.0, step=0.05, description="temperature", style=style)
        self.top_p = w.FloatSlider(0.8, min=0.05, max=1.0, step=0.05, description="top_p", style=style)
        self.top_k = w.IntSlider(40, 0, 100, description="top_k (0 = off)", style=style)
        self.repetition_penalty = w.FloatSlider(1.0, min=0.8, max=2.0, step=0.05, description="repetition_penalty",
                                                style=style)
        self.seed = w.IntText(0, description="random_seed", style=style)
        buttons = {"Send": self.send, "Retry": self.retry, "Undo": self.undo, "Clear": self.clear}
        self.buttons = {}
        for label, fn in buttons.items():
            b = w.Button(description=label, button_style="primary" if label == "Send" else "")
            b.on_click(lambda _b, fn=fn: fn())
            self.buttons[label] = b
        self.chat = w.HTML(layout=w.Layout(border="1px solid #ddd", padding="6px", min_height="80px"))
        self.stats = w.Label()
        self.widget = w.VBox([
            self.system, self.chat, self.prompt, w.HBox(list(self.buttons.values())),
            w.HBox([w.VBox([self.max_new_tokens, self.temperature, self.top_p]),
                    w.VBox([self.top_k, self.repetition_penalty, self.seed])]),
            self.stats])
        self._render()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def gen_options(self) -> dict:
        """The generation options the sliders hold now."""
        return {"max_new_tokens": self.max_new_tokens.value, "temperature": self.temperature.value,
                "top_p": self.top_p.value, "top_k": self.top_k.value,
                "repetition_penalty": self.repetition_penalty.value, "random_seed": self.seed.value or None}

    def messages(self) -> list[dict]:
        """The conversation as OpenAI-style messages, system prompt first."""
        system = [{"role": "system", "content": self.system.value}] if self.system.value.strip() else []
        return system + self.history

    def _render(self, pending: str | None = None) -> None:
        rows = []
        turns = self.history + ([{"role": "assistant", "content": pending + " ▌"}] if pending is not None else [])
        for m in turns:
            who = "you" if m["role"] == "user" else "model"
            rows.append(f"<div><b>{who}:</b> {html.escape(m['content'])}</div>")
        self.chat.value = "".join(rows) or "<i>no messages yet</i>"

    def send(self, text: str | None = None) -> str:
        """Send the prompt box (or `text`), stream the reply into the chat, return it."""
        text = (text if text is not None else self.prompt.value).strip()
        if not text:
            self.stats.value = "type a prompt first"
            return ""
        typed = self.prompt.value
        self.history.append({"role": "user", "content": text})
        self.prompt.value = ""
        try:
            return self._reply()
        except BaseException:  # an error or an interrupt: keep the conversation as it was, give the text back
            self.history.pop()
            self.prompt.value = typed
            self._render()
            raise

    def _reply(self) -> str:
        """Stream a reply to the conversation and append it; on an error, say so and raise (callers undo)."""
        parts: list[str] = []
        tokens, reason = 0, None
        start = time.perf_counter()
        last_draw = 0.0
        try:
            for piece in self.engine.stream(self.messages(), **self.gen_options()):
                parts.append(piece.text or "")
                tokens = getattr(piece, "generate_token_len", 0) or tokens
                reason = getattr(piece, "finish_reason", None) or reason
                if time.perf_counter() - last_draw > 0.05:
                    self._render("".join(parts))
                    last_draw = time.perf_counter()
        except Exception as err:
            self.stats.value = f"error: {err}"
            raise
        reply = "".join(parts)
        seconds = time.perf_counter() - start
        self.history.append({"role": "assistant", "content": reply})
        self._render()
        self.stats.value = (f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds if seconds else 0:,.1f} tok/s), "
                            f"finish_reason={reason}")
        return reply

    def retry(self) -> str:
        """Drop the last reply and generate it again (the old one comes back if that fails)."""
        if not self.history or self.history[-1]["role"] != "assistant":
            self.stats.value = "nothing to retry"
            return ""
        removed = self.history.pop()
        try:
            return self._reply()
        except BaseException:  # an error or an interrupt: put the old reply back
            self.history.append(removed)
            self._render()
            raise

    def undo(self) -> None:
        """Remove the last exchange (your message and the reply)."""
        while self.history:
            if self.history.pop()["role"] == "user":
                break
        self._render()

    def clear(self) -> None:
        """Forget the conversation."""
        self.history.clear()
        self.stats.value = ""
        self._render()
