"""The fault suite (docs/reliability.md has one row per case): each case does the wrong thing a student or an
attacker would do, and asserts the message the user sees, the time to it, and that nothing is left behind:
no process of ours, no port we listen on, no file lock we hold, no registry entry, and on a GPU no memory
beyond +-256 MiB of the baseline.

CPU where possible. Cases that need lmdeploy's real api_server or a CUDA engine carry the `gpu` marker; on CPU,
server lifecycle cases use the stand-in server of tests/test_serve.py (a real HTTP server process with a child,
started through the same code path: own process group, watchdog, registry, readiness wait), as that file does.
Each case prints one line `FAULT <case> | <seconds> s | <first line of the message>`: run with -s to see them.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import TINY
from labkit import engine, kvcache, loadtest, procs, serve, tools, vision, webui
from labkit.errors import LabkitError, OptionError, ServerError
from labkit.gpu import init_cuda_context, memory_used_or_none
from test_serve import STANDIN

ROOT = Path(__file__).resolve().parents[1]
GPU_SLACK = 256 * 2**20
# Python's and torch's own helpers: started once per interpreter on first use, they live as long as it does (one per
# kernel, not one per engine), hold no GPU memory and no port. Not an engine's leftovers.
KERNEL_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torch._inductor.compile_worker")


# ----------------------------------------------------------------------------- what is left behind

def _tree() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _listening(pids: set[int]) -> set[int]:
    import psutil

    ports = set()
    for pid in pids | {os.getpid()}:
        try:
            ports |= {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"}
        except psutil.Error:
            pass
    return ports


def _locks(pids: set[int]) -> set[str]:
    """Kernel file locks (/proc/locks: psutil has no API for them) held by these processes."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split(":", 1)[1].strip() for ln in lines if len(ln.split()) > 4 and ln.split()[4].isdigit()
            and int(ln.split()[4]) in pids}


class Snapshot:
    """Processes, listening ports, file locks, registry entries and GPU memory at one moment."""

    def __init__(self):
        self.tree = _tree()
        self.ports = _listening(self.tree)
        self.locks = _locks(self.tree | {os.getpid()})
        self.registry = {p.name for p in serve.registry_dir().glob("*.json")}
        self.gpu = memory_used_or_none()

    def left(self, before: "Snapshot") -> dict:
        import psutil

        alive = {}
        for pid in self.tree - before.tree:
            try:
                proc = psutil.Process(pid)
                command = " ".join(proc.cmdline())
                if proc.status() != psutil.STATUS_ZOMBIE and not any(h in command for h in KERNEL_HELPERS):
                    alive[pid] = command[:160]
            except psutil.Error:
                pass
        out = {"processes": alive, "ports": self.ports - before.ports, "locks": self.locks - before.locks,
               "registry": self.registry - before.registry}
        if before.gpu is not None and self.gpu is not None and abs(self.gpu - before.gpu) > GPU_SLACK:
            out["gpu MiB"] = round((self.gpu - before.gpu) / 2**20)
        return {k: v for k, v in out.items() if v}


def assert_nothing_left(before: Snapshot, timeout: float = 15.0) -> None:
    """Poll until nothing of the case is left (process exits take a moment); fail with what is."""
    end = time.monotonic() + timeout
    while True:
        left = Snapshot().left(before)
        if not left or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert not left, f"left behind: {left}"


def _report(case: str, seconds: float, message: str) -> None:
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    print(f"\nFAULT {case} | {seconds:.2f} s | {first[:220]}")


def _refused(case: str, call, exc=LabkitError, within: float = 2.0, match: str | None = None) -> str:
    """Run `call`, expecting `exc` within `within` s and nothing left; the message."""
    before = Snapshot()
    start = time.perf_counter()
    with pytest.raises(exc) as err:
        call()
    took = time.perf_counter() - start
    msg = str(err.value)
    _report(case, took, msg)
    assert took < within, f"{case}: took {took:.2f} s"
    if match:
        assert re.search(match, msg), f"{case}: {msg!r} does not say {match!r}"
    assert_nothing_left(before)
    return msg


def _interrupt(kernel: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """Ctrl-C (SIGINT) to a kernel stand-in that prints `INTERRUPTED <time>`: (its output, seconds until it landed)."""
    sent = time.time()
    kernel.send_signal(signal.SIGINT)
    out, _ = kernel.communicate(timeout=timeout)
    m = re.search(r"INTERRUPTED ([\d.]+)", out)
    assert m, out[-2000:]
    return out, float(m.group(1)) - sent


def _name(tag: str) -> str:
    return f"fault-{tag}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def tiny_vl_dir():
    from labkit.models import resolve

    return resolve("generated:tiny-vl")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("standin") / "standin.py"
    path.write_text(STANDIN)
    return [sys.executable, str(path), "{port}", "{name}", "{host}"]


def _entry(name: str, timeout: float = 20.0) -> dict:
    """The registry entry of the server called `name`, once it is there."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in serve.servers(clean=False):
            if e["name"] == name:
                return e
        time.sleep(0.02)
    raise AssertionError(f"no registry entry for {name}")


def _standin_pid(log: Path, timeout: float = 20.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(r"^standin (\d+) child", log.read_text() if log.exists() else "", re.M)
        if m:
            return int(m.group(1))
        time.sleep(0.02)
    raise AssertionError(f"the stand-in never started: {log.read_text() if log.exists() else '(no log)'}")


# ----------------------------------------------------------------------------- 1. ports

def test_busy_port(tiny_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _refused("busy port", lambda: serve.Server(tiny_dir, name=_name("busy"), port=port, show=False),
                 ServerError, 2.0, f"port {port} on 127.0.0.1 is busy")


class _Impostor(BaseHTTPRequestHandler):
    """Another program on our port that even lists the same model name."""

    model = "tiny-chat"

    def do_GET(self):  # noqa: N802
        body = json.dumps({"object": "list", "data": [{"id": type(self).model, "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_port_stolen_during_load(tiny_dir, standin, monkeypatch):
    """Another program binds the port while the server loads and answers /v1/models with the same model name:
    labkit does not take it for its server (its process group does not own the socket); the server fails to
    bind and the message says the port is busy."""
    monkeypatch.setenv("STANDIN_DELAY", "3")
    name, stolen = _name("stolen"), {}

    def steal():
        entry = _entry(name)
        httpd = ThreadingHTTPServer(("127.0.0.1", entry["port"]), _Impostor)
        stolen["httpd"] = httpd
        threading.Thread(target=httpd.serve_forever, daemon=True).start()

    thief = threading.Thread(target=steal, daemon=True)
    thief.start()
    before = Snapshot()
    start = time.perf_counter()
    try:
        with pytest.raises(ServerError) as err:
            serve.Server(tiny_dir, name=name, command=standin, show=False, model_name="tiny-chat")
        took = time.perf_counter() - start
        _report("port stolen during load", took, str(err.value))
        assert "busy" in str(err.value) and "exited while loading" in str(err.value)
        assert took < 15
        assert "httpd" in stolen, "the port was not stolen in time"
    finally:
        thief.join(5)
        if "httpd" in stolen:
            stolen["httpd"].shutdown()
            stolen["httpd"].server_close()
    assert_nothing_left(before)


# ----------------------------------------------------------------------------- 2. a server killed

@pytest.mark.parametrize("who", ["server", "watchdog"])
def test_server_killed_while_loading(tiny_dir, standin, monkeypatch, who):
    """SIGKILL (the kernel's OOM killer, or a hand) to the server, or to its watchdog, while it loads."""
    monkeypatch.setenv("STANDIN_DELAY", "30")
    name, killed = _name(f"kill-{who}"), {}

    def kill():
        entry = _entry(name)
        pid = _standin_pid(Path(entry["log"])) if who == "server" else entry["pid"]
        os.kill(pid, signal.SIGKILL)
        killed["at"] = time.perf_counter()

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    before = Snapshot()
    with pytest.raises(ServerError) as err:
        serve.Server(tiny_dir, name=name, command=standin, show=False)
    took = time.perf_counter() - killed["at"]
    msg = str(err.value)
    _report(f"{who} killed (SIGKILL) while loading", took, msg.split("\n")[0])
    assert "Likely cause: killed by SIGKILL: out of host memory" in msg and "killed by hand?" in msg
    assert took < 3.0, f"the death took {took:.1f} s to report"
    assert_nothing_left(before)


def test_server_killed_while_serving(tiny_dir, standin):
    before = Snapshot()
    name = _name("kill-serving")
    srv = serve.Server(tiny_dir, name=name, command=standin, show=False)
    try:
        os.kill(srv.pid, signal.SIGKILL)
        start = time.perf_counter()
        while srv.alive and time.perf_counter() - start < 10:
            time.sleep(0.05)
        took = time.perf_counter() - start
        _report("server killed (SIGKILL) while serving", took, repr(srv))
        assert not srv.alive and "exited" in repr(srv) and took < 3
        assert not [e for e in serve.servers() if e["name"] == name], "the registry still lists the dead server"
        again = serve.Server(tiny_dir, name=name, command=standin, show=False)  # the cell runs again at once
        assert again.client().models.list().data[0].id == again.model_name
        again.stop()
    finally:
        srv.stop()
    assert_nothing_left(before)


def test_stale_registry_entry_never_signals_a_stranger(tmp_path):
    """An entry whose pid (and process group) now belongs to another program (pid reuse) is 'gone':
    `labkit servers --stop --all` leaves the stranger alone. (Before entries were matched by start time and
    command line, this SIGTERMed the stranger's whole process group.)"""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        entry = {"name": "stale", "pid": stranger.pid, "pgid": stranger.pid, "pid_start": 1.0,
                 "pid_cmdline": ["python", "-m", "labkit.procs", "watch"], "owner_pid": 1, "owner_start": 1.0,
                 "host": "127.0.0.1", "port": 1, "url": "http://127.0.0.1:1", "model": "m", "log": "-",
                 "started": time.time(), "command": "lmdeploy serve api_server m"}
        path = serve.registry_dir() / f"{stranger.pid}.json"
        path.write_text(json.dumps(entry))
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "labkit.cli", "servers", "--stop", "--all"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        _report("stale registry entry (pid reused)", time.perf_counter() - start, done.stdout)
        assert done.returncode == 0, done.stderr
        time.sleep(0.5)
        assert stranger.poll() is None, "labkit signalled a process it did not start"
        assert not path.exists(), "the stale entry was kept"
    finally:
        stranger.kill()
        stranger.wait()


# ----------------------------------------------------------------------------- 3. the kernel

KERNEL = textwrap.dedent("""
    import os, sys, time, signal
    from labkit import serve
    srv = serve.Server({model!r}, name={name!r}, command={command!r}, show=False)
    print("PGID", srv.pgid, flush=True)
    time.sleep(120)
""")


def test_kernel_killed(tiny_dir, standin):
    before = Snapshot()
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL.format(model=str(tiny_dir), name=_name("kernel"),
                                                                   command=standin)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    pgid = int(kernel.stdout.readline().split()[1])
    kernel.kill()
    start = time.perf_counter()
    while serve.group_members(pgid) and time.perf_counter() - start < 15:
        time.sleep(0.05)
    took = time.perf_counter() - start
    kernel.wait()
    _report("kernel killed (SIGKILL)", took, f"server group {pgid} gone")
    assert not serve.group_members(pgid) and took < 3
    assert_nothing_left(before)


INTERRUPTED_SERVER = textwrap.dedent("""
    import os, sys, time
    os.environ["STANDIN_DELAY"] = "30"
    from labkit import serve
    try:
        serve.Server({model!r}, name="interrupted", command={command!r}, show=False)
    except KeyboardInterrupt:
        print("INTERRUPTED", time.time(), flush=True)
    os.environ["STANDIN_DELAY"] = "0.2"
    srv = serve.Server({model!r}, name="interrupted", command={command!r}, show=False)  # the cell again
    print("RERUN", srv.client().models.list().data[0].id, flush=True)
    srv.stop()
""")


def test_kernel_interrupted_while_a_server_loads(tiny_dir, standin):
    before = Snapshot()
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SERVER.format(model=str(tiny_dir),
                                                                               command=standin)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    entry = _entry("interrupted")
    _standin_pid(Path(entry["log"]))
    out, took = _interrupt(kernel, timeout=60)
    _report("kernel interrupted while a server loads", took, "interrupted: stopping server 'interrupted'")
    assert "interrupted: stopping server 'interrupted'" in out and "RERUN" in out, out
    assert not serve.group_members(entry["pgid"]) and took < 10
    assert_nothing_left(before)


INTERRUPTED_STREAM = textwrap.dedent("""
    import threading, time
    from labkit.baseline import HFEngine
    hf = HFEngine({model!r}, device="cpu")
    try:
        for i, piece in enumerate(hf.stream("hi", max_new_tokens=3000, ignore_eos=True, temperature=0)):
            if i == 5:
                print("STREAMING", flush=True)
    except KeyboardInterrupt:
        print("INTERRUPTED", time.time(), flush=True)
    threads = [t.name for t in threading.enumerate() if t.name == "labkit-hf-generate"]
    print("THREADS", threads, flush=True)
    again = "".join(r.text for r in hf.stream("hi", max_new_tokens=4))  # the cell again
    print("RERUN", len(again) > 0, flush=True)
    hf.close()
""")


def test_kernel_interrupted_while_the_baseline_streams():
    """Ctrl-C in the middle of HFEngine.stream: the interrupt lands at once (it waited for the whole generation
    in thread.join() before), the generation thread ends, and streaming again works."""
    before = Snapshot()
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED_STREAM.format(model=TINY)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in kernel.stdout:
        if line.startswith("STREAMING"):
            break
    out, took = _interrupt(kernel, timeout=120)
    _report("kernel interrupted while the baseline streams", took, "KeyboardInterrupt")
    assert took < 1.5, f"Ctrl-C took {took:.1f} s to land"
    assert "THREADS []" in out and "RERUN True" in out, out
    assert_nothing_left(before)


INTERRUPTED_AWQ = textwrap.dedent("""
    import time
    from labkit import quant
    try:
        quant.awq({model!r}, work_dir={out!r}, device="cpu", calib_samples=4, calib_seqlen=64)
    except KeyboardInterrupt:
        print("INTERRUPTED", time.time(), flush=True)
    print("AGAIN", quant.awq({model!r}, work_dir={out!r}, device="cpu", calib_samples=4, calib_seqlen=64), flush=True)
""")


def test_kernel_interrupted_during_awq(tmp_path, tiny_dir):
    """Ctrl-C while lmdeploy's AWQ runs: its half-written folder goes, and the cell runs again."""
    out = tmp_path / "awq"
    before = Snapshot()
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED_AWQ.format(model=TINY, out=str(out))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    end = time.monotonic() + 120
    while not list(tmp_path.glob(".*-awq-*")) and time.monotonic() < end and kernel.poll() is None:
        time.sleep(0.02)
    assert list(tmp_path.glob(".*-awq-*")), "AWQ never started"
    text, took = _interrupt(kernel, timeout=300)
    _report("kernel interrupted during AWQ", took, "KeyboardInterrupt; half-written folder removed")
    assert took < 10 and "AGAIN" in text and (out / "config.json").exists(), text[-2000:]
    assert not list(tmp_path.glob(".*-awq-*")), "the half-written AWQ folder was left"
    assert_nothing_left(before)


# ----------------------------------------------------------------------------- 4. re-running start cells

def test_rerunning_every_start_cell(tiny_dir, standin):
    """Server, web UI and the transformers baseline, each started twice under one name (the cell run again):
    the second replaces the first, whose port and memory go."""
    from labkit.baseline import HFEngine

    before = Snapshot()
    start = time.perf_counter()
    name = _name("rerun")
    first = serve.Server(tiny_dir, name=name, command=standin, show=False)
    second = serve.Server(tiny_dir, name=name, command=standin, show=False)
    assert first.stopped and not serve.group_members(first.pgid) and second.alive
    ui1 = webui.launch(second)
    ui2 = webui.launch(second)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(ui1.url.rsplit(":", 1)[1].strip("/"))), timeout=2).close()
    hf1 = HFEngine(TINY, device="cpu", name="fault-baseline")
    hf2 = HFEngine(TINY, device="cpu", name="fault-baseline")
    assert hf1.closed and not hf2.closed
    took = time.perf_counter() - start
    _report("re-running every start cell", took, "stopping the earlier server / closing the earlier web UI, baseline")
    hf2.close()
    ui2.close()
    second.stop()
    assert_nothing_left(before)


@pytest.mark.gpu
def test_rerunning_the_engine_cell_does_not_double_gpu_memory():
    init_cuda_context()  # this process's CUDA context never goes back: not the engine's to return
    before = Snapshot()
    first = engine.Engine(TINY, name="fault-engine", cache_ratio=0.1)
    used = memory_used_or_none()
    start = time.perf_counter()
    second = engine.Engine(TINY, name="fault-engine", cache_ratio=0.1)
    _report("re-running the engine cell (GPU)", time.perf_counter() - start, "closing the earlier engine")
    assert first.closed and abs(memory_used_or_none() - used) < GPU_SLACK
    second.close()
    assert_nothing_left(before)


# ----------------------------------------------------------------------------- 5. bad models and options

@pytest.mark.parametrize("model", ["/no/such/model", "./no-such-model", "no-org/no-such-model-xyz"])
def test_wrong_model_path(model):
    from labkit.models import ModelNotFoundError

    _refused(f"wrong model path {model}", lambda: serve.Server(model, name=_name("path"), show=False),
             ModelNotFoundError, 5.0, "does not exist|not found")


def test_unsupported_model(tmp_path, tiny_dir):
    for arch, want in [("FooForCausalLM", "has no engine for FooForCausalLM"),
                       ("InternLMForCausalLM", "dropped InternLM")]:
        folder = tmp_path / arch
        folder.mkdir()
        cfg = json.loads((tiny_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
        for f in tiny_dir.glob("*.safetensors"):
            (folder / f.name).symlink_to(f)
        _refused(f"unsupported model ({arch})", lambda: serve.Server(folder, name=_name("arch"), show=False),
                 engine.EngineError, 15.0, want)


@pytest.mark.parametrize("ratio", [0, 1.5, "abc"])
def test_cache_ratio(tiny_dir, ratio):
    _refused(f"cache ratio {ratio!r}", lambda: serve.Server(tiny_dir, name=_name("ratio"), cache_ratio=ratio,
                                                            show=False), OptionError, 1.0, r"\(0, 1\]")


def test_quant_policy(tiny_dir):
    _refused("quant policy 3", lambda: serve.Server(tiny_dir, name=_name("kv"), quant_policy=3, show=False),
             OptionError, 1.0, r"must be one of \[0, 4, 8, 16, 17, 42\]")
    _refused("quant policy 16 on TurboMind", lambda: kvcache.check_policy(16, "turbomind"), OptionError, 1.0,
             "refused by TurboMind")


def test_no_usable_gpu(tiny_dir):
    from labkit.gpu import has_cuda

    if has_cuda():
        pytest.skip("this machine has a GPU")
    _refused("Server without a usable GPU", lambda: serve.Server(tiny_dir, name=_name("nogpu"), show=False),
             ServerError, 5.0, "not started: .*needs a CUDA GPU")


@pytest.mark.gpu
def test_gpu_too_full():
    import torch

    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 768 * 2**20), dtype=torch.uint8, device="cuda")  # leave 0.75 GiB
    try:
        _refused("GPU too full", lambda: engine.Engine(TINY, name="fault-full"),
                 LabkitError, 5.0, "needs about .* GiB free")
    finally:
        del hog
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_engine_that_fails_lmdeploys_environment_check():
    """lmdeploy's PyTorch engine checks its options in a child process and calls exit(1) on a failure (here its own
    check of max_batch_size, which labkit passes through): one EngineError line, not a SystemExit that would end the
    kernel, and nothing left. The other side of fault 8b (a Ctrl-C that the same check turns into exit(1))."""
    init_cuda_context()  # this process's CUDA context never goes back: not the engine's to return
    _refused("lmdeploy's environment check fails (GPU)",
             lambda: engine.Engine(TINY, backend="pytorch", name="fault-envcheck", cache_ratio=0.05, max_batch_size=0),
             engine.EngineError, 90.0, "failed lmdeploy's environment check")


def test_small_input_mistakes():
    _refused("engine_config('foo')", lambda: engine.engine_config("foo"), engine.EngineError, 1.0,
             "needs backend 'turbomind' or 'pytorch'")
    _refused("max_tokens=8", lambda: engine.gen_config(max_tokens=8), engine.EngineError, 1.0, "use max_new_tokens")
    _refused("temperature=-1", lambda: engine.gen_config(temperature=-1), engine.EngineError, 1.0,
             "temperature must be >= 0.*not -1")
    port = serve.free_port()
    _refused("loadtest.run with no server", lambda: loadtest.run(f"http://127.0.0.1:{port}", concurrency=1,
                                                                 requests=1), loadtest.LoadTestError, 5.0,
             "no server answers at")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "models", "generate", "huge"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    _report("labkit models generate huge", time.perf_counter() - start, done.stderr)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no generated model called 'huge'" in done.stderr and "Traceback" not in done.stderr


def test_nvml_driver_library_mismatch_is_named():
    """A real pynvml error object (the one NVML raises after a driver update without a reboot)."""
    import pynvml

    from labkit import doctor
    from labkit.gpu import explain_nvml_error

    err = pynvml.NVMLError(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    said = explain_nvml_error(err)
    _report("NVML driver/library mismatch", 0.0, said)
    assert said.startswith("NVIDIA driver/library version mismatch") and "reboot" in said
    row = doctor.no_gpu_row(said)
    assert "mismatch" in row.value and "no NVIDIA GPU visible" not in row.value and "reboot" in row.fix
    assert explain_nvml_error(pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)) is None  # simply no driver
    assert "no NVIDIA GPU visible" in doctor.no_gpu_row(None).value


# ----------------------------------------------------------------------------- 6. images and tool calls

def test_bad_images(tmp_path, tiny_vl_dir):
    paths = vision.sample_images()
    _refused("image corrupt", lambda: vision.load(paths["corrupt"]), vision.ImageError, 1.0, "corrupt or truncated")
    _refused("not an image", lambda: vision.load(paths["not_image"]), vision.ImageError, 1.0, "")
    _refused("image too large", lambda: vision.require_fit(tiny_vl_dir, (8000, 8000), session_len=512),
             vision.ImageTooLargeError, 1.0, "does not fit")
    _refused("image path outside the upload folder", lambda: webui.uploaded_file("/etc/hostname",
                                                                               webui.upload_dir()),
             webui.UploadError, 1.0, "reads only files uploaded through the page")


def test_malformed_tool_call_arguments():
    start = time.perf_counter()
    bad = tools.parse_reply('<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": }}\n</tool_call>')
    ok, said = tools.call_tool("add", bad["tool_calls"][0]["arguments"])
    _report("malformed tool call arguments", time.perf_counter() - start, said)
    assert not ok and said.startswith("error: the arguments of add are not valid JSON")
    assert tools.call_tool("mul", {"a": "__import__('os')", "b": 2})[0] is False  # never eval'd


# ----------------------------------------------------------------------------- 7. clients

def test_64_concurrent_clients_on_the_load_test(tiny_dir, standin):
    before = Snapshot()
    srv = serve.Server(tiny_dir, name=_name("load64"), command=standin, show=False)
    try:
        start = time.perf_counter()
        row = loadtest.run(srv, concurrency=64, requests=64, max_tokens=4, time_limit=60)
        took = time.perf_counter() - start
        _report("64 concurrent clients on the load test", took, f"ok {row['ok']}, failed {row['failed']}")
        assert row["ok"] == 64 and row["failed"] == 0, row
        assert took < 30
    finally:
        srv.stop()
    assert_nothing_left(before)


@pytest.mark.gpu
def test_gpu_real_server_client_disconnects_mid_stream_then_64_clients():
    """The real api_server: a client that drops a stream after two chunks; the server keeps serving (a new
    request answers), 64 concurrent clients all get replies, and stopping it gives the GPU memory back."""
    before = Snapshot()
    srv = serve.Server(TINY, name=_name("real"), cache_ratio=0.1, show=False)
    try:
        client = srv.client()
        stream = client.chat.completions.create(model=srv.model_name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=512, stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        start = time.perf_counter()
        reply = client.chat.completions.create(model=srv.model_name, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        _report("client disconnects mid-stream (GPU)", time.perf_counter() - start, "next request answered")
        assert reply.choices[0].message.content is not None
        row, rec = loadtest.run(srv, concurrency=64, requests=64, max_tokens=16, time_limit=120, detail=True)
        # the server's part: every request streamed to its end (16 tokens, finish_reason 'length'); a random-weight
        # model may spend all 16 on tokens that decode to no text, which the load test counts as "no text"
        done = (rec["finish"] == "length") & (rec["tokens"] == 16)
        _report("64 concurrent clients (GPU)", row["seconds"],
                f"{int(done.sum())} of 64 streamed 16 tokens to finish 'length' ({row['failed']} with no text)")
        assert done.all(), (f"{int((~done).sum())} of 64 did not stream to their end; first error: {row['first error']}\n"
                            + rec[~done][["tokens", "finish", "error"]].head(5).to_string())
    finally:
        srv.stop()
    assert_nothing_left(before, timeout=30)


@pytest.mark.gpu
def test_gpu_real_server_killed_while_loading():
    before = Snapshot()
    name, killed = _name("real-kill"), {}

    def kill():
        entry = _entry(name, timeout=60)
        end = time.monotonic() + 60
        while time.monotonic() < end and not procs.children_of(entry["pid"]):
            time.sleep(0.05)
        time.sleep(2.0)  # lmdeploy is importing / loading now
        os.kill(procs.children_of(entry["pid"])[0], signal.SIGKILL)
        killed["at"] = time.perf_counter()

    threading.Thread(target=kill, daemon=True).start()
    with pytest.raises(ServerError) as err:
        serve.Server(TINY, name=name, cache_ratio=0.1, show=False)
    took = time.perf_counter() - killed["at"]
    _report("real server killed (SIGKILL) while loading (GPU)", took, str(err.value).split("\n")[0])
    assert "killed by SIGKILL" in str(err.value) and took < 5
    assert_nothing_left(before, timeout=30)


INTERRUPTED_ENGINE = textwrap.dedent("""
    import os, signal, threading, time
    import torch, lmdeploy  # imported first: the interrupt is meant to land inside pipeline(), not in an import
    from lmdeploy import pipeline
    from labkit.engine import Engine
    from labkit.gpu import init_cuda_context, memory_used
    init_cuda_context()  # the kernel's own CUDA context (~0.7 GiB) stays for its life: not the engine's to free
    Engine({model!r}, name="fault", cache_ratio=0.1).close()  # the engine's lazy imports done: the Ctrl-C below
    base = memory_used()                                     # lands in the load itself (weights, cache), not in one

    def ctrl_c_while_loading():  # Ctrl-C once the load is allocating (a warm TurboMind load takes under a second)
        while memory_used() - base < 256 * 2**20:
            time.sleep(0.002)
        print("SENT", time.time(), flush=True)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_while_loading, daemon=True).start()
    print("LOADING", flush=True)
    try:
        Engine({model!r}, name="fault", cache_ratio=0.1)
    except KeyboardInterrupt:
        print("INTERRUPTED", time.time(), (memory_used() - base) // 2**20, flush=True)
    eng = Engine({model!r}, name="fault", cache_ratio=0.1)  # the cell again
    try:
        for i, r in enumerate(eng.stream("hi", max_new_tokens=4000, ignore_eos=True)):
            if i == 5:
                print("STREAMING", flush=True)
    except KeyboardInterrupt:
        print("STREAM-INTERRUPTED", time.time(), flush=True)
    print("AGAIN", eng.generate("hi", max_new_tokens=4).generate_token_len, flush=True)
    eng.close()
    print("LEFT MiB", (memory_used() - base) // 2**20, flush=True)
""")


@pytest.mark.gpu
def test_gpu_kernel_interrupted_while_an_engine_loads_and_while_it_streams():
    before = Snapshot()
    kernel = subprocess.Popen([sys.executable, "-c", INTERRUPTED_ENGINE.format(model=TINY)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []  # the kernel sends itself the first Ctrl-C, inside pipeline() (SENT), the test the second
    for line in kernel.stdout:
        lines.append(line)
        if line.startswith("STREAMING"):
            break
    sent_stream = time.time()
    kernel.send_signal(signal.SIGINT)
    try:
        out = "".join(lines) + kernel.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:  # a hang is a failure, and leaves nothing running either
        kernel.kill()
        out = "".join(lines) + kernel.communicate()[0]
        raise AssertionError("the kernel hung after the interrupts:\n" + out[-3000:]) from None
    load = re.search(r"INTERRUPTED ([\d.]+) (-?\d+)", out)
    sent = float(re.search(r"SENT ([\d.]+)", out).group(1)) if "SENT " in out else float("inf")
    stream = re.search(r"STREAM-INTERRUPTED ([\d.]+)", out)
    left = re.search(r"LEFT MiB (-?\d+)", out)
    assert load and stream and left and "AGAIN" in out, out[-3000:]
    _report("kernel interrupted while an engine loads (GPU)", float(load.group(1)) - sent,
            f"interrupted: engine not started; {load.group(2)} MiB still held")
    _report("kernel interrupted while an engine streams (GPU)", float(stream.group(1)) - sent_stream,
            "KeyboardInterrupt")
    assert float(load.group(1)) - sent < 30 and float(stream.group(1)) - sent_stream < 5
    assert abs(int(left.group(1))) * 2**20 < GPU_SLACK, f"{left.group(1)} MiB still held after close"
    assert_nothing_left(before, timeout=30)
