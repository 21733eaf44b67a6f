"""The registry of the servers labkit started (one JSON file each under LABKIT_HOME/servers) and
`labkit servers [--stop]` (lab 02).

An entry records who is who by pid *and* start time *and* command line (the watchdog that leads the server's
process group, the api_server itself, the notebook that owns it). A pid alone proves nothing: after a reboot
or a long day pids are reused, and a stale entry must never make labkit signal somebody else's processes.
So an entry is 'gone' unless its watchdog or its server is still the very process recorded.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from labkit import config
from labkit.procs import STOP_GRACE_S, group_members, identity, same_process, stop_group


def registry_dir() -> Path:
    """Where labkit notes the servers it started (one JSON file per server)."""
    path = config.home() / "servers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_entry(entry: dict) -> Path:
    """Write (or update) the entry of a server, named after its watchdog's pid; its path."""
    path = registry_dir() / f"{entry['pid']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1))
    tmp.replace(path)  # readers never see half a file
    return path


def entry_for(proc_pid: int, **facts) -> dict:
    """A registry entry for the watchdog `proc_pid` (its identity and the owner's, recorded now) + `facts`."""
    me, leader = identity(os.getpid()), identity(proc_pid)
    return {"pid": proc_pid, "pgid": proc_pid, "pid_start": leader and leader["start"],
            "pid_cmdline": leader and leader["cmdline"], "owner_pid": os.getpid(),
            "owner_start": me and me["start"], **facts}


def is_ours(entry: dict) -> bool:
    """True if the entry's process group is still the one labkit started: its watchdog, or the server
    itself, is the very process recorded (pid + start time + command line)."""
    if same_process(entry.get("pid"), entry.get("pid_start"), entry.get("pid_cmdline")):
        return True
    return same_process(entry.get("server_pid"), entry.get("server_start"), entry.get("server_cmdline"))


def state(entry: dict) -> str:
    """'running' (its notebook lives), 'stray' (notebook gone, server alive) or 'gone' (or not ours any more)."""
    if not is_ours(entry) or not group_members(entry["pgid"]):
        return "gone"
    return "running" if same_process(entry.get("owner_pid"), entry.get("owner_start")) else "stray"


_state = state  # the old private name


def servers(clean: bool = True) -> list[dict]:
    """Every server labkit started that the registry knows, with its state; drops entries of gone ones."""
    out = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(entry, dict) or "pgid" not in entry:
            continue
        entry["state"] = state(entry)
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
    """Stop a registered server (the whole process group) and drop its registry entry; return seconds.
    The entry is checked again right before the signal: a group that is not ours any more is left alone."""
    took = stop_group(entry["pgid"], grace) if state(entry) != "gone" else 0.0
    Path(entry.get("file") or registry_dir() / f"{entry['pid']}.json").unlink(missing_ok=True)
    return took


def lmdeploy_processes() -> list[dict]:
    """Live processes of lmdeploy (its command line runs lmdeploy) or of a server labkit registered."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    groups = {e["pgid"] for e in servers(clean=False) if e["state"] != "gone"}
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
