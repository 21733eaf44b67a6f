"""demo/app.py, the deployable Gradio demo: started as a student starts it (`python demo/app.py --server URL`),
against a real OpenAI-compatible server, driven through its own API as the browser drives it.
CPU: the server is tests/baseline_server.py (FastAPI over labkit's transformers baseline, a real model over
real HTTP). GPU: `lmdeploy serve api_server` (labkit.serve.Server)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from labkit.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "demo" / "app.py"
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", GRADIO_ANALYTICS_ENABLED="False")


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{proc.stdout.read()[-2000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_demo(server: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(APP), "--server", server, "--port", str(port)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait(url, proc)
    except BaseException:
        _stop(proc)
        raise
    return proc, url


@pytest.fixture(scope="module")
def cpu_server():
    """tests/baseline_server.py on tiny-chat: its /v1 URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "baseline_server.py"), str(port)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(f"http://127.0.0.1:{port}/v1/models", proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def cpu_demo(cpu_server):
    proc, url = _start_demo(cpu_server)
    try:
        yield url
    finally:
        _stop(proc)


def _direct_reply(server: str, text: str, max_tokens: int) -> str:
    """The same request sent straight to the server with the openai client (greedy, streamed as the app does)."""
    import openai

    client = openai.OpenAI(base_url=server, api_key="none")
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], stream=True,
                                            max_tokens=max_tokens, temperature=0.0, top_p=0.8,
                                            extra_body={"top_k": 40})
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _send(url: str, text, max_tokens: int = 16):
    from gradio_client import Client

    return Client(url, verbose=False).predict(text, max_tokens, 0.8, 40, 0.0, api_name="/send")


def test_demo_sends_a_message_and_shows_the_servers_reply(cpu_demo, cpu_server):
    box, chat = _send(cpu_demo, "Hello! Tell me a story.")
    assert box == "" and [m["role"] for m in chat] == ["user", "assistant"]
    reply = chat[1]["content"]
    reply = reply if isinstance(reply, str) else "".join(p.get("text", "") for p in reply)
    assert reply and reply == _direct_reply(cpu_server, "Hello! Tell me a story.", 16)


def test_the_api_takes_no_history_and_reads_no_file(cpu_demo, tmp_path):
    """Clients send text and sliders only; the conversation is the app's own gr.State (issue #10's leak)."""
    from gradio_client import Client

    client = Client(cpu_demo, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    send = [p["parameter_name"] for p in api["/send"]["parameters"]]
    assert send == ["message", "max_new_tokens", "top_p", "top_k", "temperature"], send
    assert [p["parameter_name"] for p in api["/retry"]["parameters"]] == ["max_new_tokens", "top_p", "top_k",
                                                                          "temperature"]
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    _, chat = client.predict(str(secret), 8, 0.8, 40, 0.0, api_name="/send")  # a path is only text to the app
    assert chat[0]["content"] in (str(secret), [{"type": "text", "text": str(secret)}])
    assert "TOP-SECRET-42" not in str(chat)


def test_bad_input_is_refused_in_one_line(cpu_demo):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="type a message first"):
        _send(cpu_demo, "   ")
    with pytest.raises(AppError, match="at most 4,000"):
        _send(cpu_demo, "x" * 4001)
    out = subprocess.run([sys.executable, str(APP), "--server", "ftp://nowhere"], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --server must be")


def test_a_server_that_is_down_is_said_in_the_ui():
    from gradio_client.exceptions import AppError

    proc, url = _start_demo(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    try:
        with pytest.raises(AppError, match="cannot reach .* is the server running"):
            _send(url, "Hello")
    finally:
        _stop(proc)


@pytest.mark.gpu
def test_demo_over_lmdeploy_api_server(tiny_dir):
    """The course's path: `lmdeploy serve api_server` (on the engine auto picks, TurboMind where it runs), then the
    demo in front of it."""
    from labkit.serve import Server

    with Server(tiny_dir, name="demo-test", cache_ratio=0.05) as srv:
        proc, url = _start_demo(srv.openai_url)
        try:
            box, chat = _send(url, "Hello! Tell me a story.")
            assert box == "" and chat[1]["role"] == "assistant" and chat[1]["content"]
        finally:
            _stop(proc)
