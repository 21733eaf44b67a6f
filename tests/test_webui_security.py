"""The web UI reads and serves no file a client names (labs 02 and 05, `labkit webui`), and it is never open to
other machines without a password.

The real Gradio app, on a real port of 127.0.0.1, attacked over raw HTTP the way any remote client can: a chat
history (or an upload) that names a file of this machine. The model server behind it is a small OpenAI stand-in
that records what it receives, so the test sees whether a file's bytes left the machine. Nothing outside
Gradio's upload folder may be sent to the model, echoed back, copied into Gradio's cache or served at
/gradio_api/file=....

Two layers are tested: everything together (Gradio 6's own preprocess check + labkit's), and labkit's layer
alone, with Gradio's check switched off (as for Gradio versions or call paths without it): the conversation
lives on the server (gr.State), so no history a client sends is read. That second test failed against the
app that took the history from the client: the file was base64-encoded to the model server and linked back
at /gradio_api/file=....
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from helpers import one_line
from labkit import webui
from labkit.errors import LabkitError

ROOT = Path(__file__).resolve().parents[1]


class _Model(BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in: /v1/models and a streamed reply; keeps every request body it got."""

    bodies: list[bytes] = []

    def do_GET(self):  # noqa: N802
        body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        type(self).bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def model_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Model)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", autouse=True)
def own_upload_folder(tmp_path_factory):
    """A Gradio upload folder of this test module's own, so that its search for copies sees only its files."""
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-uploads"))
    yield
    if old is None:
        os.environ.pop("GRADIO_TEMP_DIR")
    else:
        os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def ui(model_url, own_upload_folder):
    handle = webui.launch(model_url, vision=True)
    yield handle
    handle.close()


@pytest.fixture()
def secrets(tmp_path):
    """Files a client must never get: one in the system's temp folder (where Gradio would serve from), one in
    /etc (the issue's payload), and a symlink / a `..` path that lead to them from inside the upload folder."""
    token = uuid.uuid4().hex
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + f"labkit-secret-{token}".encode())
    inside = webui.upload_dir() / f"labkit-test-{uuid.uuid4().hex[:8]}"  # the content's token is not in any path
    inside.mkdir(parents=True)
    link = inside / "link.png"
    link.symlink_to(secret)
    dotdot = f"{inside}/../../{os.path.relpath(secret, webui.upload_dir().parent)}"
    assert Path(dotdot).resolve() == secret.resolve()
    yield {"tmp": secret, "etc": Path("/etc/hostname"), "symlink": link, "dotdot": Path(dotdot), "token": token}
    link.unlink()
    inside.rmdir()


def _session(ui) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=ui.url.rstrip("/"), trust_env=False, timeout=30)
    session = uuid.uuid4().hex
    assert _call(client, session, "models", [])[0] == "complete"  # the page fills its model picker first
    return client, session


def _call(client: httpx.Client, session: str, api: str, data: list) -> tuple[str, str]:
    """Call an app API over raw HTTP (Gradio's /call protocol); (last event name, its data)."""
    event_id = client.post(f"/gradio_api/call/{api}", json={"data": data, "session_hash": session}).json()["event_id"]
    text = client.get(f"/gradio_api/call/{api}/{event_id}").text
    events = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("event:")]
    datas = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("data:")]
    return events[-1], datas[-1]


def _payloads(path: Path) -> dict[str, dict]:
    """The issue's file part and its variants, naming `path`."""
    p = str(path)
    return {"file part (the issue's)": {"type": "file", "file": {"path": p, "meta": {"_type": "gradio.FileData"}}},
            "file part, no meta": {"type": "file", "file": {"path": p}},
            "bare path": {"path": p, "meta": {"_type": "gradio.FileData"}},
            "image_url to a path": {"type": "image_url", "image_url": {"url": p}}}


def _attacks(path: Path, uploads: bool = True):
    """(what, api, data): the payloads as a chat history, in every place the app ever took one (chat, retry,
    undo; the conversation now lives on the server, so they land in other inputs), and as an upload (chat)."""
    gen = ["m", "", 8, 0.8, 40, 0.7]
    for what, part in _payloads(path).items():
        history = [{"role": "user", "content": [part]}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]
        yield f"{what} in history", "chat", [{"text": "hi", "files": []}, history, *gen]
        yield f"{what} in history", "retry", [history, *gen]
        yield f"{what} in history", "undo", [history]
        yield f"{what} as the system prompt", "chat", [{"text": "hi", "files": []}, "m", history, *gen[2:]]
        if uploads and ("file" in part or "path" in part):
            yield f"{what} as an upload", "chat", [{"text": "hi", "files": [part.get("file", part)]}, *gen]


def _assert_not_sent(secret: Path, token: str, what: str, event: str, data: str):
    body = secret.resolve().read_bytes()
    b64 = base64.b64encode(body).decode()
    assert event == "error" or "as an upload" not in what, f"{what}: the app accepted it: {data[:300]}"
    assert not any(b64.encode() in b or body in b for b in _Model.bodies), f"{what}: the file reached the model"
    assert token not in data and b64 not in data, f"{what}: the file came back in the reply"
    assert "/gradio_api/file=" not in data, f"{what}: the reply links a file: {data[:300]}"


def _assert_nothing_leaked(ui, client: httpx.Client, secret: Path, token: str, what: str, event: str, data: str):
    _assert_not_sent(secret, token, what, event, data)
    body = secret.resolve().read_bytes()
    for name in (str(secret), str(secret.resolve())):
        assert client.get(f"/gradio_api/file={name}").status_code != 200, f"{what}: {name} is served"
    copies = [f for f in webui.upload_dir().rglob("*") if f.is_file() and not f.is_symlink()
              and f.stat().st_size == len(body) and f.read_bytes() == body]
    assert not copies, f"{what}: copied into Gradio's folder: {copies}"


@pytest.mark.parametrize("target", ["tmp", "etc", "symlink", "dotdot"])
def test_no_file_a_client_names_is_read_or_served(ui, secrets, target):
    """Gradio's own check and labkit's together (what a student runs)."""
    client, session = _session(ui)
    _Model.bodies = []
    for what, api, data in _attacks(secrets[target]):
        event, reply = _call(client, session, api, data)
        _assert_nothing_leaked(ui, client, secrets[target], secrets["token"], f"{target}: {what} (/{api})", event,
                               reply)


@pytest.mark.parametrize("target", ["tmp", "etc", "symlink", "dotdot"])
def test_labkit_refuses_on_its_own_when_gradios_check_is_off(ui, secrets, target, monkeypatch):
    """labkit's layer alone: with Gradio's preprocess check switched off (as in Gradio versions or call paths
    that do not check), no history a client sends reaches the model or comes back: the app keeps the
    conversation itself. (The old app, which took the history from the client, sent the file to the model
    and linked it in its reply here.) Uploads are not part of this test: once Gradio's check is off, Gradio
    itself copies a named file into its upload folder before any app code runs."""
    from gradio import processing_utils

    monkeypatch.setattr(processing_utils, "_check_allowed", lambda path, check_in_upload_folder: None)
    client, session = _session(ui)
    _Model.bodies = []
    for what, api, data in _attacks(secrets[target], uploads=False):
        event, reply = _call(client, session, api, data)
        _assert_not_sent(secrets[target], secrets["token"], f"{target}: {what} (/{api})", event, reply)


def test_a_real_upload_still_works(ui):
    """The check refuses only what it must: a picture uploaded through the page reaches the model, and the
    history that names its uploaded copy is accepted on the next turn."""
    from gradio_client import Client, handle_file

    from labkit.vision import sample_images

    client = Client(ui.url, verbose=False)
    client.predict(api_name="/models")
    _Model.bodies = []
    _, chat = client.predict({"text": "What is this?", "files": [handle_file(str(sample_images()["circle"]))]},
                             "m", "", 8, 0.8, 40, 0.7, api_name="/chat")
    assert b"data:image/png;base64," in _Model.bodies[-1]
    circle = sample_images()["circle"].read_bytes()
    kept = [f for f in webui.upload_dir().rglob("*") if f.is_file() and f.read_bytes() == circle]
    assert kept, "the upload is not in Gradio's upload folder"  # where the app reads it from
    client.predict({"text": "Sure?", "files": []}, "m", "", 8, 0.8, 40, 0.7, api_name="/chat")  # the next turn
    assert json.loads(_Model.bodies[-1])["messages"][0]["content"][1]["type"] == "image_url"


def test_the_checks_themselves(secrets, tmp_path):
    uploads = webui.upload_dir()
    for target in ("tmp", "etc", "symlink", "dotdot"):
        with pytest.raises(webui.UploadError) as err:
            webui.uploaded_file(secrets[target], uploads)
        assert "uploaded through the page" in one_line(err)
    with pytest.raises(webui.UploadError, match="no such uploaded file"):
        webui.uploaded_file(uploads / "nope" / "x.png", uploads)
    with pytest.raises(webui.UploadError, match="not a data: URL"):
        webui.check_history([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
                            uploads)
    with pytest.raises(webui.UploadError):
        webui.build_messages([{"role": "user", "content": [{"path": "/etc/hostname"}]}], uploads=uploads)
    assert issubclass(webui.UploadError, LabkitError)


# ----------------------------------------------------------------------------- open to others only with a password

@pytest.mark.parametrize("kwargs", [{"share": True}, {"host": "0.0.0.0"}, {"host": "::"}, {"host": "192.168.1.10"}])
def test_an_open_web_ui_without_a_password_is_refused_before_it_starts(model_url, kwargs):
    before = webui._live.get("webui")
    start = time.perf_counter()
    with pytest.raises(webui.AuthError) as err:
        webui.launch(model_url, **kwargs)
    msg = one_line(err)
    assert "without a password" in msg and "--auth USER:PASS" in msg and time.perf_counter() - start < 1.0
    assert webui._live.get("webui") is before  # refused before anything started or was replaced


def test_the_cli_refuses_share_without_auth():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "webui", "--api", "http://127.0.0.1:9", "--share"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "without a password" in lines[0] and "--auth USER:PASS" in lines[0], done.stderr
    assert time.perf_counter() - start < 30


def test_with_auth_the_page_asks_for_the_password(model_url):
    with pytest.raises(webui.AuthError, match="USER:PASS"):
        webui.launch(model_url, auth="no-colon")
    with webui.launch(model_url, auth="student:s3cret") as ui:
        anonymous = httpx.get(ui.url + "gradio_api/info", trust_env=False, timeout=10)
        assert anonymous.status_code in (401, 403), anonymous.status_code
        assert webui.pick_model(ui) == "m"  # the handle logs in with its password
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(ui.url.rsplit(":", 1)[1].strip("/"))), timeout=2).close()
