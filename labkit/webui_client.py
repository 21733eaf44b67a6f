"""Driving a running web UI (labkit.webui) from code through gradio_client, the way a browser does (notebooks
02 and 05): fill the model picker, ask (with pictures), retry. The conversation lives in the app, one per client
session: a WebUI handle keeps one client, so ask and retry share it."""
from __future__ import annotations

from typing import Any

from labkit.errors import InputError

# The app's generation parameters and their defaults, in the order its API takes them (labkit.webui's sliders).
DEFAULTS = {"max_new_tokens": 256, "top_p": 0.8, "top_k": 40, "temperature": 0.7}


class UnknownParameterError(InputError, TypeError):
    """A generation parameter the web UI does not have (max_tokens instead of max_new_tokens, ...)."""


def _ui_client(ui: Any):
    """A gradio_client.Client for a running app: a Client as it is, a WebUI handle, or the app's URL."""
    if hasattr(ui, "predict") and hasattr(ui, "submit"):
        return ui
    if callable(getattr(ui, "gradio_session", None)):  # a WebUI: one session per handle, so ask and retry
        return ui.gradio_session()                       # share the conversation
    from gradio_client import Client

    return Client(str(ui), verbose=False)


def _gen_args(gen: dict) -> list:
    """max_new_tokens, top_p, top_k, temperature in the app's order (DEFAULTS for those not given)."""
    unknown = set(gen) - set(DEFAULTS)
    if unknown:
        hint = " (use max_new_tokens, lmdeploy's name for OpenAI's max_tokens)" if "max_tokens" in unknown else ""
        raise UnknownParameterError(f"unknown generation parameter(s) {', '.join(sorted(unknown))}{hint}: "
                                    f"the web UI has {', '.join(DEFAULTS)}")
    return [gen.get(k, v) for k, v in DEFAULTS.items()]


_UI_FIX = ("is the app still running (ui.url in a browser) and its server alive (server.alive, server.log_tail())? "
           "close the app (ui.close()) and start it again")


def pick_model(ui: Any, timeout: float | None = None) -> str | None:
    """Fill the app's model picker from /v1/models (as the page does when it opens); the model it selects.

    Through its /models API. The picker accepts only models it lists, and each client session has its own."""
    from labkit import deadline

    client = _ui_client(ui)
    picked = deadline.call(lambda: client.predict(api_name="/models"), timeout, "the web UI's /models", _UI_FIX)
    return picked.get("value") if isinstance(picked, dict) else picked


def ask(ui: Any, message: str, model: str | None = None, files: list | tuple = (), system: str = "",
        updates: list | None = None, timeout: float | None = None, **gen: Any) -> list:
    """Send `message` (+ image `files`) through the app's /chat API, as its Send button does; the chat after.

    `ui`: a gradio_client.Client, a WebUI (its own client) or the app's URL (a new session each time). The
    conversation lives in the app, one per client session: asking again with the same client continues it.
    The model picker is filled first (pick_model); model=None takes the model it selects. `gen`:
    max_new_tokens, top_p, top_k, temperature (else DEFAULTS). A list given as `updates` collects every
    streamed (textbox, chat) update. A refusal (gr.Error in the app) raises gradio_client's error with the
    app's message; no answer within `timeout` s, a RequestTimeout."""
    from labkit import deadline

    client = _ui_client(ui)
    if files:
        from gradio_client import handle_file

        message = {"text": message, "files": [handle_file(str(f)) for f in files]}
    picked = pick_model(client, timeout)
    model = picked if model is None else model
    job = client.submit(message, model, system, *_gen_args(gen), api_name="/chat")

    def finish():
        if updates is not None:
            updates.extend(job)
        return job.result()[1]

    return deadline.call(finish, timeout, "the web UI's /chat", _UI_FIX)


def retry(ui: Any, model: str | None = None, system: str = "", timeout: float | None = None, **gen: Any) -> list:
    """Regenerate the last reply of this client's conversation through the app's /retry API (its Retry
    button); the chat after. Use the same client (or WebUI) as for ask."""
    if not (model is None or isinstance(model, str)):
        raise InputError("retry(ui, model, ...) takes no history: the conversation lives in the app's session; "
                         "call it with the client (or WebUI) you asked with")
    from labkit import deadline

    client = _ui_client(ui)
    picked = pick_model(client, timeout)
    model = picked if model is None else model
    return deadline.call(lambda: client.predict(model, system, *_gen_args(gen), api_name="/retry"), timeout,
                         "the web UI's /retry", _UI_FIX)
