"""What engines do with images (lab 05): which vision towers TurboMind can run, the over-long prompt as each
engine reports it, the predicted image costs against the engine's own input_token_len, and a deadline for
every request, so no cell waits for ever.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from labkit.vision.tokens import INTERNVL_ARCHS, LEGACY_INTERNVL_ARCHS

T = TypeVar("T")
# head_dim values TurboMind's own InternViT kernels take (src/turbomind/models/internvit/internvit_kernels.cu,
# invokeInternVitPrepareQKV: 64 or 128, anything else is `[TM][FATAL] unsupported InternVit PrepareQKV head_dim`)
TURBOMIND_VIT_HEAD_DIMS = (64, 128)
REQUEST_TIMEOUT_S = 180.0  # one lab 05 request; a first image on a cold PyTorch engine takes ~30 s on the runner
# An over-long prompt: refused before it reaches either engine (lmdeploy/serve/core/async_engine.py checks
# input_len >= session_len: "Input length (N) must be smaller than the model context length (M)."), or by
# TurboMind itself (its status 6, kTooLong, which lmdeploy maps to the same code with its default message).
CONTEXT_CODE = "context_length_exceeded"
CONTEXT_MESSAGES = ("must be smaller than the model context length", "exceeds the model context length")


from labkit.deadline import RequestTimeout  # noqa: E402  (one timeout error for every labkit request)


def vision_head_dim(model_dir: str | Path) -> int | None:
    """The vision tower's attention head width (hidden_size / heads) of an InternVL model, else None."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    if (cfg.get("architectures") or [""])[0] not in INTERNVL_ARCHS + LEGACY_INTERNVL_ARCHS:
        return None
    vision = cfg.get("vision_config") or {}
    if vision.get("head_dim"):
        return int(vision["head_dim"])
    heads = vision.get("num_attention_heads")
    return int(vision["hidden_size"]) // int(heads) if heads and vision.get("hidden_size") else None


def turbomind_vision_problem(model_dir: str | Path) -> str | None:
    """Why TurboMind cannot run this model's vision tower (one line), or None when it can (or has none)."""
    head_dim = vision_head_dim(model_dir)
    if head_dim is None or head_dim in TURBOMIND_VIT_HEAD_DIMS:
        return None
    return (f"TurboMind's InternViT runs vision heads of {' or '.join(map(str, TURBOMIND_VIT_HEAD_DIMS))} only, "
            f"and {Path(model_dir).name} has head_dim {head_dim} (it would abort with 'unsupported InternVit "
            f"PrepareQKV head_dim: {head_dim}')")


def is_context_refusal(response: Any) -> bool:
    """True when a pipeline Response is the refusal of a prompt longer than the session, as either engine gives it."""
    return (getattr(response, "finish_reason", None) == "error" and not getattr(response, "text", "")
            and getattr(response, "error_code", None) == CONTEXT_CODE
            and any(m in (getattr(response, "error_message", "") or "") for m in CONTEXT_MESSAGES))


def check_prediction(predicted: Sequence[int], input_token_lens: Sequence[int], text_tokens: int) -> list[str]:
    """Differences between predicted image tokens + the text part and the engine's input_token_len, image by image.

    `text_tokens` is the prompt without its image (template + question + the image's <img></img> wrapping),
    measured once on a known image; an empty list means every prediction was exact."""
    if len(predicted) != len(input_token_lens):
        return [f"{len(predicted)} predictions for {len(input_token_lens)} replies"]
    return [f"image {i}: predicted {p} + {text_tokens} text = {p + text_tokens}, the engine counted {got}"
            for i, (p, got) in enumerate(zip(predicted, input_token_lens)) if p + text_tokens != got]


def within(seconds: float, fn: Callable[[], T], what: str = "the request") -> T:
    """fn() if it returns within `seconds`, else RequestTimeout saying what to do (the call is left behind)."""
    from labkit import deadline

    return deadline.call(fn, seconds, what, "the engine may be stuck (see its log lines above); restart the "
                         "kernel, then try backend='pytorch' or a smaller image")


def server_chat(client: Any, model: str, messages: list, timeout: float = REQUEST_TIMEOUT_S, **options: Any):
    """client.chat.completions.create(model, messages, **options) within `timeout` s, else RequestTimeout."""
    return within(timeout, lambda: client.chat.completions.create(model=model, messages=messages, **options),
                  f"the request to {client.base_url}")
