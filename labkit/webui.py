"""A Gradio chat app over any OpenAI-compatible server (lab 02), since `lmdeploy serve gradio` is gone:
a model picker from /v1/models, sliders (max_new_tokens, top_p, top_k, temperature), Retry / Undo /
Clear, streamed replies. In a notebook `launch(url)` returns at once with a handle (url, close());
`labkit webui --api URL [--port P] [--share]` serves it as a standalone app.

Lab 05 adds an image upload for vision-language models (`vision=True`, automatic for a labkit Server
of one): a MultimodalTextbox whose images `check_upload` checks with labkit.vision before they are sent.

`ask` and `retry` drive a running app from code through gradio_client, the way a browser does:

    chat = labkit.webui.ask(ui, "Describe this picture.", files=["chart.png"], max_new_tokens=64)

Nothing a client sends makes the app read a file it names: the conversation stays on the server (gr.State,
one per session; no API takes a history), uploads are accepted only from Gradio's upload folder (symlinks
and `..` resolved), and a UI that other machines can reach (--share, a non-loopback host) needs a password.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

from labkit.errors import InputError, LabkitError
from labkit.live import Live
from labkit.webui_client import (DEFAULTS, UnknownParameterError, _ui_client, ask, pick_model,  # noqa: F401
                                 retry)  # driving the app from code, under the names notebooks 02 and 05 use
from labkit.webui_files import (UploadError, _is_upload, _text, build_messages, check_history,  # noqa: F401
                                check_upload, file_part, message_content, upload_dir, uploaded_file)


class AuthError(InputError):
    """A web UI open to other machines (--share, a non-loopback host) without a password."""


def openai_base(api: Any) -> tuple[str, str]:
    """(…/v1 URL, api key) from a labkit Server, an http://host:port URL, or a …/v1 URL."""
    if hasattr(api, "openai_url"):
        return api.openai_url, getattr(api, "api_key", "none")
    url = str(api).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"api must be a URL like http://127.0.0.1:23333 (or a labkit Server), not {api!r}")
    return (url if url.endswith("/v1") else url + "/v1"), os.environ.get("OPENAI_API_KEY", "none")


def list_models(api: Any) -> list[str]:
    """The model names the server offers (/v1/models)."""
    from labkit.net import openai_client

    return [m.id for m in openai_client(*openai_base(api)).models.list().data]


# ----------------------------------------------------------------------------- the app

def stream_reply(api: Any, model: str, messages: list[dict], max_new_tokens: int = 256, top_p: float = 0.8,
                 top_k: int = 40, temperature: float = 0.7) -> Iterator[str]:
    """Stream a reply from the server: yields the text so far."""
    from labkit.net import openai_client, stream_text

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

    # The conversation lives on the server (gr.State, one per browser session): no API takes a history, so
    # a client cannot name a file through one. The Chatbot only shows it.
    def _reply(history, model, system, max_new_tokens, top_p, top_k, temperature):
        if not model or not isinstance(model, str):
            raise fail("pick a model first (the list comes from /v1/models)")
        try:
            messages = build_messages(history, None, system, uploads=upload_dir())
        except UploadError as err:
            raise fail(str(err)) from None
        history = history + [{"role": "assistant", "content": ""}]
        try:
            for text in stream_reply(api, model, messages, max_new_tokens, top_p, top_k, temperature):
                history[-1] = {"role": "assistant", "content": text}
                yield history, history
        except gr.Error:
            raise
        except Exception as err:
            raise fail(f"the server at {base} failed: {type(err).__name__}: {str(err)[:200]}") from None
        yield history, history

    def chat(message, history, model, system, max_new_tokens, top_p, top_k, temperature):
        history = list(history or [])
        if _is_upload(message):  # a vision model's input: text + images, each image checked before sending
            from labkit.vision import ImageError

            try:
                message = check_upload(message, upload_dir())
            except (ImageError, UploadError) as err:
                raise fail(str(err)) from None
        elif not isinstance(message, str):
            raise fail("the message must be text (pictures go through the clip of a vision model's UI)")
        if not message or isinstance(message, str) and not message.strip():
            raise fail("type a message first")
        history = history + [{"role": "user", "content": message}]
        for shown, kept in _reply(history, model, system, max_new_tokens, top_p, top_k, temperature):
            yield "", shown, kept

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
        return history, history, (_text(last["content"]) if last else "")

    def clear():
        return [], [], ""

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
        conversation = gr.State([])  # server-side; clients cannot set it
        send_btn.click(chat, [msg, conversation, *params], [msg, chatbot, conversation], api_name="chat")
        msg.submit(chat, [msg, conversation, *params], [msg, chatbot, conversation], api_visibility="private")
        retry_btn.click(retry, [conversation, *params], [chatbot, conversation], api_name="retry")
        undo_btn.click(undo, [conversation], [chatbot, conversation, msg], api_name="undo")
        clear_btn.click(clear, None, [chatbot, conversation, msg], api_name="clear")
        reload_btn.click(refresh, None, [model], api_name="models")
        app.load(refresh, None, [model], api_visibility="private")
    return app


class WebUI(Live):
    """A running web UI: its url, the Gradio app, and close()."""

    kind = "web UI"
    name = "webui"  # one web UI per kernel: launching again replaces it

    def __init__(self, app, url: str, share_url: str | None = None, auth: tuple[str, str] | None = None):
        self.app, self.url, self.share_url, self.auth = app, url, share_url, auth
        self._client = None  # the gradio_client session that ask / retry use

    def gradio_session(self):
        """The gradio_client.Client that ask / retry share for this app (made on first use)."""
        if self._client is None:
            from gradio_client import Client

            self._client = Client(self.url, verbose=False, auth=self.auth)
        return self._client

    def close(self) -> None:
        """Stop the web server."""
        self._forget()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
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


_live = WebUI._live  # "webui" -> the running app (labkit.live.Live keeps it)


def check_auth(share: bool, host: str, auth: Any, no_auth_i_understand: bool = False) -> tuple[str, str] | None:
    """(user, password) from "USER:PASS" or a pair; AuthError when the UI is open to others (share, a
    non-loopback host) without one, unless no_auth_i_understand."""
    if isinstance(auth, str):
        user, sep, password = auth.partition(":")
        if not (sep and user and password):
            raise AuthError(f"auth must look like USER:PASS, not {auth!r}")
        auth = (user, password)
    elif auth is not None:
        if not (isinstance(auth, (tuple, list)) and len(auth) == 2 and all(isinstance(a, str) and a for a in auth)):
            raise AuthError("auth must be 'USER:PASS' or a (user, password) pair of non-empty strings")
        auth = (auth[0], auth[1])
    if auth is None and not no_auth_i_understand and (share or not is_loopback(host)):
        where = "a public gradio.live link (share)" if share else f"host {host!r} (other machines can reach it)"
        raise AuthError(f"refusing to serve the web UI on {where} without a password: anyone who finds it can "
                        f"chat with your model on your GPU; pass auth='USER:PASS' (CLI: --auth USER:PASS), "
                        f"or no_auth_i_understand=True (--no-auth-i-understand)")
    return auth


def is_loopback(host: str) -> bool:
    """True for names and addresses of this machine only (localhost, 127.x, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def launch(api_url: Any, port: int | None = None, block: bool = False, share: bool = False,
           host: str = "127.0.0.1", title: str = "LMDeploy Lab chat", vision: bool | None = None,
           auth: str | tuple[str, str] | None = None, no_auth_i_understand: bool = False) -> WebUI:
    """Serve the chat app for `api_url` (a URL or a labkit Server); returns at once unless block=True.

    vision=None: an image upload appears when `api_url` is a labkit Server of a vision-language model.
    share=True or a host other machines reach needs auth="USER:PASS" (or no_auth_i_understand=True)."""
    from labkit.net import check_port, free_port, url_host

    openai_base(api_url)  # a bad URL fails here, before anything starts
    auth = check_auth(share, host, auth, no_auth_i_understand)  # so does an open UI without a password
    if vision is None:
        from labkit.vision import is_vision_model

        vision = hasattr(api_url, "model_dir") and is_vision_model(api_url.model_dir)
    WebUI.replace("webui")  # re-running the cell replaces the app
    if not is_loopback(host):
        print(f"WARNING: the web UI listens on {host}: anyone who can reach this machine can try to log in"
              + ("" if auth else " (no password: you chose no_auth_i_understand)"))
    port = check_port(host, port) if port is not None else free_port(host)
    app = build_app(api_url, title=title, vision=vision)
    app.queue()
    server_name = f"[{host}]" if ":" in host else host  # gradio builds http://{server_name}:{port} itself
    try:
        _app, local_url, share_url = app.launch(server_name=server_name, server_port=port, share=share,
                                                inline=False, prevent_thread_lock=True, quiet=True, show_error=True,
                                                auth=auth)
    except BaseException:  # a failed start (or Ctrl-C, e.g. while the share link is made) leaves no server up
        app.close()
        raise
    url = f"http://{url_host(host)}:{port}/"
    handle = WebUI(app, url, share_url, auth)
    handle._keep()
    if block:
        print(f"web UI on {url}" + (f" (public: {share_url})" if share_url else "") + "; Ctrl-C stops it")
        try:
            app.block_thread()
        finally:
            handle.close()
    return handle


def _cli(args) -> int:
    try:
        launch(args.api, port=args.port, block=True, share=args.share, host=args.host, vision=args.vision,
               auth=args.auth, no_auth_i_understand=args.no_auth_i_understand)
    except LabkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def add_cli(sub) -> None:
    """`labkit webui --api URL [--port P] [--host H] [--share] [--auth USER:PASS]`."""
    p = sub.add_parser("webui", help="a Gradio chat app over an OpenAI-compatible server (e.g. lmdeploy's)")
    p.add_argument("--api", required=True, help="the server, e.g. http://127.0.0.1:23333")
    p.add_argument("--port", type=int, default=None, help="port of the web UI (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too (needs --auth)")
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (needs --auth)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="log-in for the page (needed with --share "
                   "or a non-loopback --host)")
    p.add_argument("--no-auth-i-understand", action="store_true",
                   help="serve --share / a non-loopback host without a password (anyone can use your GPU)")
    p.add_argument("--vision", action="store_true", help="add an image upload (for a vision-language model)")
    p.set_defaults(func=_cli)

