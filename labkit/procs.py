"""Process groups, signals and the watchdog of labkit's servers (lab 02), through psutil.

A server runs in its own process group under a tiny watchdog (`python -m labkit.procs watch PARENT GRACE --
COMMAND...`) that takes the group down when the notebook's kernel dies, however it dies. `identity` and
`same_process` tell a process from a later one that reuses its pid (start time + command line), so nothing is
ever signalled on the strength of a pid alone. `group_listens` says whether a process group owns a listening
socket (readiness: the server answering is really ours).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from labkit.errors import ServerError

STOP_GRACE_S = 8.0          # SIGTERM, then SIGKILL after this long (lmdeploy needs ~3 s)
WATCH_INTERVAL_S = 0.5      # how often the watchdog looks at its parent


def identity(pid: int) -> dict | None:
    """pid, ppid, pgid, start time (epoch s), command line and status of a live process; None if gone/zombie."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            status = p.status()
            if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            return {"pid": pid, "ppid": p.ppid(), "pgid": os.getpgid(pid), "start": round(p.create_time(), 2),
                    "cmdline": p.cmdline(), "status": status}
    except (psutil.Error, OSError):
        return None


def same_process(pid: int | None, start: float | None, cmdline: list[str] | None = None) -> bool:
    """True if `pid` is still the process that was recorded with this start time (and command line)."""
    if pid is None or start is None:
        return False
    now = identity(int(pid))
    if now is None or abs(now["start"] - float(start)) > 0.05:
        return False
    return cmdline is None or list(now["cmdline"]) == list(cmdline)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) and os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except OSError:
            pass
    return out


def group_listens(pgid: int, port: int) -> bool:
    """True if a process of group `pgid` owns a TCP socket listening on `port`."""
    import psutil

    for pid in group_members(pgid):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.Error, OSError):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


def listeners(port: int) -> list[int]:
    """pids that listen on TCP `port` (those this user may see)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                out.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


def signal_group(pgid: int, sig: int) -> None:
    """os.killpg, quiet if the group is gone or not ours."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_signal_group = signal_group  # the old private name


def stop_group(pgid: int, grace: float = STOP_GRACE_S, proc: subprocess.Popen | None = None) -> float:
    """SIGTERM to process group `pgid`, SIGKILL after `grace` s; wait until it is empty; return seconds."""
    start = time.monotonic()
    strays = _descendants_outside(pgid)
    signal_group(pgid, signal.SIGTERM)
    killed = False
    while True:
        if proc is not None:
            proc.poll()  # reap our own child so it does not linger as a zombie
        if not group_members(pgid):
            break
        elapsed = time.monotonic() - start
        if not killed and elapsed > grace:
            signal_group(pgid, signal.SIGKILL)
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
    """Descendants of the group's processes that moved to another process group."""
    import psutil

    out = []
    for pid in group_members(pgid):
        try:
            out += [c for c in psutil.Process(pid).children(recursive=True) if os.getpgid(c.pid) != pgid]
        except (psutil.Error, OSError):
            pass
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


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
    killed = f" (killed by {_signal_name(-rc)})" if rc < 0 else ""
    print(f"[labkit] the server process exited with code {rc}{killed}", flush=True)
    # Whatever the server left in its group (engine workers) goes with it, and so does its registry entry.
    me = os.getpid()
    others = [p for p in group_members(os.getpgrp()) if p != me]
    if others:
        os.killpg(os.getpgrp(), signal.SIGTERM)
        end = time.monotonic() + min(grace, 5.0)
        while [p for p in group_members(os.getpgrp()) if p != me] and time.monotonic() < end:
            time.sleep(0.05)
        if [p for p in group_members(os.getpgrp()) if p != me]:
            os.killpg(os.getpgrp(), signal.SIGKILL)
    _drop_registry_entry(me)
    return rc


def _drop_registry_entry(pid: int) -> None:
    """Remove the registry entry of the server this watchdog ran (labkit.registry names it after our pid)."""
    try:
        from labkit import config

        (config.home() / "servers" / f"{pid}.json").unlink(missing_ok=True)
    except OSError:
        pass


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def main(argv: list[str]) -> int:
    """`python -m labkit.procs watch PARENT_PID GRACE_S -- COMMAND...`."""
    if len(argv) >= 4 and argv[0] == "watch" and argv[3] == "--":
        return watch(int(argv[1]), float(argv[2]), argv[4:])
    print("usage: python -m labkit.procs watch PARENT_PID GRACE_S -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
