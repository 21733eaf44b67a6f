"""Lab 02: the api_server manager, tools, web UI and load test, with real processes and ports (127.0.0.1).

On CPU, lmdeploy's api_server dies while loading (no CUDA), which is itself one of the fault tests; the
process-lifecycle tests use a stand-in server (a small HTTP server with a child process; it lists one model,
streams a canned chat reply and can require an api key) started through the same code path
(`Server(..., command=...)`): own process group, watchdog, registry, readiness wait.
On a GPU, the real api_server is exercised by notebooks/02_serving.ipynb's gpu cells (the tool loop
reaching 16 through the server's parser, the web UI driven by gradio_client, the load test, and the stop that
gives GPU memory back) and by one gpu test here: a kernel killed while its real server runs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from labkit import loadtest, serve, tools, webui
from labkit.serve import ServerError, group_members

ROOT = Path(__file__).resolve().parents[1]

STANDIN = textwrap.dedent(r"""
    # Stand-in for lmdeploy's api_server: /v1/models, /v1/chat/completions (the same few words to everyone,
    # after "[N image]" when the message has pictures; streamed or not), one child process; optional --key K
    # (other keys get 401), slow start, deaf to SIGTERM.
    import json, os, signal, socket, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    port, name, host = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # stays on this machine
    key = sys.argv[sys.argv.index("--key") + 1] if "--key" in sys.argv else None
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    print(f"standin {os.getpid()} child {child.pid}", flush=True)
    time.sleep(float(os.environ.get("STANDIN_DELAY", "0.2")))
    WORDS = ["Hello", " from", " the", " stand-in."]
    class H(BaseHTTPRequestHandler):
        def send(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def refused(self):
            if key is None or self.headers.get("Authorization") == f"Bearer {key}":
                return False
            self.send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return True
        def do_GET(self):
            if not self.refused():
                self.send(200 if self.path == "/v1/models" else 404,
                          {"object": "list", "data": [{"id": name, "object": "model"}]})
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.refused():
                return
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": {"message": f"no route {self.path}"}})
            last = (req.get("messages") or [{}])[-1].get("content")
            images = sum(part.get("type") == "image_url" for part in last) if isinstance(last, list) else 0
            words = ([f"[{images} image] "] if images else []) + WORDS  # says what pictures it got
            words = words[:max(1, int(req.get("max_tokens") or len(words)))]
            head = {"id": "standin", "created": 0, "model": req.get("model") or name}
            if not req.get("stream"):
                reply = {"role": "assistant", "content": "".join(words)}
                return self.send(200, {**head, "object": "chat.completion",
                                       "choices": [{"index": 0, "finish_reason": "stop", "message": reply}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for word in words:
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"data: [DONE]\n\n")
        def log_message(self, *a):
            pass
    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        request_queue_size = 256  # as uvicorn's backlog: many clients at once (the load test's 64)
    Server((host, port), H).serve_forever()
""")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("standin") / "standin.py"
    path.write_text(STANDIN)
    return [sys.executable, str(path), "{port}", "{name}", "{host}"]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _name(tag: str) -> str:
    return f"test-{tag}-{uuid.uuid4().hex[:6]}"


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(pgid: int, timeout: float = 15.0) -> float:
    start = time.monotonic()
    while group_members(pgid) and time.monotonic() - start < timeout:
        time.sleep(0.05)
    assert not group_members(pgid), f"process group {pgid} still has {group_members(pgid)}"
    return time.monotonic() - start


# ----------------------------------------------------------------------------- faults before anything starts

def test_busy_port_is_reported_in_under_two_seconds(tiny_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        before = _children()
        start = time.perf_counter()
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is busy"):
            serve.Server("generated:tiny-chat", name=_name("busy"), port=port, show=False)
        took = time.perf_counter() - start
    assert took < 2.0, f"busy port took {took:.2f} s to report"
    assert _children() == before, "a process was started although the port was busy"


def test_bad_model_path_fails_before_any_process(tmp_path):
    from labkit.models import ModelNotFoundError

    before, logs = _children(), set((serve.config.home() / "logs").glob("*"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        serve.Server(str(tmp_path / "no-model-here"), name=_name("badpath"), show=False)
    assert _children() == before
    assert set((serve.config.home() / "logs").glob("*")) == logs, "a log was started for a bad path"


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache_ratio=1.5), r"\(0, 1\]"),
    (dict(quant_policy=3), "quant_policy must be one of"),
    (dict(backend="tensorrt"), "unknown backend"),
    (dict(tool_call_parser="qwen2.5"), "unknown tool-call parser"),
    (dict(extra_args="--tp 2"), "extra_args must be a list"),
])
def test_bad_options_fail_before_any_process(tiny_dir, kwargs, match):
    before = _children()
    with pytest.raises((ValueError, RuntimeError), match=match):
        serve.Server("generated:tiny-chat", name=_name("opts"), show=False, **kwargs)
    assert _children() == before


def test_pytorch_engine_cache_ratio_of_one_fails_before_any_process(tiny_dir):
    """The PyTorch engine's own rule (cache_ratio below 1) is checked once the backend is known, in the notebook."""
    before, logs = _children(), set((serve.config.home() / "logs").glob("*"))
    with pytest.raises(ValueError, match="below 1 for lmdeploy's PyTorch engine"):
        serve.Server(tiny_dir, name=_name("ratio1"), backend="pytorch", cache_ratio=1.0, show=False)
    assert _children() == before
    assert set((serve.config.home() / "logs").glob("*")) == logs, "a log was started for a bad option"


# ----------------------------------------------------------------------------- real lmdeploy dying while loading

def test_lmdeploy_rejecting_an_option_reports_its_log_tail(tiny_dir):
    """Runs everywhere: lmdeploy's own argument parser fails within seconds."""
    name = _name("badarg")
    start = time.perf_counter()
    with pytest.raises(ServerError) as err:
        serve.Server("generated:tiny-chat", name=name, cache_ratio=0.1, extra_args=["--no-such-option"], show=False,
                     check_gpu=False)  # lmdeploy itself, even on a machine without a GPU
    took = time.perf_counter() - start
    msg = str(err.value)
    assert "exited while loading" in msg and "rejected a command-line option" in msg
    assert "--no-such-option" in msg, "the log tail is missing"
    assert took < 30, f"took {took:.1f} s"
    assert not [e for e in serve.servers() if e["name"] == name], "the registry kept a dead server"


def test_no_usable_gpu_is_refused_before_lmdeploy_starts(tiny_dir):
    from labkit.gpu import has_cuda

    if has_cuda():
        pytest.skip("this machine has a GPU: lmdeploy loads here")
    before, logs = _children(), set((serve.config.home() / "logs").glob("*"))
    start = time.perf_counter()
    with pytest.raises(ServerError) as err:
        serve.Server("generated:tiny-chat", name=_name("nogpu"), cache_ratio=0.1, show=False)
    took = time.perf_counter() - start
    assert "not started" in str(err.value) and "needs a CUDA GPU" in str(err.value) and "\n" not in str(err.value)
    assert took < 5, f"the refusal took {took:.1f} s"
    assert _children() == before and set((serve.config.home() / "logs").glob("*")) == logs


def test_lmdeploy_without_gpu_dies_while_loading_and_says_why(tiny_dir):
    """check_gpu=False starts lmdeploy anyway: it dies while loading, and the cause is read from its log."""
    from labkit.gpu import has_cuda

    if has_cuda():
        pytest.skip("this machine has a GPU: lmdeploy loads here")
    before = _children()
    start = time.perf_counter()
    with pytest.raises(ServerError) as err:
        serve.Server("generated:tiny-chat", name=_name("nogpu"), cache_ratio=0.1, show=False, check_gpu=False)
    took = time.perf_counter() - start
    msg = str(err.value)
    print(f"reported after {took:.1f} s:\n{msg}")
    assert took < 30, f"the failure took {took:.1f} s to report"
    assert "Likely cause: no usable CUDA GPU" in msg
    assert "Found no NVIDIA driver" in msg, "the log tail is missing"
    assert _children() == before, "something of the dead server is still running"


# ----------------------------------------------------------------------------- lifecycle (stand-in, same code path)

def test_rerun_replaces_the_old_server_and_frees_its_port(tiny_dir, standin):
    name = _name("rerun")
    first = serve.Server(tiny_dir, name=name, command=standin, show=False)
    pgid, port = first.pgid, first.port
    assert len(group_members(pgid)) == 3  # watchdog, server, its child
    assert first.client().models.list().data[0].id == first.model_name
    entry = next(e for e in serve.servers() if e["name"] == name)
    assert entry["state"] == "running" and entry["port"] == port
    with pytest.raises(ServerError, match=f"labkit's server {name!r}"):
        serve.Server(tiny_dir, name=_name("other"), port=port, command=standin, show=False)
    second = serve.Server(tiny_dir, name=name, port=port, command=standin, show=False)  # same cell again
    try:
        assert first.stopped and not group_members(pgid), "the first server survived the re-run"
        assert second.alive and second.port == port
        assert [e["pgid"] for e in serve.servers() if e["name"] == name] == [second.pgid]
    finally:
        second.stop()
    assert not group_members(second.pgid)
    assert not [e for e in serve.servers() if e["name"] == name]


def test_stop_escalates_to_sigkill_for_a_server_deaf_to_sigterm(tiny_dir, standin):
    srv = serve.Server(tiny_dir, name=_name("deaf"), command=standin + ["--ignore-term"], show=False,
                       stop_grace=1.0)
    start = time.perf_counter()
    srv.stop()
    took = time.perf_counter() - start
    assert not group_members(srv.pgid)
    assert 0.9 < took < 6, f"stop took {took:.1f} s"


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"), ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"),
    ("::", "[::1]"), ("::1", "[::1]"), ("fd00::5", "[fd00::5]"), ("[::1]", "[::1]")])
def test_url_host_gives_an_address_httpx_can_reach(host, expected):
    import httpx

    assert serve.url_host(host) == expected
    url = httpx.URL(f"http://{serve.url_host(host)}:23333/v1")  # "http://::1:23333" does not parse
    assert url.port == 23333 and url.host == expected.strip("[]")


def test_a_server_on_the_ipv6_loopback_answers_at_its_url(tiny_dir, standin):
    """A real start on ::1 (the stand-in): client, registry, load test and web UI all reach http://[::1]:port."""
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1) to listen on")
    srv = serve.Server(tiny_dir, name=_name("ipv6"), host="::1", command=standin, show=False)
    try:
        assert srv.base_url == f"http://[::1]:{srv.port}"
        assert srv.client().models.list().data[0].id == srv.model_name
        assert [e["url"] for e in serve.servers() if e["name"] == srv.name] == [srv.base_url]
        row = loadtest.run(srv, concurrency=2, requests=2, max_tokens=2, time_limit=20)
        assert row["ok"] == 2, row
        with webui.launch(srv, host="::1") as ui:  # the web UI on ::1 too, in front of it
            assert ui.url.startswith("http://[::1]:")
            assert webui.message_content(webui.ask(ui, "hi", max_new_tokens=2)[-1]["content"]) == "Hello from"
    finally:
        srv.stop()
    assert not group_members(srv.pgid)


def test_memory_gib_without_a_gpu_is_none_and_zero_once_stopped(tiny_dir, standin):
    from labkit.gpu import gpus

    srv = serve.Server(tiny_dir, name=_name("mem"), command=standin, show=False)
    try:
        if gpus():  # the stand-in holds no GPU memory: the rise measured at start, whatever it was
            assert srv.memory_gib == pytest.approx((srv.memory_after - srv.memory_before) / 2**30)
        else:
            assert srv.memory_before is None and srv.memory_gib is None
            assert srv.describe()["GPU memory GiB"] is None
    finally:
        srv.stop()
    assert srv.memory_gib == 0.0


def test_with_block_stops_and_log_tail_and_curl(tiny_dir, standin, monkeypatch, capsys):
    with serve.Server(tiny_dir, name=_name("with"), command=standin, show=False) as srv:
        assert "standin" in srv.log_tail(5) and srv.pid in group_members(srv.pgid)
        assert serve.curl(f"{srv.openai_url}/models")["data"][0]["id"] == srv.model_name
        assert f"$ curl -sS --max-time 120 {srv.openai_url}/models" in capsys.readouterr().out
        monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without curl: same request, urllib
        assert serve.curl(f"{srv.openai_url}/models")["data"][0]["id"] == srv.model_name
        assert "curl is not installed here" in capsys.readouterr().out
    assert srv.stopped and not group_members(srv.pgid)


def test_sigterm_to_the_notebook_stops_the_server_and_chains_to_the_previous_handler(tiny_dir, standin):
    owner = textwrap.dedent(f"""
        import json, os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: print("previous handler ran", flush=True) or sys.exit(3))
        import labkit.serve as s
        srv = s.Server({str(tiny_dir)!r}, name="sigterm-test", command={standin!r}, show=False)
        print(json.dumps({{"pgid": srv.pgid}}), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", owner], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "previous handler ran" in done.stdout, (done.stdout, done.stderr)
    pgid = json.loads(done.stdout.splitlines()[0])["pgid"]
    _wait_gone(pgid, timeout=10)


def test_server_started_from_a_worker_thread_outlives_the_thread(tiny_dir, standin):
    """Why the watchdog polls its parent instead of relying on PR_SET_PDEATHSIG: that follows the thread."""
    box = {}
    t = threading.Thread(target=lambda: box.update(srv=serve.Server(tiny_dir, name=_name("thread"),
                                                                     command=standin, show=False)))
    t.start()
    t.join()
    srv = box["srv"]
    try:
        time.sleep(1.0)
        assert srv.alive and len(group_members(srv.pgid)) == 3
    finally:
        srv.stop()


def _kernel_run(kc, code: str, timeout: float = 60) -> tuple[str, dict]:
    out: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return "".join(out), reply["content"]


@pytest.mark.parametrize("how", ["shutdown", "killed"])
def test_kernel_that_goes_leaves_no_server(tiny_dir, standin, how):
    """A Jupyter kernel that shuts down (atexit) or is killed (the watchdog) takes its server with it;
    Ctrl-C (interrupt) while a server loads stops that server."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=dict(os.environ, STANDIN_DELAY="60" if how == "shutdown" else "0.2"))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        name = _name(f"kernel-{how}")
        start_cell = (f"import labkit.serve as s\nsrv = s.Server({str(tiny_dir)!r}, name={name!r}, "
                      f"command={standin!r}, show=False)\nprint('PGID', srv.pgid, 'LOG', srv.log_path)")
        if how == "shutdown":  # first: interrupt a server that is still loading
            def interrupt_once_loading():  # Ctrl-C once the server process runs and waits for /v1/models
                end = time.monotonic() + 30
                while not [e for e in serve.servers(clean=False) if e["name"] == name] and time.monotonic() < end:
                    time.sleep(0.05)
                time.sleep(0.3)
                km.interrupt_kernel()

            threading.Thread(target=interrupt_once_loading, daemon=True).start()
            out, content = _kernel_run(kc, start_cell)
            assert "interrupted: stopping server" in out, out
            assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt", out
            loading = [e for e in serve.servers(clean=False) if e["name"] == name]
            assert not [e for e in loading if e["state"] != "gone"], "the interrupted server still runs"
            _kernel_run(kc, "import os; os.environ['STANDIN_DELAY'] = '0.2'")
        out, content = _kernel_run(kc, start_cell)
        assert content["status"] == "ok", out
        pgid, log = int(out.split("PGID")[1].split()[0]), Path(out.split("LOG")[1].split()[0])
        assert len(group_members(pgid)) == 3
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=(how == "killed"))
    took = _wait_gone(pgid)
    print(f"{how}: server group gone {took:.1f} s after the kernel")
    text = log.read_text()
    if how == "shutdown":  # the kernel's atexit stopped it before the kernel was gone
        assert "exited with code -15" in text and "stopping the server: its parent" not in text, text
    else:  # nothing ran in the killed kernel: the watchdog saw its parent go
        assert "stopping the server: its parent" in text, text


@pytest.mark.gpu
def test_killed_kernel_takes_a_real_api_server_and_its_gpu_memory(tiny_dir):
    """The real `lmdeploy serve api_server` (with the engine process it spawns), started from a Jupyter
    kernel that is then killed: the watchdog stops the whole group and the GPU memory comes back."""
    from jupyter_client import KernelManager

    from labkit.gpu import memory_used, wait_for_memory_release

    before = memory_used()
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    pgid = None
    try:
        kc.wait_for_ready(timeout=60)
        name = _name("kernel-real")
        out, content = _kernel_run(kc, (
            f"import labkit.serve as s\nsrv = s.Server({str(tiny_dir)!r}, name={name!r}, cache_ratio=0.05, "
            f"eager=True, show=False)\nprint('PGID', srv.pgid, 'ANSWER', bool(s.curl(srv.base_url + '/v1/models')), "
            f"'BACKEND', srv.backend)"),
            timeout=300)
        assert content["status"] == "ok", out
        pgid = int(out.split("PGID")[1].split()[0])
        assert "ANSWER True" in out, out
        members = group_members(pgid)
        serving = memory_used()
        # The PyTorch engine runs in a process of its own; TurboMind runs inside the api_server.
        want = 3 if out.split("BACKEND")[1].split()[0] == "pytorch" else 2
        assert len(members) >= want, f"watchdog, api_server (and the PyTorch engine's process) expected: {members}"
        assert serving > before + 512 * 2**20, f"the server holds no GPU memory ({before} -> {serving} B)"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)  # SIGKILL: no atexit, no signal handler runs in the kernel
    took = _wait_gone(pgid, timeout=30)
    after = wait_for_memory_release(before, slack=512 * 2**20, timeout=30)
    print(f"killed kernel: {len(members)} server processes gone {took:.1f} s later; GPU memory "
          f"{before / 2**20:.0f} MiB before, {serving / 2**20:.0f} MiB serving, {after / 2**20:.0f} MiB after")
    assert after <= before + 512 * 2**20, f"GPU memory did not come back: {after / 2**20:.0f} MiB"
    assert not [p for p in serve.lmdeploy_processes() if name in p["cmdline"] or str(tiny_dir) in p["cmdline"]]


def test_labkit_servers_lists_and_stops_a_stray(tiny_dir, standin, tmp_path):
    """A stray: its kernel died and so did its watchdog, and the server ignores SIGTERM."""
    env = dict(os.environ, LABKIT_HOME=str(tmp_path))
    owner = textwrap.dedent(f"""
        import json, os, signal, sys
        import labkit.serve as s
        srv = s.Server({str(tiny_dir)!r}, name="stray-one", command={standin + ['--ignore-term']!r}, show=False)
        print(json.dumps({{"pgid": srv.pgid, "port": srv.port}}), flush=True)
        os.kill(srv.pgid, signal.SIGKILL)   # the watchdog dies (its child ignores the SIGTERM that follows)
        srv._proc.wait()
        os._exit(0)                         # and the notebook dies without running atexit
    """)
    done = subprocess.run([sys.executable, "-c", owner], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        assert group_members(info["pgid"]), "the stray did not survive (test set-up)"
        cli = [sys.executable, "-m", "labkit.cli", "servers"]
        listed = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "stray-one" in listed.stdout and "stray" in listed.stdout, listed
        assert "`labkit servers --stop` stops them" in listed.stdout
        stopped = subprocess.run(cli + ["--stop", "--grace", "1"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert stopped.returncode == 0 and "stopped 'stray-one'" in stopped.stdout, stopped
        assert not group_members(info["pgid"])
        again = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
        assert "no servers started by labkit are running" in again.stdout
    finally:
        serve._signal_group(info["pgid"], signal.SIGKILL)


def test_labkit_servers_stop_keeps_running_servers_unless_named(tiny_dir, standin, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))  # this test's own registry
    name = _name("cli")
    srv = serve.Server(tiny_dir, name=name, command=standin, show=False)
    cli = [sys.executable, "-m", "labkit.cli", "servers", "--stop", "--grace", "1"]
    try:
        kept = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert kept.returncode == 0 and "stopped" not in kept.stdout, kept
        assert "kept 1 server(s) whose notebook still runs: add --all" in kept.stdout, kept
        assert srv.alive
        named = subprocess.run(cli + [name, "no-such-server"], capture_output=True, text=True, timeout=60)
        assert named.returncode == 0 and f"stopped {name!r}" in named.stdout, named
        assert "no server called 'no-such-server'" in named.stdout and "kept" not in named.stdout, named
        _wait_gone(srv.pgid)
        assert serve.servers() == []
    finally:
        srv.stop(quiet=True)


def test_open_to_the_network_warns(tiny_dir, standin, capsys):
    srv = serve.Server(tiny_dir, name=_name("open"), host="0.0.0.0", api_keys="sk-lab", command=standin,
                       show=False)
    try:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.api_key == "sk-lab"
    finally:
        srv.stop()
    assert "WARNING: the server listens on 0.0.0.0" in capsys.readouterr().out


def test_api_server_command_line_is_what_lmdeploy_accepts(tiny_dir):
    """The command labkit builds, parsed by lmdeploy 0.18's own CLI parser (nothing runs)."""
    from labkit.commands import parser

    argv = serve.api_server_args(tiny_dir, host="0.0.0.0", port=23333, backend="pytorch", model_name="tiny-chat",
                                 cache_ratio=0.4, quant_policy=8, session_len=4096, eager=True,
                                 tool_call_parser="qwen", api_keys=["k1", "k2"])
    assert argv[:3] == ["lmdeploy", "serve", "api_server"]
    args = parser().parse_args(argv[1:])
    assert (args.model_path, args.server_name, args.server_port, args.backend) == (str(tiny_dir), "0.0.0.0", 23333,
                                                                                   "pytorch")
    assert (args.model_name, args.cache_max_entry_count, args.quant_policy, args.session_len) == (
        "tiny-chat", 0.4, 8, 4096)
    assert args.eager_mode and args.tool_call_parser == "qwen" and args.api_keys == ["k1", "k2"]


def test_causes_are_recognised():
    assert serve.diagnose("torch.OutOfMemoryError: CUDA out of memory", ratio=0.8).startswith("out of GPU memory")
    assert "busy" in serve.diagnose("OSError: [Errno 98] Address already in use", port=1)
    assert "could not read the model" in serve.diagnose("OSError: /x does not appear to have a file named config")
    assert serve.diagnose("something else") == "not recognised: read the last lines below"


# ----------------------------------------------------------------------------- tools (no GPU: lmdeploy's parser)

def test_parser_names_match_lmdeploy():
    from lmdeploy.serve.parsers.tool_parser import ToolParserManager

    assert set(tools.PARSERS) == set(ToolParserManager.module_dict)


def test_parser_for_models(tiny_dir):
    assert tools.parser_for("generated:tiny-chat", tiny_dir) == "qwen"
    assert tools.parser_for("internlm2_5-1_8b-chat") == "internlm"


def test_known_model_text_through_lmdeploys_parser_and_the_dispatch_table():
    """What the api_server does with a Qwen2.5-style reply, then the dispatch: (3+5)*2 = 16."""
    first = tools.parse_reply('Let me add first.\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 5}}'
                              '\n</tool_call>', parser="qwen")
    assert first["content"].strip() == "Let me add first."
    [call] = first["tool_calls"]
    ok, eight = tools.call_tool(call["name"], call["arguments"])
    assert ok and eight == 8
    second = tools.parse_reply(f'<tool_call>\n{{"name": "mul", "arguments": {{"a": {eight}, "b": 2}}}}\n</tool_call>')
    [call] = second["tool_calls"]
    assert tools.call_tool(call["name"], call["arguments"]) == (True, 16)
    internlm = tools.parse_reply('<|action_start|><|plugin|>\n{"name": "mul", "parameters": {"a": 8, "b": 2}}'
                                 '<|action_end|>', parser="internlm")
    assert internlm["tool_calls"] == [{"name": "mul", "arguments": '{"a": 8, "b": 2}'}]


def test_invalid_tool_calls_become_clear_messages():
    # lmdeploy itself drops a call to a function that was not offered
    assert tools.parse_reply('<tool_call>\n{"name": "pow", "arguments": {"a": 2}}\n</tool_call>')["tool_calls"] == []
    bad = tools.parse_reply('<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": }}\n</tool_call>')
    assert tools.call_tool("add", bad["tool_calls"][0]["arguments"])[1].startswith(
        "error: the arguments of add are not valid JSON")
    assert tools.call_tool("pow", {"a": 1}) == (False, "error: unknown function 'pow'; available: add, mul")
    assert "must be a JSON object" in tools.call_tool("add", '"{\\"a\\": 1}"')[1]
    assert "missing b" in tools.call_tool("add", {"a": 1})[1]
    assert "unexpected c" in tools.call_tool("add", {"a": 1, "b": 2, "c": 3})[1]
    assert "must be a number" in tools.call_tool("mul", {"a": True, "b": 2})[1]
    assert "must be a number" in tools.call_tool("mul", {"a": "__import__('os')", "b": 2})[1]


def test_forced_rounds_admit_exactly_the_wanted_call(tiny_dir):
    """lmdeploy's grammar for tool_choice='required' (xgrammar, as the engine compiles it for this tokenizer)
    accepts the planned call and nothing else."""
    import xgrammar as xgr
    from lmdeploy._guided_decoding import compile_response_format
    from lmdeploy.serve.openai.protocol import ChatCompletionRequest
    from lmdeploy.serve.parsers.response_parser import BaseResponseParser
    from transformers import AutoTokenizer

    plan = tools.forced_rounds([("add", {"a": 3, "b": 5}), ("mul", {"a": 8, "b": 2})])
    assert [r["tool_choice"] for r in plan] == ["required", "required", "none"]
    cls = type("ServerParser", (BaseResponseParser,), {})
    cls.set_parsers(tool_parser_name="qwen")
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}], tools=plan[0]["tools"],
                                tool_choice="required")
    fmt = cls(req).request.response_format
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    grammar = compile_response_format(xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok)), fmt)
    good = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 5}}\n</tool_call>'
    assert xgr.GrammarMatcher(grammar).accept_string(good)
    for bad in (good.replace("3", "4"), good.replace("add", "mul"), "The answer is 16"):
        assert not xgr.GrammarMatcher(grammar).accept_string(bad), bad
    assert tools.parse_reply(good)["tool_calls"][0]["name"] == "add"


# ----------------------------------------------------------------------------- load test and web UI (CPU parts)

@pytest.mark.parametrize("url", ["http://example.com:23333", "http://10.1.2.3:23333/v1", "https://8.8.8.8"])
def test_loadtest_refuses_other_hosts(url):
    with pytest.raises(loadtest.LoadTestError, match="only runs against this machine"):
        loadtest.run(url, concurrency=1, requests=1)
    with pytest.raises(loadtest.LoadTestError, match="only runs against this machine"):
        loadtest.sweep(url)


def test_loadtest_bounds():
    with pytest.raises(loadtest.LoadTestError, match="concurrency"):
        loadtest.run("http://127.0.0.1:9", concurrency=0, model="m")
    with pytest.raises(loadtest.LoadTestError, match="requests"):
        loadtest.run("http://127.0.0.1:9", requests=10**6, model="m")
    with pytest.raises(loadtest.LoadTestError, match="time_limit"):
        loadtest.run("http://127.0.0.1:9", time_limit=3600, model="m")


def test_loadtest_counts_failures_without_a_server():
    """Nothing listens: every request fails fast, and the row says so (no exception, no hang)."""
    port = serve.free_port()
    row = loadtest.run(f"http://127.0.0.1:{port}", concurrency=2, requests=4, model="m", time_limit=20)
    assert row["ok"] == 0 and row["failed"] == 4 and "Connection" in row["first error"]


def test_loadtest_sends_the_key_of_a_keyed_server(tiny_dir, standin, monkeypatch):
    """A URL gets OPENAI_API_KEY for its requests as for its model list (a Server: its own key)."""
    srv = serve.Server(tiny_dir, name=_name("keyed"), api_keys="sk-lab", command=standin + ["--key", "sk-lab"],
                       show=False)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-lab")
        row = loadtest.run(srv.base_url, concurrency=2, requests=4, max_tokens=3, time_limit=20)
        assert row["ok"] == 4 and row["first error"] is None, row
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        row = loadtest.run(srv, concurrency=1, requests=2, max_tokens=3, time_limit=20)
        assert row["ok"] == 2, row
        row = loadtest.run(srv.base_url, concurrency=1, requests=2, model=srv.model_name, time_limit=20)
        assert row["ok"] == 0 and "AuthenticationError" in row["first error"], row  # the stand-in checks keys
    finally:
        srv.stop()


def test_webui_messages_and_parts(tmp_path):
    img = tmp_path / "dot.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": "hello"}]
    msgs = webui.build_messages(history, "and now?", system="be brief")
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
    parts = webui.message_content([{"type": "text", "text": "what is this?"},
                                   {"type": "file", "file": {"path": str(img), "mime_type": "image/png"}}])
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="must be a URL"):
        webui.launch("localhost:23333")


def test_webui_launches_without_blocking_and_answers_its_api(tiny_dir, standin, capfd):
    """The app starts in the background; its API answers: model picker (from the stand-in's /v1/models),
    clear, undo; a chat without a model, or without a server, says why (in the UI, with no traceback in
    the notebook's output)."""
    from gradio_client import Client

    srv = serve.Server(tiny_dir, name=_name("ui"), command=standin, show=False)
    start = time.perf_counter()
    ui = webui.launch(srv)
    try:
        assert time.perf_counter() - start < 30 and ui.url.startswith("http://127.0.0.1:")
        client = Client(ui.url, verbose=False)
        picked = client.predict(api_name="/models")
        assert (picked["value"] if isinstance(picked, dict) else picked) == srv.model_name
        assert client.predict(api_name="/clear") == ([], "")
        assert client.predict(api_name="/undo") == ([], "")  # nothing to undo yet
        with pytest.raises(Exception, match="pick a model first"):
            client.predict("hi", None, "", 16, 0.8, 40, 0.7, api_name="/chat")
        srv.stop()
        with pytest.raises(Exception, match="cannot reach"):
            client.predict(api_name="/models")
        assert "Traceback" not in capfd.readouterr().err
    finally:
        ui.close()
        srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(ui.url.rsplit(":", 1)[1].strip("/"))), timeout=2).close()


def test_webui_ask_and_retry_drive_the_app_and_a_rerun_replaces_it(tiny_dir, standin):
    """ask / retry through gradio_client, as notebooks 02 and 05 do: the model comes from the app's picker,
    the reply streams in from the (stand-in) server; launching again closes the earlier app."""
    srv = serve.Server(tiny_dir, name=_name("ask"), command=standin, show=False)
    first = webui.launch(srv)
    try:
        assert webui.pick_model(first) == srv.model_name
        updates: list = []
        history = webui.ask(first, "hi", updates=updates, max_new_tokens=3)
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert webui.message_content(history[-1]["content"]) == "Hello from the"
        assert len(updates) > 1, "the reply did not stream"
        again = webui.retry(first, srv.model_name, max_new_tokens=2)  # the conversation lives in the app
        assert [m["role"] for m in again] == ["user", "assistant"]
        assert webui.message_content(again[-1]["content"]) == "Hello from"
        with pytest.raises(Exception, match="nothing to retry yet"):  # another session has its own conversation
            webui.retry(first.url, srv.model_name)
        chat, text = webui._ui_client(first).predict(api_name="/undo")  # Undo gives the last question back
        assert chat == [] and text == "hi"
        with pytest.raises(TypeError, match="use max_new_tokens"):
            webui.ask(first, "hi", max_tokens=3)
        with pytest.raises(ValueError, match="takes no history"):
            webui.retry(first, history, srv.model_name)
        second = webui.launch(srv)  # the same cell again
        second.close()
    finally:
        first.close()
        srv.stop()
    for ui in (first, second):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(ui.url.rsplit(":", 1)[1].strip("/"))), timeout=2).close()


def test_webui_vision_ask_sends_pictures_and_refuses_a_corrupt_one(tiny_dir, standin):
    """Notebook 05's web UI calls on CPU: an uploaded picture reaches the server as an image part; a corrupt
    one is refused by labkit.vision in the app, with its message, and never sent."""
    from labkit.vision import sample_images

    paths = sample_images()
    srv = serve.Server(tiny_dir, name=_name("vision-ui"), command=standin, show=False)
    try:
        with webui.launch(srv, vision=True) as ui:
            chat = webui.ask(ui, "What is in this picture?", srv.model_name, files=[paths["chart"]],
                             max_new_tokens=3)
            assert [m["role"] for m in chat] == ["user", "assistant"], chat  # what notebook 05 checks
            assert webui.message_content(chat[-1]["content"]) == "[1 image] Hello from"
            with pytest.raises(Exception, match="corrupt or truncated"):
                webui.ask(ui, "And this one?", files=[paths["corrupt"]], max_new_tokens=3)
    finally:
        srv.stop()


def test_log_echo_shows_complete_lines_finished_bars_and_counts_the_rest(tmp_path):
    """labkit.logtail.LogEcho: a half-written line waits, a running progress bar is dropped, a done one shown,
    and lines past max_shown are counted, not shown."""
    from labkit.logtail import LogEcho, tail_lines

    log, shown = tmp_path / "server.log", []
    log.write_bytes(b"loading\n 40%|####\r100%|##########\nhalf")
    echo = LogEcho(log, shown.append, max_shown=2)
    echo.pump()
    assert shown == ["  | loading", "  | 100%|##########"] and echo.skipped == 0
    with open(log, "ab") as f:
        f.write(b" done\nmore\n")
    echo.pump()
    assert shown[-1] == "  | 100%|##########" and echo.skipped == 2  # "half done" and "more": past max_shown
    assert tail_lines(log, 2) == ["half done\n", "more\n"]


def test_lab02s_last_check_sees_a_left_lmdeploy_process():
    """Lab 02's last check ("no lmdeploy server process is alive") on a process left running: a real process whose
    command line is lmdeploy's (`exec -a lmdeploy`) is found, and is no longer found once it is gone."""
    left = subprocess.Popen(["bash", "-c", "exec -a lmdeploy sleep 60"])
    try:
        deadline = time.monotonic() + 10
        while not any(p["pid"] == left.pid for p in serve.lmdeploy_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)  # until bash has exec'd
        assert any(p["pid"] == left.pid for p in serve.lmdeploy_processes())  # the check would fail here
    finally:
        left.kill()
        left.wait(timeout=10)
    assert not any(p["pid"] == left.pid for p in serve.lmdeploy_processes())
