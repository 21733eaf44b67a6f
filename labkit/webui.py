"""A Gradio chat app over any OpenAI-compatible server (lab 02), since `lmdeploy serve gradio` is gone:
a model picker from /v1/models, sliders (max_new_tokens, top_p, top_k, temperature), Retry / Undo /
Clear, streamed replies. In a notebook `launch(url)` returns at once with a handle (url, close());
`labkit webui --api URL [--port P] [--share]` serves it as a standalone app.

Lab 05 adds an image upload for vision-language models (`vision=True`, automatic for a labkit Server
of one): a MultimodalTextbox whose images `check_upload` checks with labkit.vision before they are sent.

`ask` and `retry` drive a running app from code through gradio_client, the way a browser does:

    history = labkit.webui.ask(ui, "Describe this picture.", files=["chart.png"], max_new_tokens=64)
"""
from __future__ import annotations

import base64
import mimetypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULTS = {"max_new_tokens": 256, "top_p": 0.8, "top_k": 40, "temperature": 0.7}


def openai_base(api: Any) -> tuple[str, str]:
    """(…/v1 URL, api key) from a labkit Server, an http://host:port URL, or a …/v1 URL."""
    if hasattr(api, "openai_url"):
        return api.openai_url, getattr(api, "api_key", "none")
    url = str(api).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"api must be a URL like http://127.0.0.1:23333 (or a labkit Server), not {api!r}")
    return (url if url.endswith("/v1") else url + "/v1"), os.environ.get("OPENAI_API_KEY", "none")


def list_models(api: Any) -> list[str]:
    """The model names the server offers (/v1/models)."""
    from labkit.serve import openai_client

    return [m.id for m in openai_client(*openai_base(api)).models.list().data]


# ----------------------------------------------------------------------------- messages

def file_part(path: str | Path, mime: str | None = None) -> dict:
    """An OpenAI image part (data URL) for a local image file."""
    path = Path(path)
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def message_content(content: Any) -> str | list[dict]:
    """OpenAI message content from a Gradio chat message's content: text stays a string; files become
    image parts (a list of parts, for vision-language models)."""
    if isinstance(content, str):
        return content
    if _is_upload(content):  # gr.MultimodalTextbox's value (lab 05): {"text": ..., "files": [...]}
        content = _upload_items(content)
    items = content if isinstance(content, (list, tuple)) else [content]
    parts: list[dict] = []
    for item in items:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, dict) and item.get("type", "text") == "text" and "text" in item:
            parts.append({"type": "text", "text": item["text"]})
        elif isinstance(item, dict) and (item.get("type") == "file" or "path" in item):
            f = item.get("file", item)
            parts.append(file_part(f["path"], f.get("mime_type")))
        elif isinstance(item, dict) and item.get("type") in ("image_url", "input_image"):
            parts.append(item)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _is_upload(value: Any) -> bool:
    return isinstance(value, dict) and "files" in value and "type" not in value and "role" not in value


def _upload_items(value: dict) -> list:
    """A MultimodalTextbox value as chat content: the text, then each file as {"path": ...}."""
    files = [f if isinstance(f, dict) else {"path": str(f)} for f in value.get("files") or []]
    text = value.get("text") or ""
    return ([text] if text.strip() else []) + files


def check_upload(value: Any) -> str | list:
    """A user's upload (MultimodalTextbox value) as chat content, each image checked first (lab 05):
    a missing, empty, corrupt or non-image file raises labkit.vision.ImageError with what to do."""
    if not _is_upload(value):
        return value
    from labkit import vision

    items = _upload_items(value)
    for item in items:
        if isinstance(item, dict):
            vision.load(item["path"])
    return items[0] if len(items) == 1 and isinstance(items[0], str) else items


def build_messages(history: list[dict], message: Any = None, system: str | None = None) -> list[dict]:
    """OpenAI chat messages from a Gradio history (+ a new user message and an optional system prompt)."""
    out = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history or []:
        if m.get("role") in ("user", "assistant", "system"):
            out.append({"role": m["role"], "content": message_content(m.get("content", ""))})
    if message is not None:
        out.append({"role": "user", "content": message_content(message)})
    return out


def _text(content: Any) -> str:
    c = message_content(content)
    return c if isinstance(c, str) else " ".join(p.get("text", "[image]") for p in c)


# ----------------------------------------------------------------------------- the app

def stream_reply(api: Any, model: str, messages: list[dict], max_new_tokens: int = 256, top_p: float = 0.8,
                 top_k: int = 40, temperature: float = 0.7) -> Iterator[str]:
    """Stream a reply from the server: yields the text so far."""
    from labkit.serve import openai_client, stream_text

    stream = openai_client(*openai_base(api)).chat.completions.create(
        model=model, messages=messages, stream=True, max_tokens=int(max_new_tokens), top_p=float(top_p),
        temperature=float(temperature), extra_body={"top_k": int(top_k)})
    text = ""
    for piece in stream_text(stream):
        text += piece
        yield text


def build_app(api: Any, title: str = "LMDeploy Lab chat", vision: bool = False):
    """The Gradio Blocks app: model picker, chat, Send / Retry / Undo / Clear, sliders (+ image upload if vision)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    base, _key = openai_base(api)

    def fail(message: str) -> Exception:  # shown in the UI; the message says what to do, so no traceback
        return gr.Error(message, print_exception=False)

    def models_or_error() -> list[str]:
        try:
            return list_models(api)
        except Exception as err:  # the server is down or the URL is wrong: say so in the UI
            raise fail(f"cannot reach {base}/models ({type(err).__name__}): start the api_server "
                           f"or fix --api") from None

    def refresh():
        names = models_or_error()
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    def _reply(history, model, system, max_new_tokens, top_p, top_k, temperature):
        if not model:
            raise fail("pick a model first (the list comes from /v1/models)")
        messages = build_messages(history, None, system)
        history = history + [{"role": "assistant", "content": ""}]
        try:
            for text in stream_reply(api, model, messages, max_new_tokens, top_p, top_k, temperature):
                history[-1] = {"role": "assistant", "content": text}
                yield history
        except gr.Error:
            raise
        except Exception as err:
            raise fail(f"the server at {base} failed: {type(err).__name__}: {str(err)[:200]}") from None
        yield history

    def chat(message, history, model, system, max_new_tokens, top_p, top_k, temperature):
        if _is_upload(message):  # a vision model's input: text + images, each image checked before sending
            from labkit.vision import ImageError

            try:
                message = check_upload(message)
            except ImageError as err:
                raise fail(str(err)) from None
        if not message or isinstance(message, str) and not message.strip():
            raise fail("type a message first")
        history = (history or []) + [{"role": "user", "content": message}]
        for h in _reply(history, model, system, max_new_tokens, top_p, top_k, temperature):
            yield "", h

    def retry(history, model, system, max_new_tokens, top_p, top_k, temperature):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            raise fail("nothing to retry yet")
        yield from _reply(history, model, system, max_new_tokens, top_p, top_k, temperature)

    def undo(history):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        last = history.pop() if history else None
        return history, (_text(last["content"]) if last else "")

    def clear():
        return [], ""

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"### {title}\nServer: `{base}`")
        with gr.Row():
            model = gr.Dropdown(label="model (from /v1/models)", choices=[], scale=3)
            reload_btn = gr.Button("Reload models", scale=1)
        chatbot = gr.Chatbot(label="conversation", height=380)
        if vision:  # lab 05: a vision-language model gets an image upload next to the text
            msg = gr.MultimodalTextbox(label="you", file_types=["image"], file_count="multiple",
                                       placeholder="Attach pictures with the clip, ask about them, press Enter")
        else:
            msg = gr.Textbox(label="you", placeholder="Ask something and press Enter")
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary")
            retry_btn = gr.Button("Retry")
            undo_btn = gr.Button("Undo")
            clear_btn = gr.Button("Clear")
        with gr.Accordion("generation parameters", open=True):
            system = gr.Textbox(label="system prompt", value="")
            with gr.Row():
                max_new = gr.Slider(1, 4096, value=DEFAULTS["max_new_tokens"], step=1, label="max_new_tokens")
                top_p = gr.Slider(0.01, 1.0, value=DEFAULTS["top_p"], step=0.01, label="top_p")
                top_k = gr.Slider(0, 100, value=DEFAULTS["top_k"], step=1, label="top_k (0 = off)")
                temp = gr.Slider(0.0, 2.0, value=DEFAULTS["temperature"], step=0.05, label="temperature")
        params = [model, system, max_new, top_p, top_k, temp]
        send_btn.click(chat, [msg, chatbot, *params], [msg, chatbot], api_name="chat")
        msg.submit(chat, [msg, chatbot, *params], [msg, chatbot], api_visibility="private")
        retry_btn.click(retry, [chatbot, *params], [chatbot], api_name="retry")
        undo_btn.click(undo, [chatbot], [chatbot, msg], api_name="undo")
        clear_btn.click(clear, None, [chatbot, msg], api_name="clear")
        reload_btn.click(refresh, None, [model], api_name="models")
        app.load(refresh, None, [model], api_visibility="private")
    return app


class WebUI:
    """A running web UI: its url, the Gradio app, and close()."""

    def __init__(self, app, url: str, share_url: str | None = None):
        self.app, self.url, self.share_url = app, url, share_url

    def close(self) -> None:
        """Stop the web server."""
        if _live.get("webui") is self:
            _live.pop("webui")
        self.app.close()
        print(f"web UI at {self.url} closed")

    def __enter__(self) -> "WebUI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        share = f" · public link: <a href='{self.share_url}' target='_blank'>{self.share_url}</a>" \
            if self.share_url else ""
        return f"web UI: <a href='{self.url}' target='_blank'>{self.url}</a>{share}"

    def __repr__(self) -> str:
        return f"WebUI({self.url})"


_live: dict[str, WebUI] = {}


def launch(api_url: Any, port: int | None = None, block: bool = False, share: bool = False,
           host: str = "127.0.0.1", title: str = "LMDeploy Lab chat", vision: bool | None = None) -> WebUI:
    """Serve the chat app for `api_url` (a URL or a labkit Server); returns at once unless block=True.

    vision=None: an image upload appears when `api_url` is a labkit Server of a vision-language model."""
    from labkit.live import replace_earlier
    from labkit.serve import LOCAL_HOSTS, check_port, free_port, url_host

    openai_base(api_url)  # a bad URL fails here, before anything starts
    if vision is None:
        from labkit.vision import is_vision_model

        vision = hasattr(api_url, "model_dir") and is_vision_model(api_url.model_dir)
    replace_earlier(_live, "webui", "web UI")  # re-running the cell replaces the app
    if host not in LOCAL_HOSTS:
        print(f"WARNING: the web UI listens on {host}: anyone who can reach this machine can chat with the model")
    port = check_port(host, port) if port is not None else free_port(host)
    app = build_app(api_url, title=title, vision=vision)
    app.queue()
    server_name = f"[{host}]" if ":" in host else host  # gradio builds http://{server_name}:{port} itself
    _app, local_url, share_url = app.launch(server_name=server_name, server_port=port, share=share, inline=False,
                                            prevent_thread_lock=True, quiet=True, show_error=True)
    url = f"http://{url_host(host)}:{port}/"
    handle = WebUI(app, url, share_url)
    _live["webui"] = handle
    if block:
        print(f"web UI on {url}" + (f" (public: {share_url})" if share_url else "") + "; Ctrl-C stops it")
        try:
            app.block_thread()
        finally:
            handle.close()
    return handle


# ----------------------------------------------------------------------------- driving the app from code

def _ui_client(ui: Any):
    """A gradio_client.Client for a running app: a Client as it is, a WebUI handle, or the app's URL."""
    if hasattr(ui, "predict") and hasattr(ui, "submit"):
        return ui
    from gradio_client import Client

    return Client(str(getattr(ui, "url", ui)), verbose=False)


def _gen_args(gen: dict) -> list:
    """max_new_tokens, top_p, top_k, temperature in the app's order (DEFAULTS for those not given)."""
    unknown = set(gen) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generation parameter(s) {', '.join(sorted(unknown))}: "
                        f"the web UI has {', '.join(DEFAULTS)}")
    return [gen.get(k, v) for k, v in DEFAULTS.items()]


def pick_model(ui: Any) -> str | None:
    """Fill the app's model picker from /v1/models (as the page does when it opens); the model it selects.

    Through its /models API. The picker accepts only models it lists, and each client session has its own."""
    from labkit import deadline

    client = _ui_client(ui)
    picked = deadline.call(lambda: client.predict(api_name="/models"), None, "the web UI's /models", _UI_FIX)
    return picked.get("value") if isinstance(picked, dict) else picked


_UI_FIX = ("is the app still running (ui.url in a browser) and its server alive (server.alive, server.log_tail())? "
           "close the app (ui.close()) and start it again")


def ask(ui: Any, message: str, model: str | None = None, history: list | None = None, files: list | tuple = (),
        system: str = "", updates: list | None = None, timeout: float | None = None, **gen: Any) -> list:
    """Send `message` (+ image `files`) through the app's /chat API, as its Send button does; the history after.

    `ui`: a gradio_client.Client, a WebUI or the app's URL. The model picker is filled first (pick_model);
    model=None takes the model it selects. `gen`: max_new_tokens, top_p, top_k, temperature (else DEFAULTS).
    A list given as `updates` collects every streamed (textbox, history) update. A refusal (gr.Error in the
    app) raises gradio_client's error with the app's message; no answer within `timeout` s, a RequestTimeout."""
    from labkit import deadline

    client = _ui_client(ui)
    if files:
        from gradio_client import handle_file

        message = {"text": message, "files": [handle_file(str(f)) for f in files]}
    picked = pick_model(client)
    model = picked if model is None else model
    job = client.submit(message, list(history or []), model, system, *_gen_args(gen), api_name="/chat")

    def finish():
        if updates is not None:
            updates.extend(job)
        return job.result()[1]

    return deadline.call(finish, timeout, "the web UI's /chat", _UI_FIX)


def retry(ui: Any, history: list, model: str | None = None, system: str = "", timeout: float | None = None,
          **gen: Any) -> list:
    """Regenerate the last reply of `history` through the app's /retry API (its Retry button); the new history."""
    from labkit import deadline

    client = _ui_client(ui)
    picked = pick_model(client)
    model = picked if model is None else model
    return deadline.call(lambda: client.predict(list(history), model, system, *_gen_args(gen), api_name="/retry"),
                         timeout, "the web UI's /retry", _UI_FIX)


def _cli(args) -> int:
    try:
        launch(args.api, port=args.port, block=True, share=args.share, host=args.host, vision=args.vision)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def add_cli(sub) -> None:
    """`labkit webui --api URL [--port P] [--host H] [--share]`."""
    p = sub.add_parser("webui", help="a Gradio chat app over an OpenAI-compatible server (e.g. lmdeploy's)")
    p.add_argument("--api", required=True, help="the server, e.g. http://127.0.0.1:23333")
    p.add_argument("--port", type=int, default=None, help="port of the web UI (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link")
    p.add_argument("--vision", action="store_true", help="add an image upload (for a vision-language model)")
    p.set_defaults(func=_cli)
