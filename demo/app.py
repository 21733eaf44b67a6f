"""A public chat demo over any OpenAI-compatible server (`lmdeploy serve api_server`, or another), the
workbook's replacement for `lmdeploy serve gradio`, which LMDeploy 0.10 removed.

    python demo/app.py --server http://127.0.0.1:23333/v1            # locally, on http://127.0.0.1:7860
    OPENAI_BASE_URL=https://your-server/v1 python app.py             # on Hugging Face Spaces / OpenXLab

Sliders for max_new_tokens, top_p, top_k, temperature; Send, Retry, Undo, Clear. The conversation lives on the
server side of the app (a gr.State per browser session): a client sends only its text and the sliders, never a
history, so nothing a client sends can make the app read or serve a file. Standalone: gradio and openai only.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import openai  # noqa: E402

DEFAULT_SERVER = "http://127.0.0.1:23333/v1"
TIMEOUT_S = 120.0        # one reply; the server's own limits come first
MAX_MESSAGE_CHARS = 4000  # a public demo: keep each message and the history bounded
MAX_TURNS = 20
DEFAULTS = {"max_new_tokens": 256, "top_p": 0.8, "top_k": 40, "temperature": 0.8}


def server_models(client: openai.OpenAI) -> list[str]:
    """The model names the server lists at /v1/models."""
    return [m.id for m in client.models.list().data]


def _fail(message: str) -> Exception:
    return gr.Error(message, print_exception=False)


def _text(value) -> str:
    if not isinstance(value, str):  # the textbox gives text; anything else is refused, never opened
        raise _fail("send text only")
    value = value.strip()
    if not value:
        raise _fail("type a message first")
    if len(value) > MAX_MESSAGE_CHARS:
        raise _fail(f"the message has {len(value):,} characters; this demo takes at most {MAX_MESSAGE_CHARS:,}")
    return value


def build(server: str, api_key: str = "none", title: str = "LMDeploy Lab demo", model: str | None = None):
    """The Gradio app for the OpenAI-compatible server at `server` (its /v1 URL)."""
    client = openai.OpenAI(base_url=server, api_key=api_key, timeout=TIMEOUT_S, max_retries=0)

    def pick_model() -> str:
        if model:
            return model
        try:
            names = server_models(client)
        except openai.OpenAIError as err:
            raise _fail(f"cannot reach {server}/models ({type(err).__name__}): is the server running?") from None
        if not names:
            raise _fail(f"{server} serves no model")
        return names[0]

    def stream(history: list[dict], max_new_tokens, top_p, top_k, temperature):
        reply = {"role": "assistant", "content": ""}
        shown = history + [reply]
        try:
            chunks = client.chat.completions.create(
                model=pick_model(), messages=history, stream=True, max_tokens=int(max_new_tokens),
                top_p=float(top_p), temperature=float(temperature), extra_body={"top_k": int(top_k)})
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    reply["content"] += chunk.choices[0].delta.content
                    yield shown
        except openai.OpenAIError as err:
            raise _fail(f"the server at {server} failed: {type(err).__name__}: {str(err)[:200]}") from None
        yield shown

    def send(message, history, max_new_tokens, top_p, top_k, temperature):
        history = list(history or [])[-2 * MAX_TURNS:] + [{"role": "user", "content": _text(message)}]
        for shown in stream(history, max_new_tokens, top_p, top_k, temperature):
            yield "", shown, shown

    def retry(history, max_new_tokens, top_p, top_k, temperature):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            raise _fail("nothing to retry yet")
        for shown in stream(history, max_new_tokens, top_p, top_k, temperature):
            yield shown, shown

    def undo(history):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        last = history.pop()["content"] if history else ""
        return history, history, last

    def clear():
        return [], [], ""

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"### {title}\nA chat with the model behind an OpenAI-compatible server "
                    f"(served with LMDeploy: `lmdeploy serve api_server`).")
        history = gr.State([])            # the conversation, kept on the server for each browser session
        chatbot = gr.Chatbot(label="conversation", height=420)  # display only: never read back
        msg = gr.Textbox(label="you", placeholder="Ask something and press Enter", max_length=MAX_MESSAGE_CHARS)
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary")
            retry_btn = gr.Button("Retry")
            undo_btn = gr.Button("Undo")
            clear_btn = gr.Button("Clear")
        with gr.Accordion("generation parameters", open=False):
            with gr.Row():
                max_new = gr.Slider(1, 2048, value=DEFAULTS["max_new_tokens"], step=1, label="max_new_tokens")
                top_p = gr.Slider(0.01, 1.0, value=DEFAULTS["top_p"], step=0.01, label="top_p")
                top_k = gr.Slider(0, 100, value=DEFAULTS["top_k"], step=1, label="top_k (0 = off)")
                temp = gr.Slider(0.0, 2.0, value=DEFAULTS["temperature"], step=0.05, label="temperature")
        sliders = [max_new, top_p, top_k, temp]
        send_btn.click(send, [msg, history, *sliders], [msg, chatbot, history], api_name="send")
        msg.submit(send, [msg, history, *sliders], [msg, chatbot, history], api_visibility="private")
        retry_btn.click(retry, [history, *sliders], [chatbot, history], api_name="retry")
        undo_btn.click(undo, [history], [chatbot, history, msg], api_name="undo")
        clear_btn.click(clear, None, [chatbot, history, msg], api_name="clear")
    return app


def main(argv: list[str] | None = None) -> int:
    """Start the demo: `python demo/app.py --server URL [--port P] [--host H]`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_SERVER),
                   help=f"the server's /v1 URL (env OPENAI_BASE_URL; default {DEFAULT_SERVER})")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"), help="its key (env OPENAI_API_KEY)")
    p.add_argument("--model", default=os.environ.get("DEMO_MODEL"), help="a model name (default: the server's first)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="0.0.0.0 to serve other machines (Spaces sets it)")
    p.add_argument("--title", default=os.environ.get("DEMO_TITLE", "LMDeploy Lab demo"))
    args = p.parse_args(argv)
    if not args.server.startswith(("http://", "https://")):
        print(f"error: --server must be an http(s) URL ending in /v1, not {args.server!r}", file=sys.stderr)
        return 2
    server = args.server.rstrip("/")
    server = server if server.endswith("/v1") else server + "/v1"
    app = build(server, args.api_key, args.title, args.model)
    print(f"demo for {server} on http://{args.host}:{args.port}", flush=True)
    app.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, show_error=True,
                                                 allowed_paths=[], quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
