"""What the web UI (labkit.webui, labs 02 and 05) makes of what a client sends: chat messages to OpenAI
messages, uploaded pictures to image parts, and the checks that keep it from reading any file a client names:
only regular files inside Gradio's upload folder (symlinks and `..` resolved), only `data:` image URLs."""
from __future__ import annotations

import base64
import mimetypes
import os
from pathlib import Path
from typing import Any

from labkit.errors import LabkitError


class UploadError(LabkitError, ValueError):
    """A client named a file that was not uploaded through the page (the web UI reads no other file)."""


def upload_dir() -> Path:
    """Gradio's upload folder (GRADIO_TEMP_DIR, else <tmp>/gradio), symlinks resolved: the only folder whose
    files a client may name."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def uploaded_file(path: Any, uploads: Path) -> Path:
    """`path` if it is a regular file inside `uploads` once symlinks and `..` are resolved, else UploadError."""
    shown = str(path)[:120]
    try:
        real = Path(os.fspath(path)).resolve(strict=True)
    except (OSError, RuntimeError, TypeError, ValueError):
        raise UploadError(f"refused {shown!r}: no such uploaded file; attach pictures with the clip") from None
    if not real.is_relative_to(uploads) or not real.is_file():
        raise UploadError(f"refused {shown!r}: the web UI reads only files uploaded through the page "
                          f"(into {uploads}); attach pictures with the clip") from None
    return real


def check_history(history: Any, uploads: Path) -> list:
    """A client's chat history with every file it names checked by uploaded_file and every image part a data
    URL (nothing the server would fetch or read); UploadError otherwise."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise UploadError("the chat history must be a list of messages")
    for m in history:
        if isinstance(m, dict):
            _check_content(m.get("content"), uploads)
    return history


def _check_content(content: Any, uploads: Path) -> None:
    if _is_upload(content):
        content = _upload_items(content)
    for item in content if isinstance(content, (list, tuple)) else [content]:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "file" or "path" in item:
            f = item.get("file", item)
            uploaded_file(f.get("path") if isinstance(f, dict) else f, uploads)
        elif item.get("type") in ("image_url", "input_image"):
            url = item.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not (isinstance(url, str) and url.startswith("data:")):
                raise UploadError("refused an image part that is not a data: URL; attach pictures with the clip")


# ----------------------------------------------------------------------------- messages

def file_part(path: str | Path, mime: str | None = None) -> dict:
    """An OpenAI image part (data URL) for a local image file."""
    path = Path(path)
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def message_content(content: Any, uploads: Path | None = None) -> str | list[dict]:
    """OpenAI message content from a Gradio chat message's content: text stays a string; files become
    image parts (a list of parts, for vision-language models). With `uploads` (the app does this), only
    files inside that folder are read (check_history)."""
    if isinstance(content, str):
        return content
    if uploads is not None:
        _check_content(content, uploads)
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


def check_upload(value: Any, uploads: Path | None = None) -> str | list:
    """A user's upload (MultimodalTextbox value) as chat content, each image checked first (lab 05):
    a missing, empty, corrupt or non-image file raises labkit.vision.ImageError with what to do; with
    `uploads`, a file outside that folder raises UploadError before it is opened."""
    if not _is_upload(value):
        return value
    from labkit import vision

    items = _upload_items(value)
    for item in items:
        if isinstance(item, dict):
            vision.load(item["path"] if uploads is None else uploaded_file(item["path"], uploads))
    return items[0] if len(items) == 1 and isinstance(items[0], str) else items


def build_messages(history: list[dict], message: Any = None, system: str | None = None,
                   uploads: Path | None = None) -> list[dict]:
    """OpenAI chat messages from a Gradio history (+ a new user message and an optional system prompt);
    with `uploads`, files outside that folder are refused (UploadError)."""
    out = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history or []:
        if m.get("role") in ("user", "assistant", "system"):
            out.append({"role": m["role"], "content": message_content(m.get("content", ""), uploads)})
    if message is not None:
        out.append({"role": "user", "content": message_content(message, uploads)})
    return out


def _text(content: Any) -> str:
    c = message_content(content)
    return c if isinstance(c, str) else " ".join(p.get("text", "[image]") for p in c)
