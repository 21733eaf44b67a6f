"""`lmdeploy serve api_server` as a child process that a notebook starts, watches and always stops (lab 02).

    with labkit.serve.Server("generated:tiny-chat", cache_ratio=0.1) as srv:
        print(srv.client().models.list())

Before anything loads: the model is resolved, the engine options are checked, a usable GPU is required and
the port is checked (a busy port fails in milliseconds). While it loads, the server's log streams into the
notebook; if it dies, `ServerError` carries the log tail and the likely cause. It is ready when its own
process group listens on the port and /v1/models lists its model (not when anything answers there). The
server runs in its own process group under a tiny watchdog (labkit.procs) that takes the group down when the
kernel dies, however it dies; `stop()`, a `with` block, interpreter exit (atexit), SIGTERM, Ctrl-C while
loading and a second Server with the same name stop it too. Every server is registered (labkit.registry), so
`labkit servers` lists them and `labkit servers --stop` stops strays.

The other seams live in their own modules and are re-exported here: ports, URLs and clients (labkit.net),
process groups and the watchdog (labkit.procs), the registry and `labkit servers` (labkit.registry), the
api_server command line and served names (labkit.server_args), reading and echoing its log (labkit.logtail).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from labkit import config
from labkit.diagnose import diagnose  # noqa: F401  (labkit.serve.diagnose is public)
from labkit.errors import ServerError
from labkit.gpu import GiB, memory_used_or_none, process_memory, require_gpu
from labkit.live import Live
from labkit.logtail import LogEcho, tail_lines
from labkit.net import (LOCAL_HOSTS, check_port, curl, curl_command, free_port, models_listed,  # noqa: F401
                        openai_client, stream_text, url_host)
from labkit.procs import (STOP_GRACE_S, WATCH_INTERVAL_S, _signal_group, group_listens, group_members,  # noqa: F401
                          identity, signal_group, stop_group, watch)
from labkit.registry import (_cli_servers, add_cli, entry_for, lmdeploy_processes, registry_dir,  # noqa: F401
                             servers, servers_table, stop_registered, write_entry)
from labkit.registry import state as _state  # noqa: F401
from labkit.server_args import api_server_args, served_name  # noqa: F401  (labkit.serve.api_server_args is public)


class Server(Live):
    """An `lmdeploy serve api_server` child process with a name, a port, a log, and a guaranteed stop."""

    kind = "server"

    def __init__(self, model: str | Path, name: str = "server", port: int | None = None,
                 host: str = "127.0.0.1", backend: str = "auto", api_keys: str | list[str] | None = None,
                 cache_ratio: float = 0.8, quant_policy: int = 0, session_len: int | None = None,
                 tool_call_parser: str | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 startup_timeout: float = 300.0, model_name: str | None = None, tp: int = 1,
                 eager: bool | None = None, log_level: str = "INFO", show: bool = True,
                 command: list[str] | None = None, stop_grace: float = STOP_GRACE_S, check_gpu: bool = True,
                 env: dict[str, str] | None = None):
        from labkit.backends import check_backend, choose_backend
        from labkit.engine import check_options, default_eager
        from labkit.models import resolve

        self.name, self.host, self.show, self.stop_grace = name, host, show, stop_grace
        env_extra = {str(k): str(v) for k, v in (env or {}).items()}  # e.g. CUDA_VISIBLE_DEVICES for one GPU
        self.env = env_extra
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
        self.model_name = model_name or served_name(str(model), self.model_dir)
        self._expect_model = self.model_name if command is None else None  # what /v1/models must list
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
        check_options(cache_ratio, quant_policy, session_len, tp, backend=self.backend, model_dir=self.model_dir)
        if command is None and check_gpu:  # lmdeploy needs a CUDA GPU: refuse here rather than stream its traceback
            from labkit.gpu import NoGPUError
            from labkit.kvcache import weights_bytes

            try:
                require_gpu(min_free_gib=weights_bytes(self.model_dir) / GiB + 1.0,
                            what=f"serving {self.model_dir.name}")
            except NoGPUError as err:
                raise ServerError(f"server {name!r} not started: {err}") from None
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
        env.update(env_extra)
        # 6. Wait until it serves, streaming the log; anything going wrong (Ctrl-C too, at any point) stops it.
        try:
            with open(self.log_path, "wb") as log:
                log.write(f"[labkit] {self.command}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "labkit.procs", "watch", str(os.getpid()), str(stop_grace), "--", *run],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
                self.pgid = self._proc.pid
                self.stopped = False
            self._register()
            self._keep()
            self._wait_ready(startup_timeout)
            self._register(ready=True)
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                print(f"\ninterrupted: stopping server {name!r}")
            if self._proc is not None:
                self.stopped = False
                self.pgid = self._proc.pid
                self.stop(quiet=not isinstance(err, KeyboardInterrupt))
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
        from labkit.procs import children_of

        return next(iter(children_of(self._proc.pid)), None)

    @property
    def alive(self) -> bool:
        """True while the server process runs."""
        return not self.stopped and self._proc is not None and self._proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        """The last `n` lines of the server's log."""
        return "".join(tail_lines(self.log_path, n))

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
    def _register(self, ready: bool = False) -> None:
        """Note the server in the registry: the watchdog's and the owner's identity now; the server's once ready."""
        facts = {"name": self.name, "host": self.host, "port": self.port, "url": self.base_url,
                 "model": self.model_name, "model_dir": str(self.model_dir), "log": str(self.log_path),
                 "started": self.started, "command": self.command}
        entry = entry_for(self._proc.pid, **facts)
        server = identity(self.pid) if ready and self.pid else None
        if server is not None:
            entry.update(server_pid=server["pid"], server_start=server["start"], server_cmdline=server["cmdline"])
        self._registry_file = write_entry(entry)

    def _ready(self) -> bool:
        """Serving: /v1/models lists this model AND this server's process group listens on the port (another
        program that took the port, or another server answering there, does not count). A custom command
        (e.g. `lmdeploy serve proxy`, whose list starts empty) needs /v1/models to answer with a list."""
        names = models_listed(self.base_url, self.api_key)
        if names is None or (self._expect_model is not None and self._expect_model not in names):
            return False
        return group_listens(self.pgid, self.port)

    def _wait_ready(self, timeout: float) -> None:
        from tqdm.auto import tqdm

        start = time.monotonic()
        bar = tqdm(total=int(timeout), desc=f"starting {self.name}: waiting for /v1/models", disable=not self.show,
                   bar_format="{desc} ({elapsed})", leave=False, mininterval=1.0)
        echo = LogEcho(self.log_path, bar.write, self.show)
        try:
            while True:
                echo.pump()
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
        if echo.skipped and self.show:
            print(f"  | ... {echo.skipped} more log lines in {self.log_path}")

    def _died(self) -> ServerError:
        tail = self.log_tail(20)
        text = self.log_tail(80)
        rc = self._proc.returncode if self._proc is not None else None
        if rc is not None and rc < 0:  # the watchdog itself was killed: its log line could not be written
            text += f"\n[labkit] its watchdog exited with code {rc} (killed by {signal.Signals(-rc).name})"
        cause = diagnose(text, port=self.port, model_dir=self.model_dir, ratio=self.cache_ratio)
        return ServerError(f"server {self.name!r} exited while loading (after {time.time() - self.started:.1f} s). "
                           f"Likely cause: {cause}\nLast lines of {self.log_path}:\n{tail}")

    def stop(self, quiet: bool = False, wait_memory: bool = True) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after a few seconds; wait for GPU memory."""
        if self.stopped:
            return
        self.stopped = True
        self._forget()
        took = stop_group(self.pgid, self.stop_grace, self._proc)
        getattr(self, "_registry_file", Path("/nonexistent")).unlink(missing_ok=True)
        if wait_memory and getattr(self, "memory_before", None) is not None:
            from labkit.gpu import wait_for_memory_release

            wait_for_memory_release(self.memory_before, timeout=20)
        if not quiet:
            print(f"stopped server {self.name!r} (port {self.port}) in {took:.1f} s")

    def _end(self, at_exit: bool = False) -> None:
        self.stop(quiet=at_exit, wait_memory=not at_exit)

    def _signal_stop(self) -> None:
        """From a signal handler: SIGTERM the group now; the watchdog finishes the job."""
        if not self.stopped:
            signal_group(self.pgid, signal.SIGTERM)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else ("running" if self.alive else "exited")
        return f"Server({self.name!r}, {self.model_name}, {self.base_url}, {state})"


_live = Server._live  # name -> running Server (labkit.live.Live keeps it)


def stop_server(name: str) -> bool:
    """Stop the live server called `name` that this kernel started, if any; True if one was stopped."""
    return Server.replace(name)


def _stop_strays_named(name: str) -> None:
    for entry in servers():
        if entry["name"] == name and entry["state"] == "stray":
            print(f"stopping a stray server {name!r} left by pid {entry['owner_pid']} (port {entry['port']})")
            stop_registered(entry)


def stop_all() -> None:
    """Stop every server this kernel started."""
    Server.end_all()


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
    """A SIGTERM handler that chains to the one before it (main thread only); atexit is labkit.live's."""
    if _handlers["installed"]:
        return
    _handlers["installed"] = True
    if threading.current_thread() is threading.main_thread():
        _handlers["previous"] = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


def _main(argv: list[str]) -> int:
    """`python -m labkit.serve watch ...`: the watchdog (labkit.procs.main), under its old address."""
    from labkit.procs import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
