"""The playground's widgets (ipywidgets): a model panel per configuration, a generation panel, the chat, the
compare tab and a GPU memory gauge. Each widget only reads or writes the controller; every button can be
clicked from Python (`view.buttons["Send"].click()`), which is what the tests do. CSS classes `lk-...`
name the widgets for the browser test.
"""
from __future__ import annotations

import html
import time
from typing import Any

from labkit.playground.configs import DEFAULT_SYSTEM, PRESETS, LoadConfig, awq_copies, engine_choices, one_line
from labkit.playground.controller import Controller

KV_POLICIES = [("fp16/bf16 KV (0)", 0), ("int8 KV (8)", 8), ("int4 KV (4)", 4)]
STYLE = {"description_width": "130px"}


def model_options() -> list[str]:
    """What the model box offers: the course catalogue and labkit's generated (and trained) models."""
    from labkit.generate import available
    from labkit.models import CATALOGUE

    return list(CATALOGUE) + [f"generated:{n}" for n in available() if n != "bench-1.5b"] + ["generated:bench-1.5b"]


def _w():
    import ipywidgets

    return ipywidgets


def _button(label: str, cls: str, style: str = "", tip: str = ""):
    b = _w().Button(description=label, button_style=style, tooltip=tip, layout=_w().Layout(width="auto"))
    b.add_class(cls)
    return b


class ModelPanel:
    """Model, engine, cache ratio, KV policy, session length, AWQ; the prediction; Load / Unload; progress."""

    def __init__(self, ctl: Controller, key: str, model: str, engine: str | None = None):
        w = _w()
        self.ctl, self.key = ctl, key
        choices = engine_choices()
        values = [v for _, v in choices]
        self.model = w.Combobox(value=model, options=model_options(), ensure_option=False, description="model",
                                continuous_update=False,
                                placeholder="a catalogue name, generated:NAME or a folder", style=STYLE,
                                layout=w.Layout(width="98%"))
        self.engine = w.Dropdown(options=choices, value=engine if engine in values else values[0],
                                 description="engine", style=STYLE)
        self.cache_ratio = w.FloatSlider(0.4, min=0.01, max=0.95, step=0.01, description="cache ratio", style=STYLE)
        self.quant_policy = w.Dropdown(options=KV_POLICIES, value=0, description="KV quant policy", style=STYLE)
        self.session_len = w.IntText(0, description="session_len (0: model's)", style=STYLE)
        self.awq = w.Checkbox(False, description="AWQ copy (lab 03)", disabled=True, style=STYLE)
        self.prediction = w.HTML()
        self.load_btn = _button(f"Load {key}", f"lk-load-{key}", "primary", "close what this slot holds, then load")
        self.unload_btn = _button(f"Unload {key}", f"lk-unload-{key}", "", "close the engine, free its memory")
        self.progress = w.IntProgress(0, min=0, max=100, layout=w.Layout(width="98%", visibility="hidden"))
        self.message = w.HTML()
        self.message.add_class(f"lk-slot-{key}")
        self.prediction.add_class(f"lk-plan-{key}")
        self.load_btn.on_click(lambda _b: self.load())
        self.unload_btn.on_click(lambda _b: self.unload())
        for box in (self.model, self.engine, self.cache_ratio, self.quant_policy, self.session_len, self.awq):
            box.observe(lambda _c: self.refresh_plan(), names="value")
        self.widget = w.VBox([self.model, self.engine, self.cache_ratio, self.quant_policy, self.session_len,
                              self.awq, self.prediction, w.HBox([self.load_btn, self.unload_btn]), self.progress,
                              self.message])
        self._started = 0.0
        self.refresh_plan()
        self.refresh()

    def config(self) -> LoadConfig:
        """The configuration the panel shows now."""
        return LoadConfig(self.model.value.strip(), self.engine.value, float(self.cache_ratio.value),
                          int(self.quant_policy.value), int(self.session_len.value) or None, bool(self.awq.value))

    def refresh_plan(self) -> None:
        """Show what this configuration will cost before it loads (or why it cannot load)."""
        from labkit.models import resolve

        try:
            self.awq.disabled = not awq_copies(resolve(self.model.value.strip(), download=False))
        except Exception:
            self.awq.disabled = True
        try:
            plan = self.ctl.plan(self.config())
            self.prediction.value = f"<small>predicted: {html.escape(plan.prediction)}</small>"
        except Exception as err:
            self.prediction.value = f"<small style='color:#b00'>{html.escape(one_line(err)[:400])}</small>"

    def load(self) -> None:
        """The Load button."""
        self._started = time.monotonic()
        self.ctl.load(self.config(), self.key)

    def unload(self) -> None:
        """The Unload button."""
        self.ctl.unload(self.key)

    def refresh(self) -> None:
        """Show the slot's state: message, progress while loading."""
        slot = self.ctl.slots[self.key]
        color = {"failed": "#b00", "ready": "#070"}.get(slot.state, "#444")
        extra = f" ({time.monotonic() - self._started:.0f} s)" if slot.state == "loading" else ""
        self.message.value = f"<span style='color:{color}'>{html.escape(slot.message)}{extra}</span>"
        loading = slot.state == "loading"
        self.progress.layout.visibility = "visible" if loading else "hidden"
        self.progress.value = int((time.monotonic() - self._started) * 20) % 101 if loading else 0
        self.load_btn.disabled = loading


class GenerationPanel:
    """max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, system prompt, presets."""

    def __init__(self, ctl: Controller):
        w = _w()
        self.ctl = ctl
        self.preset = w.Dropdown(options=["custom"] + list(PRESETS), value="custom", description="preset", style=STYLE)
        self.max_new_tokens = w.IntSlider(256, min=1, max=2048, description="max_new_tokens", style=STYLE)
        self.temperature = w.FloatSlider(0.8, min=0.0, max=2.0, step=0.05, description="temperature", style=STYLE)
        self.top_p = w.FloatSlider(0.8, min=0.05, max=1.0, step=0.05, description="top_p", style=STYLE)
        self.top_k = w.IntSlider(40, min=0, max=100, description="top_k (0: off)", style=STYLE)
        self.repetition_penalty = w.FloatSlider(1.0, min=0.8, max=2.0, step=0.05, description="repetition_penalty",
                                                style=STYLE)
        self.seed = w.IntText(0, description="random_seed (0: off)", style=STYLE)
        self.system = w.Textarea(value=ctl.system, description="system prompt", style=STYLE,
                                 layout=w.Layout(width="98%", height="60px"))
        self.max_new_tokens.add_class("lk-max-new-tokens")
        self.preset.observe(lambda c: self.apply(c["new"]), names="value")
        self.system.observe(lambda c: setattr(ctl, "system", c["new"]), names="value")
        self.widget = w.VBox([self.preset, self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                              self.repetition_penalty, self.seed, self.system])
        self.on_prompt = None  # set by the view: where a preset's prompt goes

    def options(self) -> dict:
        """The options the sliders hold now (read at each Send: no reload)."""
        return {"max_new_tokens": self.max_new_tokens.value, "temperature": self.temperature.value,
                "top_p": self.top_p.value, "top_k": self.top_k.value,
                "repetition_penalty": self.repetition_penalty.value, "random_seed": self.seed.value or None}

    def apply(self, name: str) -> None:
        """Set the sliders (and, for the story homework, the system prompt and the prompt) from a preset."""
        if name == "custom":
            return
        p = PRESETS[name]
        for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
            getattr(self, k).value = p[k]
        self.system.value = p.get("system", DEFAULT_SYSTEM)
        if p.get("prompt") and self.on_prompt is not None:
            self.on_prompt(p["prompt"])


class PlaygroundView:
    """The whole playground: model + generation panels on the left, Chat and Compare tabs on the right."""

    def __init__(self, ctl: Controller, model: str, engine: str | None = None, model_b: str | None = None,
                 engine_b: str | None = None):
        w = _w()
        self.ctl = ctl
        self.panel_a = ModelPanel(ctl, "A", model, engine)
        self.panel_b = ModelPanel(ctl, "B", model_b or model, engine_b or engine)
        if self.panel_b.engine.value != "transformers":
            self.panel_b.quant_policy.value = 8  # something to compare on LMDeploy: the same model with int8 KV
        self.gen = GenerationPanel(ctl)
        self.status = w.HTML()
        self.status.add_class("lk-status")
        self.gauge = w.FloatProgress(0, min=0, max=1, description="GPU memory", style=STYLE)
        self.gauge_label = w.Label()
        self.gauge_label.add_class("lk-gauge")
        # chat
        self.chat = w.HTML(layout=w.Layout(border="1px solid #ddd", padding="6px", min_height="160px",
                                           max_height="420px", overflow="auto", width="98%"))
        self.chat.add_class("lk-chat")
        self.prompt = w.Textarea(placeholder="Ask something, then press Send", layout=w.Layout(width="98%",
                                                                                                height="70px"))
        self.prompt.add_class("lk-prompt")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="image")
        self.image_cost = w.HTML()
        self.image_cost.add_class("lk-image-cost")
        self.image_row = w.HBox([self.upload, self.image_cost], layout=w.Layout(display="none"))
        self.upload.observe(lambda c: self.attach(), names="value")
        self.panel_a.model.observe(lambda c: self.show_image_row(), names="value")
        actions = {"Send": self.send, "Stop": ctl.stop, "Retry": self.retry, "Undo": ctl.undo, "Clear": ctl.clear,
                   "Copy": self.copy}
        self.buttons = {}
        for label, fn in actions.items():
            b = _button(label, f"lk-{label.lower()}", "primary" if label == "Send" else
                        ("danger" if label == "Stop" else ""))
            b.on_click(lambda _b, fn=fn: self._safely(fn))
            self.buttons[label] = b
        self.stats = w.HTML()
        self.stats.add_class("lk-stats")
        self.copy_box = w.Textarea(layout=w.Layout(width="98%", height="60px", display="none"))
        self.copy_box.add_class("lk-copy-box")
        self.js = w.Output(layout=w.Layout(display="none"))
        chat_tab = w.VBox([self.chat, self.image_row, self.prompt, w.HBox(list(self.buttons.values())), self.stats,
                           self.copy_box, self.js])
        # compare
        self.compare_prompt = w.Textarea(value="Write one sentence about the sea.", layout=w.Layout(width="98%"))
        self.compare_prompt.add_class("lk-compare-prompt")
        self.buttons["Compare"] = _button("Compare A and B", "lk-compare", "primary", "same prompt, both configs")
        self.buttons["Compare"].on_click(lambda _b: self._safely(self.compare))
        self.columns = {k: w.HTML(layout=w.Layout(width="49%", border="1px solid #ddd", padding="4px"))
                        for k in "AB"}
        for k, col in self.columns.items():
            col.add_class(f"lk-compare-{k}")
        self.chart = w.Image(format="png", layout=w.Layout(width="98%"))
        self.chart.add_class("lk-chart")
        compare_tab = w.VBox([w.HTML("<b>Configuration B</b> (A is the chat's, on the left)"), self.panel_b.widget,
                              self.compare_prompt, self.buttons["Compare"], w.HBox(list(self.columns.values())),
                              self.chart])
        self.tabs = w.Tab([chat_tab, compare_tab])
        self.tabs.set_title(0, "Chat")
        self.tabs.set_title(1, "Compare")
        left = w.Accordion([self.panel_a.widget, self.gen.widget], layout=w.Layout(width="36%"))
        left.set_title(0, "Model (configuration A)")
        left.set_title(1, "Generation")
        left.selected_index = 1
        self.gen.on_prompt = lambda text: setattr(self.prompt, "value", text)
        self.widget = w.VBox([w.HBox([w.HTML("<b>LMDeploy Lab playground</b>"), self.gauge, self.gauge_label]),
                              self.status, w.HBox([left, w.VBox([self.tabs], layout=w.Layout(width="63%"))])])
        self.widget.add_class("lk-playground")
        self._last_draw = 0.0
        ctl.listeners.append(self.on_event)
        self.on_event("status"), self.on_event("gauge"), self.on_event("chat"), self.show_image_row()

    # --------------------------------------------------------------------------- buttons
    def _safely(self, fn) -> None:
        try:
            fn()
        except Exception as err:  # shown in the panel, never as a hidden traceback
            self.ctl._say(one_line(err), error=True)

    def send(self) -> None:
        """The Send button: the prompt box with the generation panel's options."""
        text = self.prompt.value
        self.prompt.value = ""  # before the reply starts: a failed Send puts it back (controller.returned)
        if self.ctl.send(text, self.gen.options()) is None:
            self.prompt.value = text

    def retry(self) -> None:
        """The Retry button."""
        self.ctl.retry(self.gen.options())

    def copy(self) -> None:
        """The Copy button: the last reply into the copy box (selected) and, where the browser allows, the clipboard."""
        import json

        from IPython.display import Javascript, display

        text = self.ctl.last_reply()
        if not text:
            self.ctl._say("nothing to copy yet", error=True)
            return
        self.copy_box.value = text
        self.copy_box.layout.display = ""
        self.js.clear_output()
        with self.js:
            display(Javascript(f"navigator.clipboard && navigator.clipboard.writeText({json.dumps(text)})"))
        self.ctl._say("copied the last reply (also in the box below)")

    def compare(self) -> None:
        """The Compare button."""
        self.ctl.compare(self.compare_prompt.value, self.gen.options())

    def attach(self) -> None:
        """An image was uploaded: attach it and show its token cost before sending."""
        files = self.upload.value
        if not files:
            return
        data = bytes(files[0]["content"])
        try:
            self.image_cost.value = html.escape(self.ctl.attach_image(data))
        except Exception as err:
            self.image_cost.value = f"<span style='color:#b00'>{html.escape(one_line(err))}</span>"

    def show_image_row(self) -> None:
        """The image upload shows when configuration A's model is a vision-language model."""
        from labkit.models import resolve
        from labkit.vision import is_vision_model

        try:
            vl = is_vision_model(resolve(self.panel_a.model.value.strip(), download=False))
        except Exception:
            vl = False
        self.image_row.layout.display = "" if vl else "none"

    # --------------------------------------------------------------------------- drawing
    def on_event(self, event: str) -> None:
        """Redraw what an event changed (called from the controller's threads too)."""
        if event == "piece":
            if time.perf_counter() - self._last_draw < 0.05:
                return
            self._last_draw = time.perf_counter()
            self.draw_chat()
        elif event == "chat":
            self.draw_chat()
            if self.ctl.returned is not None and not self.prompt.value:  # a failed Send gives the typed text back
                self.prompt.value, self.ctl.returned = self.ctl.returned, None
        elif event == "status":
            color = "#b00" if self.ctl.error else "#333"
            self.status.value = f"<span style='color:{color}'>{html.escape(self.ctl.status)}</span>"
            if self.ctl.replies and not self.ctl.error:
                self.stats.value = html.escape(self.ctl.replies[-1].summary())
        elif event == "slot":
            self.panel_a.refresh(), self.panel_b.refresh()
            self.show_image_row()
        elif event == "gauge":
            self.draw_gauge()
            self.panel_a.refresh(), self.panel_b.refresh()
        elif event == "compare":
            self.draw_compare()

    def draw_chat(self) -> None:
        """The conversation, with the reply being streamed."""
        rows = []
        for m in self.ctl.history:
            who = "you" if m["role"] == "user" else "model"
            stats = f"<br><small style='color:#777'>{html.escape(m['reply'].summary())}</small>" if "reply" in m else ""
            rows.append(f"<div class='lk-msg lk-{m['role']}'><b>{who}:</b> {_content(m['content'])}{stats}</div>")
        if self.ctl.pending is not None:
            rows.append(f"<div class='lk-msg lk-pending'><b>model:</b> {html.escape(self.ctl.pending)} ▌</div>")
        self.chat.value = "".join(rows) or "<i>no messages yet</i>"

    def draw_gauge(self) -> None:
        """GPU memory in use now (all processes), or 'no GPU'."""
        reading = self.ctl.gauge()
        if reading is None:
            self.gauge.value, self.gauge_label.value = 0, "no GPU (CPU run)"
            return
        used, total = reading
        self.gauge.max, self.gauge.value = total, used
        self.gauge_label.value = f"{used:.1f} / {total:.0f} GiB"

    def draw_compare(self) -> None:
        """The last run's replies side by side, and the bar chart of every run so far."""
        last = self.ctl.compares[-1]["run"]
        for row in self.ctl.compares:
            if row["run"] == last:
                mem = f"{row['memory_gib']:.2f} GiB" if row["memory_gib"] else "no GPU"
                self.columns[row["slot"]].value = (
                    f"<b>{row['slot']}: {html.escape(row['config'])}</b><br>{row['tokens_per_s']:,.1f} tok/s · "
                    f"first token {_ms(row['ttft_s'])} · {row['reply_tokens']} tokens · memory {mem}<hr>"
                    f"{html.escape(row['text'])}")
        self.chart.value = chart_png(self.ctl.compares)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _content(content: Any) -> str:
    if isinstance(content, str):
        return html.escape(content)
    parts = [html.escape(p["text"]) if p.get("type") == "text" else "<i>[image]</i>" for p in content]
    return " ".join(parts)


def chart_png(rows: list[dict]) -> bytes:
    """A bar chart (PNG) of every compare run: tokens/s per configuration, and GPU memory where there is one."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    labels = [f"{r['run']}{r['slot']}: {r['config']}" for r in rows]
    has_mem = any(r["memory_gib"] for r in rows)
    fig = Figure(figsize=(7, 0.4 * len(rows) + 1.2))
    axes = fig.subplots(1, 2 if has_mem else 1, squeeze=False)[0]
    colors = ["#4c72b0" if r["slot"] == "A" else "#dd8452" for r in rows]
    axes[0].barh(labels, [r["tokens_per_s"] for r in rows], color=colors)
    axes[0].set_xlabel("tokens/s")
    axes[0].invert_yaxis()
    if has_mem:
        axes[1].barh(labels, [r["memory_gib"] or 0 for r in rows], color=colors)
        axes[1].set_xlabel("GPU memory GiB")
        axes[1].set_yticks([])
        axes[1].invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()
