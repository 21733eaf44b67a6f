"""`lmdeploy serve api_server` as a child process that a notebook starts, watches and always stops (lab 02).

    with labkit.serve.Server("generated:tiny-chat", cache_ratio=0.1) as srv:
        print(srv.client().models.list())

Before anything loads: the model is resolved, the engine options are checked and the port is checked
(a busy port fails in milliseconds). While it loads, the server's log streams into the notebook; if it
dies, `ServerError` carries the log tail and the likely cause. The server runs in its own process
group under a tiny watchdog (`python -m labkit.serve watch ...`) that takes the group down when the
kernel dies, however it dies; `stop()`, a `with` block, interpreter exit (atexit), SIGTERM, Ctrl-C
while loading and a second Server with the same name stop it too. Every server is registered under
LABKIT_HOME/servers, so `labkit servers` lists them and `labkit servers --stop` stops strays.
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from labkit import config
from labkit.diagnose import diagnose  # noqa: F401  (labkit.serve.diagnose is public)
from labkit.gpu import GiB, gpus, memory_used_or_none, process_memory, require_gpu

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STOP_GRACE_S = 8.0          # SIGTERM, then SIGKILL after this long (lmdeploy needs ~3 s)
WATCH_INTERVAL_S = 0.5      # how often the watchdog looks at its parent
_live: dict[str, "Server"] = {}


class ServerError(RuntimeError):
    """A server could not start or stopped unexpectedly; the message says why and what to do."""


# ----------------------------------------------------------------------------- ports and processes

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on `host`: the loopback address for "every
    interface" ("0.0.0.0" or "" -> 127.0.0.1, "::" -> ::1), IPv6 addresses in brackets ([::1])."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def openai_client(base_url: str, api_key: str = "none", timeout: float = 120.0, **kwargs: Any):
    """An openai.OpenAI client for a server on this machine (…/v1 URL; proxy settings ignored). A request
    without an answer for `timeout` s fails once (no retries), saying what to do."""
    import httpx
    import openai

    class Explained(httpx.HTTPTransport):
        def handle_request(self, request):
            try:
                return super().handle_request(request)
            except httpx.TimeoutException as err:
                raise type(err)(f"the server at {base_url} gave no answer within {timeout:g} s: it may be stuck or "
                                f"overloaded; check server.alive and server.log_tail(), stop it (server.stop(), or "
                                f"`labkit servers --stop`), or pass timeout=... to the client", request=request) from err

    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=base_url, api_key=api_key, **kwargs,
                         http_client=httpx.Client(trust_env=False, timeout=timeout, transport=Explained()))


def check_port(host: str, port: int) -> int:
    """The port itself if a server could listen on host:port now, else a ServerError saying who holds it."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ServerError(f"port must be a whole number in 1..65535, not {port!r} (or None for a free one)")
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "busy"
        try:
            s.bind((host, port))
        except OSError as err:
            holder = next((e for e in servers() if e.get("port") == port and e["state"] != "gone"), None)
            who = (f"labkit's server {holder['name']!r} (pid {holder['pid']}) holds it: stop it, or run "
                   f"`labkit servers --stop`" if holder else "another program holds it (`ss -ltnp` shows which)")
            raise ServerError(f"port {port} on {host} is busy ({err.strerror}): {who}; "
                              f"or leave port=None to get a free one") from None
    return port


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start ticks) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(pgid: int, grace: float = STOP_GRACE_S, proc: subprocess.Popen | None = None) -> float:
    """SIGTERM to process group `pgid`, SIGKILL after `grace` s; wait until it is empty; return seconds."""
    start = time.monotonic()
    strays = _descendants_outside(pgid)
    _signal_group(pgid, signal.SIGTERM)
    killed = False
    while True:
        if proc is not None:
            proc.poll()  # reap our own child so it does not linger as a zombie
        if not group_members(pgid):
            break
        elapsed = time.monotonic() - start
        if not killed and elapsed > grace:
            _signal_group(pgid, signal.SIGKILL)
            killed = True
        if elapsed > grace + 10:
            raise ServerError(f"process group {pgid} survived SIGKILL: processes {group_members(pgid)}; "
                              f"check them with `ps -o pid,stat,cmd -g {pgid}`")
        time.sleep(0.05)
    for p in strays:  # children that left the group (setsid): they go too
        try:
            p.kill()
        except Exception:
            pass
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return time.monotonic() - start


def _descendants_outside(pgid: int) -> list:
    """Descendants of the group's processes that moved to another process group (psutil, if present)."""
    try:
        import psutil
    except ImportError:
        return []
    out = []
    for pid in group_members(pgid):
        try:
            out += [c for c in psutil.Process(pid).children(recursive=True) if os.getpgid(c.pid) != pgid]
        except (psutil.Error, OSError):
            pass
    return out


# ----------------------------------------------------------------------------- the watchdog

def _set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` to this process when its parent dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def watch(parent: int, grace: float, command: list[str]) -> int:
    """The watchdog: run `command` in this process group; take the group down when `parent` dies.

    It runs as the group leader (the Server starts it with start_new_session=True). It polls its
    parent pid rather than relying on PR_SET_PDEATHSIG alone, because that signal follows the parent
    *thread* (a server started from a worker thread would die with the thread). The api_server
    itself gets PR_SET_PDEATHSIG=SIGTERM from this single-threaded watchdog, so it also goes if the
    watchdog is killed.
    """
    stopping: dict[str, Any] = {"why": None}

    def on_signal(signum, _frame):
        stopping["why"] = stopping["why"] or f"signal {signal.Signals(signum).name}"

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    child = subprocess.Popen(command, preexec_fn=lambda: _set_parent_death_signal(signal.SIGTERM))
    print(f"[labkit] watchdog {os.getpid()} runs pid {child.pid}; it stops the group when pid {parent} exits",
          flush=True)
    deadline = None
    while True:
        try:
            rc = child.wait(timeout=WATCH_INTERVAL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopping["why"] is None and os.getppid() != parent:
            stopping["why"] = f"its parent (pid {parent}) exited"
        if stopping["why"] is not None:
            if deadline is None:
                print(f"[labkit] stopping the server: {stopping['why']}", flush=True)
                deadline = time.monotonic() + grace
                os.killpg(os.getpgrp(), signal.SIGTERM)  # this process only notes it (handler above)
            elif time.monotonic() > deadline:
                print("[labkit] the server ignored SIGTERM: SIGKILL to its process group", flush=True)
                os.killpg(os.getpgrp(), signal.SIGKILL)  # ends this process too
    print(f"[labkit] the server process exited with code {rc}", flush=True)
    # Whatever the server left in its group (engine workers) goes with it.
    me = os.getpid()
    others = [p for p in group_members(os.getpgrp()) if p != me]
    if others:
        os.killpg(os.getpgrp(), signal.SIGTERM)
        end = time.monotonic() + min(grace, 5.0)
        while [p for p in group_members(os.getpgrp()) if p != me] and time.monotonic() < end:
            time.sleep(0.05)
        if [p for p in group_members(os.getpgrp()) if p != me]:
            os.killpg(os.getpgrp(), signal.SIGKILL)
    return rc


# ----------------------------------------------------------------------------- the registry

def registry_dir() -> Path:
    """Where labkit notes the servers it started (one JSON file per server)."""
    path = config.home() / "servers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state(entry: dict) -> str:
    """'running' (its notebook lives), 'stray' (notebook gone, server alive) or 'gone'."""
    if not group_members(entry["pgid"]):
        return "gone"
    owner = _proc_stat(entry["owner_pid"])
    return "running" if owner is not None and owner[3] == entry.get("owner_start") else "stray"


def servers(clean: bool = True) -> list[dict]:
    """Every server labkit started that the registry knows, with its state; drops entries of gone ones."""
    out = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entry["state"] = _state(entry)
        entry["file"] = str(path)
        if entry["state"] == "gone" and clean:
            path.unlink(missing_ok=True)
            continue
        out.append(entry)
    return out


def servers_table(clean: bool = True):
    """The registry as a pandas table (name, state, pid, url, model, uptime, log)."""
    import pandas as pd

    rows = [{"name": e["name"], "state": e["state"], "pid": e["pid"], "url": e["url"], "model": e["model"],
             "owner pid": e["owner_pid"], "up s": round(time.time() - e["started"]), "log": e["log"]}
            for e in servers(clean)]
    return pd.DataFrame(rows, columns=["name", "state", "pid", "url", "model", "owner pid", "up s", "log"])


def stop_registered(entry: dict, grace: float = STOP_GRACE_S) -> float:
    """Stop a registered server (the whole process group) and drop its registry entry; return seconds."""
    took = stop_group(entry["pgid"], grace) if (entry.get("state") or _state(entry)) != "gone" else 0.0
    Path(entry.get("file") or registry_dir() / f"{entry['pid']}.json").unlink(missing_ok=True)
    return took


def lmdeploy_processes() -> list[dict]:
    """Live processes of lmdeploy (its command line runs lmdeploy) or of a server labkit registered."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    groups = {e["pgid"] for e in servers(clean=False)}
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        runs_lmdeploy = any(a == "lmdeploy" or a.endswith("/lmdeploy") or a.startswith("lmdeploy.") for a in cmd)
        try:
            in_group = os.getpgid(p.pid) in groups
        except OSError:
            in_group = False
        if p.pid not in mine and p.info["status"] != psutil.STATUS_ZOMBIE and (runs_lmdeploy or in_group):
            found.append({"pid": p.pid, "cmdline": " ".join(cmd)[:160]})
    return found


# ----------------------------------------------------------------------------- the server

class Server:
    """An `lmdeploy serve api_server` child process with a name, a port, a log, and a guaranteed stop."""

    def __init__(self, model: str | Path, name: str = "server", port: int | None = None,
                 host: str = "127.0.0.1", backend: str = "auto", api_keys: str | list[str] | None = None,
                 cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None,
                 tool_call_parser: str | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 startup_timeout: float = 300.0, model_name: str | None = None, tp: int = 1,
                 eager: bool | None = None, log_level: str = "INFO", show: bool = True,
                 command: list[str] | None = None, stop_grace: float = STOP_GRACE_S):
        from labkit.engine import check_backend, check_options, choose_backend, default_eager
        from labkit.models import resolve

        self.name, self.host, self.show, self.stop_grace = name, host, show, stop_grace
        self.stopped = True  # until the process runs
        self._proc: subprocess.Popen | None = None
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        self.api_keys = list(api_keys) if api_keys else []
        if not isinstance(extra_args, (list, tuple)) or not all(isinstance(a, str) for a in extra_args):
            raise ServerError("extra_args must be a list of strings, e.g. ['--max-batch-size', '64']")
        # 1. Everything that can be wrong with the input, before anything starts (what only one backend
        #    refuses is checked again once the backend is known, in 4).
        self.model_dir = resolve(str(model))
        check_backend(backend)
        check_options(cache_ratio, quant_policy, session_len, tp)
        if tool_call_parser == "auto":
            from labkit.tools import parser_for

            tool_call_parser = parser_for(model, self.model_dir)
        if tool_call_parser is not None:
            from labkit.tools import check_parser

            check_parser(tool_call_parser)
        self.tool_call_parser = tool_call_parser
        self.model_name = model_name or _served_name(str(model), self.model_dir)
        # 2. Re-running the cell that started it replaces it (and frees its port).
        stop_server(name)
        _stop_strays_named(name)
        # 3. The port, in milliseconds.
        if host not in LOCAL_HOSTS:
            print(f"WARNING: the server listens on {host}: anyone who can reach this machine on that port can use "
                  f"the model{'' if self.api_keys else ' (no api_keys set: pass api_keys=[...] to require a key)'}.")
        self.port = check_port(host, port) if port is not None else free_port(host)
        # 4. Backend, the engine options for it, and GPU memory (quick checks; the model loads in the child).
        self.backend, self.backend_reason = ("custom", "custom command") if command else \
            choose_backend(self.model_dir, backend)
        check_options(cache_ratio, quant_policy, session_len, tp, backend=self.backend)
        if command is None and gpus():
            from labkit.kvcache import weights_bytes

            require_gpu(min_free_gib=weights_bytes(self.model_dir) / GiB + 1.0,
                        what=f"serving {self.model_dir.name}")
        if eager is None:
            eager = default_eager()
        if command is None:
            self.argv = api_server_args(self.model_dir, host=host, port=self.port, backend=self.backend,
                                        model_name=self.model_name, cache_ratio=cache_ratio,
                                        quant_policy=quant_policy, session_len=session_len, tp=tp,
                                        eager=bool(eager) and self.backend == "pytorch",
                                        tool_call_parser=tool_call_parser, api_keys=self.api_keys,
                                        log_level=log_level, extra_args=extra_args)
            run = [sys.executable, "-m", "lmdeploy", *self.argv[1:]]
        else:
            fill = dict(host=host, port=self.port, model_dir=self.model_dir, name=self.model_name)
            self.argv = [str(a).format(**fill) for a in command] + list(extra_args)
            run = self.argv
        self.cache_ratio = cache_ratio
        # 5. Start: own process group, log to a file, under the watchdog.
        logs = config.home() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"server-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{self.port}.log"
        self.memory_before = memory_used_or_none()
        self.started = time.time()
        _install_handlers()
        root = str(Path(__file__).resolve().parent.parent)  # so the watchdog finds labkit wherever it runs
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        with open(self.log_path, "wb") as log:
            log.write(f"[labkit] {self.command}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "labkit.serve", "watch", str(os.getpid()), str(stop_grace), "--", *run],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        self.stopped = False
        self.pgid = self._proc.pid
        # 6. Wait for /v1/models, streaming the log; anything going wrong stops it.
        try:
            self._register()
            _live[name] = self
            self._wait_ready(startup_timeout)
        except KeyboardInterrupt:
            print(f"\ninterrupted: stopping server {name!r}")
            self.stop()
            raise
        except BaseException:
            self.stop(quiet=True)
            raise
        self.start_seconds = time.time() - self.started
        self.memory_after = memory_used_or_none()
        if show:
            print(f"server {name!r} ready in {self.start_seconds:.1f} s at {self.base_url} "
                  f"(model {self.model_name!r}, backend {self.backend}: {self.backend_reason}; "
                  f"log {self.log_path})")

    # ------------------------------------------------------------------ facts
    @property
    def command(self) -> str:
        """The command line of the server, as you would type it."""
        return shlex.join(self.argv)

    @property
    def base_url(self) -> str:
        """http://host:port (the loopback address when it listens on every interface); its Swagger UI is here."""
        return f"http://{url_host(self.host)}:{self.port}"

    @property
    def openai_url(self) -> str:
        """The base_url for OpenAI clients (…/v1)."""
        return self.base_url + "/v1"

    @property
    def api_key(self) -> str:
        """The key clients send (the first of api_keys, or a placeholder the server ignores)."""
        return self.api_keys[0] if self.api_keys else "none"

    @property
    def pid(self) -> int | None:
        """pid of the server process itself (the watchdog's child), None once it is gone."""
        if self._proc is None:
            return None
        for p in group_members(self.pgid):
            st = _proc_stat(p)
            if st is not None and st[1] == self._proc.pid:
                return p
        return None

    @property
    def alive(self) -> bool:
        """True while the server process runs."""
        return not self.stopped and self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        """The last `n` lines of the server's log."""
        return "".join(_tail_lines(self.log_path, n))

    @property
    def memory(self) -> int | None:
        """GPU memory (bytes) that the server's processes hold, from NVML; None where NVML cannot tell."""
        if self.stopped:
            return 0
        return process_memory(set(group_members(self.pgid)))

    @property
    def memory_gib(self) -> float | None:
        """GiB of GPU memory the server holds: its processes' (NVML), else the rise in GPU memory measured
        at its start; None without a GPU."""
        held = self.memory
        if held is None:
            before, after = getattr(self, "memory_before", None), getattr(self, "memory_after", None)
            if before is None or after is None:
                return None
            held = after - before
        return held / GiB

    def describe(self) -> dict:
        """What runs: name, model, backend and why, URL, pid, start time, GPU memory."""
        mem = self.memory
        before, after = getattr(self, "memory_before", None), getattr(self, "memory_after", None)
        return {"name": self.name, "model": self.model_name, "backend": self.backend, "why": self.backend_reason,
                "url": self.base_url, "pid": self.pid, "start s": round(getattr(self, "start_seconds", 0.0), 1),
                "GPU memory GiB": None if mem is None else round(mem / GiB, 2),
                "GPU memory added at start GiB": None if before is None or after is None else
                round((after - before) / GiB, 2),
                "tool parser": self.tool_call_parser, "log": str(self.log_path)}

    def client(self, **kwargs: Any):
        """An openai.OpenAI client for this server (proxy settings ignored: the server is local)."""
        return openai_client(self.openai_url, self.api_key, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    def _register(self) -> None:
        me = _proc_stat(os.getpid())
        st = _proc_stat(self._proc.pid)
        entry = {"name": self.name, "pid": self._proc.pid, "pgid": self.pgid, "pid_start": st[3] if st else None,
                 "owner_pid": os.getpid(), "owner_start": me[3] if me else None, "host": self.host, "port": self.port,
                 "url": self.base_url, "model": self.model_name, "model_dir": str(self.model_dir),
                 "log": str(self.log_path), "started": self.started, "command": self.command}
        self._registry_file = registry_dir() / f"{self._proc.pid}.json"
        self._registry_file.write_text(json.dumps(entry, indent=1))

    def _ready(self) -> bool:
        req = urllib.request.Request(self.base_url + "/v1/models",
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        from tqdm.auto import tqdm

        start = time.monotonic()
        pos, shown, skipped = 0, 0, 0
        max_shown = 80
        bar = tqdm(total=int(timeout), desc=f"starting {self.name}: waiting for /v1/models", disable=not self.show,
                   bar_format="{desc} ({elapsed})", leave=False, mininterval=1.0)
        try:
            while True:
                lines, pos = _read_new(self.log_path, pos)
                for line in lines:
                    if "%|" in line and "100%|" not in line:  # progress bars drawn with \r: only the end
                        continue
                    if self.show and shown < max_shown:
                        bar.write("  | " + line[:200])
                        shown += 1
                    else:
                        skipped += 1
                bar.update(min(int(time.monotonic() - start), int(timeout)) - bar.n)
                if self._proc.poll() is not None:
                    time.sleep(0.2)  # let the last lines reach the log
                    raise self._died()
                if self._ready():
                    break
                if time.monotonic() - start > timeout:
                    raise ServerError(f"server {self.name!r} did not answer /v1/models within {timeout:.0f} s; "
                                      f"raise startup_timeout, or read the log ({self.log_path}). Last lines:\n"
                                      + self.log_tail(20))
                time.sleep(0.25)
        finally:
            bar.close()
        if skipped and self.show:
            print(f"  | ... {skipped} more log lines in {self.log_path}")

    def _died(self) -> ServerError:
        tail = self.log_tail(20)
        cause = diagnose(self.log_tail(80), port=self.port, model_dir=self.model_dir, ratio=self.cache_ratio)
        return ServerError(f"server {self.name!r} exited while loading (after {time.time() - self.started:.1f} s). "
                           f"Likely cause: {cause}\nLast lines of {self.log_path}:\n{tail}")

    def stop(self, quiet: bool = False, wait_memory: bool = True) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after a few seconds; wait for GPU memory."""
        if self.stopped:
            return
        self.stopped = True
        if _live.get(self.name) is self:
            _live.pop(self.name)
        took = stop_group(self.pgid, self.stop_grace, self._proc)
        getattr(self, "_registry_file", Path("/nonexistent")).unlink(missing_ok=True)
        if wait_memory and self.memory_before is not None:
            from labkit.gpu import wait_for_memory_release

            wait_for_memory_release(self.memory_before, timeout=20)
        if not quiet:
            print(f"stopped server {self.name!r} (port {self.port}) in {took:.1f} s")

    def _signal_stop(self) -> None:
        """From a signal handler: SIGTERM the group now; the watchdog finishes the job."""
        if not self.stopped:
            _signal_group(self.pgid, signal.SIGTERM)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else ("running" if self.alive else "exited")
        return f"Server({self.name!r}, {self.model_name}, {self.base_url}, {state})"


def api_server_args(model_dir: str | Path, *, host: str, port: int, backend: str, model_name: str,
                    cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None, tp: int = 1,
                    eager: bool = False, tool_call_parser: str | None = None, api_keys: list[str] | tuple = (),
                    log_level: str = "INFO", extra_args: list[str] | tuple = ()) -> list[str]:
    """The `lmdeploy serve api_server ...` command line (as a list) for these options."""
    argv = ["lmdeploy", "serve", "api_server", str(model_dir), "--server-name", host, "--server-port", str(port),
            "--backend", backend, "--model-name", model_name, "--cache-max-entry-count", str(cache_ratio),
            "--quant-policy", str(quant_policy), "--log-level", log_level.upper()]
    from labkit.engine import needs_remote_code

    if needs_remote_code(model_dir):  # as Engine does: lmdeploy 0.18 defaults --trust-remote-code to off
        argv.append("--trust-remote-code")
    if session_len is not None:
        argv += ["--session-len", str(session_len)]
    if tp != 1:
        argv += ["--tp", str(tp)]
    if eager:
        argv.append("--eager-mode")
    if tool_call_parser:
        argv += ["--tool-call-parser", tool_call_parser]
    if api_keys:
        argv += ["--api-keys", *api_keys]
    return argv + list(extra_args)


def stream_text(stream) -> Iterator[str]:
    """The text pieces of an OpenAI chat stream (for labkit.show.stream_to_notebook)."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def curl_command(url: str, body: dict | None = None, api_key: str | None = None) -> list[str]:
    """A curl command (as a list) that GETs `url`, or POSTs `body` as JSON to it."""
    cmd = ["curl", "-sS", "--max-time", "120", url]
    if api_key and api_key != "none":
        cmd += ["-H", f"Authorization: Bearer {api_key}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body, ensure_ascii=False)]
    return cmd


def curl(url: str, body: dict | None = None, api_key: str | None = None, timeout: float = 120.0) -> Any:
    """Print the curl command for a request, run it, and return the JSON reply (urllib if curl is missing)."""
    import shutil

    cmd = curl_command(url, body, api_key)
    print("$", shlex.join(cmd))
    if shutil.which("curl"):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ServerError(f"curl failed (exit {done.returncode}): {done.stderr.strip()[:300]}")
        return json.loads(done.stdout)
    print("(curl is not installed here: the same request is sent with Python's urllib)")
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if api_key and api_key != "none":
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _served_name(model: str, model_dir: Path) -> str:
    """What clients call the model: the catalogue / generated / hub name, else the folder's name."""
    if model.startswith("generated:"):
        return model.split(":", 1)[1]
    path = Path(model).expanduser()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]  # a Hugging Face cache snapshot
    tail = model.rstrip("/").split("/")[-1]
    return tail if tail and not tail.startswith(".") else model_dir.name


def stop_server(name: str) -> bool:
    """Stop the live server called `name` that this kernel started, if any; True if one was stopped."""
    from labkit.live import replace_earlier

    return replace_earlier(_live, name, "server")


def _stop_strays_named(name: str) -> None:
    for entry in servers():
        if entry["name"] == name and entry["state"] == "stray":
            print(f"stopping a stray server {name!r} left by pid {entry['owner_pid']} (port {entry['port']})")
            stop_registered(entry)


def stop_all() -> None:
    """Stop every server this kernel started."""
    for name in list(_live):
        try:
            _live[name].stop(quiet=True, wait_memory=False)
        except Exception as err:  # at exit: keep going
            print(f"could not stop server {name!r}: {err}", file=sys.stderr)


# ----------------------------------------------------------------------------- exit and signals
_handlers = {"installed": False, "previous": None}


def _on_sigterm(signum, frame) -> None:
    for srv in list(_live.values()):
        srv._signal_stop()
    prev = _handlers["previous"]
    if callable(prev):
        prev(signum, frame)
    elif prev in (None, signal.SIG_DFL):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """atexit + a SIGTERM handler that chains to the one before it (main thread only)."""
    if _handlers["installed"]:
        return
    _handlers["installed"] = True
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        _handlers["previous"] = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


# ----------------------------------------------------------------------------- logs and causes

def _read_new(path: Path, pos: int) -> tuple[list[str], int]:
    """Complete new lines of a growing file from byte offset `pos`; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        return [], pos
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", "replace").replace("\r", "\n")
    return [ln for ln in text.split("\n") if ln.strip()], pos + end


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read().decode("utf-8", "replace").replace("\r", "\n")
    except FileNotFoundError:
        return []
    return [ln + "\n" for ln in data.split("\n") if ln.strip()][-n:]




# ----------------------------------------------------------------------------- command line

def _cli_servers(args) -> int:
    entries = servers()
    if not entries:
        print("no servers started by labkit are running")
        return 0
    table = servers_table(clean=False)
    print(table.to_string(index=False))
    if not args.stop:
        strays = sum(e["state"] == "stray" for e in entries)
        if strays:
            print(f"\n{strays} stray server(s) (their notebook is gone): `labkit servers --stop` stops them")
        return 0
    if args.name:  # the servers named, whatever their state
        chosen = [e for e in entries if e["name"] in args.name]
        for missing in sorted(set(args.name) - {e["name"] for e in entries}):
            print(f"no server called {missing!r}")
    else:  # strays only, unless --all
        chosen = [e for e in entries if args.all or e["state"] == "stray"]
    for e in chosen:
        took = stop_registered(e, grace=args.grace)
        print(f"stopped {e['name']!r} (pid {e['pid']}, port {e['port']}) in {took:.1f} s")
    kept = [e for e in entries if e not in chosen and e["state"] == "running"]
    if kept and not args.name:
        print(f"kept {len(kept)} server(s) whose notebook still runs: add --all to stop them too")
    return 0


def add_cli(sub) -> None:
    """`labkit servers [--stop [--all] [NAME ...]]`."""
    p = sub.add_parser("servers", help="list the api_servers labkit started; --stop stops strays")
    p.add_argument("name", nargs="*", help="only these servers (by name)")
    p.add_argument("--stop", action="store_true", help="stop stray servers (their notebook is gone)")
    p.add_argument("--all", action="store_true", help="with --stop: also servers whose notebook still runs")
    p.add_argument("--grace", type=float, default=STOP_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(func=_cli_servers)


def _main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "watch" and argv[3] == "--":
        return watch(int(argv[1]), float(argv[2]), argv[4:])
    print("usage: python -m labkit.serve watch PARENT_PID GRACE_S -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
