"""`lmdeploy serve proxy` in front of several api_servers, owned by labkit like lab 02's server (lab 07).

    with labkit.proxy.Group("generated:tiny-chat", servers=2, cache_ratio=0.05) as group:
        print(group.nodes())                       # the proxy's node list
        labkit.loadtest.run(group.proxy(), ...)    # clients talk to the proxy only

Every process is a `labkit.serve.Server` (own process group, watchdog, registry, stop at kernel exit):
the proxies (one per routing strategy asked for, so strategies compare without restarts) and the
api_servers (started concurrently; one per GPU with CUDA_VISIBLE_DEVICES where there are several).
Each api_server registers itself with the first proxy (`--proxy-url`); labkit adds it to the others
(`POST /nodes/add`). The proxy drops a dead node at its next heartbeat (`/health` every
LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION s: lmdeploy's default is 90, labkit's `heartbeat` 5).
The proxy runs with `--disable-cache-status`: otherwise it writes its node list into lmdeploy's
installed package (proxy_config.json) and the next proxy starts with yesterday's dead nodes.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from labkit import serve
from labkit.serve import Server, ServerError

ROUTING_STRATEGIES = ("random", "min_expected_latency", "min_observed_latency")
HEARTBEAT_S = 5          # labkit's proxies check their nodes' /health this often (lmdeploy: 90 s)
MAX_SERVERS = 8
# The proxy and the servers talk to each other with `requests`, which honours http_proxy: not for 127.0.0.1.
LOCAL_NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost,::1", "no_proxy": "127.0.0.1,localhost,::1"}
_groups: dict[str, "Group"] = {}


class ProxyError(ServerError):
    """The proxy or its group could not do what was asked; the message says why and what to do."""


def check_strategy(strategy: str) -> str:
    """The routing strategy itself, or a ProxyError listing lmdeploy's three."""
    if strategy not in ROUTING_STRATEGIES:
        raise ProxyError(f"routing strategy must be one of {', '.join(ROUTING_STRATEGIES)}, not {strategy!r}")
    return strategy


def proxy_args(host: str, port: int, strategy: str = "min_expected_latency", api_keys: list[str] | tuple = (),
               log_level: str = "INFO") -> list[str]:
    """The `lmdeploy serve proxy ...` command line (as a list)."""
    check_strategy(strategy)
    argv = ["lmdeploy", "serve", "proxy", "--server-name", host, "--server-port", str(port),
            "--routing-strategy", strategy, "--disable-cache-status", "--log-level", log_level.upper()]
    if api_keys:
        argv += ["--api-keys", *api_keys]
    return argv


def _http(url: str, body: dict | None = None, timeout: float = 5.0) -> Any:
    """GET (or POST `body` as JSON) to a local URL, proxy settings ignored; the decoded JSON reply."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


class Proxy:
    """One `lmdeploy serve proxy` process (a labkit Server underneath) and its node-list API."""

    def __init__(self, model: str | Path, strategy: str = "min_expected_latency", name: str = "proxy",
                 port: int | None = None, host: str = "127.0.0.1", heartbeat: int = HEARTBEAT_S,
                 startup_timeout: float = 120.0, show: bool = True):
        check_strategy(strategy)
        if not isinstance(heartbeat, int) or heartbeat < 1:
            raise ProxyError(f"heartbeat must be a whole number of seconds >= 1, not {heartbeat!r}")
        self.strategy, self.heartbeat = strategy, heartbeat
        command = [sys.executable, "-m", *proxy_args("{host}", "{port}", strategy)]  # type: ignore[arg-type]
        self.server = Server(model, name=name, port=port, host=host, command=command, show=False,
                             startup_timeout=startup_timeout,
                             env={"LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION": str(heartbeat), **LOCAL_NO_PROXY})
        self.argv = self.server.argv[2:]  # as you would type it: lmdeploy serve proxy ...
        self.model_name = self.server.model_name
        if show:
            print(f"proxy {name!r} ({strategy}) ready in {self.server.start_seconds:.1f} s at {self.url}")

    # the attributes labkit.loadtest / webui look for, as on a Server
    @property
    def url(self) -> str:
        """http://host:port of the proxy (what api_servers get as --proxy-url)."""
        return self.server.base_url

    @property
    def base_url(self) -> str:
        """Same as url."""
        return self.server.base_url

    @property
    def openai_url(self) -> str:
        """The …/v1 URL clients use: the proxy forwards /v1/chat/completions to a node."""
        return self.server.openai_url

    @property
    def api_key(self) -> str:
        """The key clients send (the proxy here runs without keys)."""
        return "none"

    @property
    def command(self) -> str:
        """The proxy's command line as you would type it."""
        import shlex

        return shlex.join(self.argv)

    @property
    def alive(self) -> bool:
        """True while the proxy process runs."""
        return self.server.alive

    def client(self, **kwargs: Any):
        """An openai.OpenAI client that talks to the proxy."""
        return serve.openai_client(self.openai_url, "none", **kwargs)

    def status(self) -> dict:
        """The proxy's /nodes/status: node URL -> {models, unfinished, latency, speed, role}."""
        return _http(self.url + "/nodes/status") or {}

    def node_urls(self) -> list[str]:
        """URLs of the nodes the proxy routes to now."""
        return sorted(self.status())

    def add(self, url: str, models: list[str] | None = None) -> None:
        """Register an api_server (`POST /nodes/add`); ProxyError if the proxy could not reach it."""
        body: dict[str, Any] = {"url": url}
        if models:
            body["status"] = {"models": models}
        reply = _http(self.url + "/nodes/add", body)
        if reply != "Added successfully":
            raise ProxyError(f"the proxy could not add {url}: {str(reply).strip()[:200]}; is the server up "
                             f"(`curl {url}/v1/models`)?")

    def remove(self, url: str) -> None:
        """Take a node out of the proxy's list (`POST /nodes/remove`)."""
        _http(self.url + "/nodes/remove", {"url": url})

    def wait_nodes(self, urls: list[str], timeout: float = 30.0, present: bool = True) -> float:
        """Wait until every url is (present=True) or none is (False) in the node list; seconds it took."""
        start = time.monotonic()
        while True:
            listed = set(self.node_urls())
            if (set(urls) <= listed) if present else not (set(urls) & listed):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise ProxyError(f"after {timeout:.0f} s the proxy lists {sorted(listed)}, expected "
                                 f"{'all of' if present else 'none of'} {urls}; read its log ({self.server.log_path})")
            time.sleep(0.2)

    def dispatched(self) -> dict[str, int]:
        """How many requests the proxy sent to each node so far (from its log: 'dispatched to URL')."""
        counts: dict[str, int] = {}
        for line in Path(self.server.log_path).read_text(errors="replace").splitlines():
            if "A request is dispatched to " in line:
                url = line.rsplit("dispatched to ", 1)[1].strip()
                counts[url] = counts.get(url, 0) + 1
        return counts

    def stop(self, quiet: bool = True) -> None:
        """Stop the proxy process."""
        self.server.stop(quiet=quiet, wait_memory=False)

    def __repr__(self) -> str:
        return f"Proxy({self.strategy}, {self.url}, {'running' if self.alive else 'stopped'})"


def gpu_assignment(servers: int, n_gpus: int, tp: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per server: its own `tp` GPUs where there are enough (e.g. "0", "1" or "0,1",
    "2,3"), else None for all (they share what is visible: several servers on one GPU)."""
    if n_gpus > 1 and servers * tp <= n_gpus:
        return [",".join(str(i * tp + k) for k in range(tp)) for i in range(servers)]
    return [None] * servers


class Group:
    """Proxies (one per routing strategy) in front of `servers` api_servers, started and stopped as one."""

    def __init__(self, model: str | Path, servers: int = 2, strategies: tuple[str, ...] | list[str] =
                 ("min_expected_latency",), name: str = "scale", cache_ratio: float = 0.05, tp: int = 1,
                 backend: str = "auto", extra_args: tuple[str, ...] | list[str] = (), heartbeat: int = HEARTBEAT_S,
                 n_gpus: int | None = None, startup_timeout: float = 300.0, command: list[str] | None = None,
                 server_args: list[list[str]] | None = None, show: bool = True, **server_kwargs: Any):
        if not isinstance(servers, int) or not 1 <= servers <= MAX_SERVERS:
            raise ProxyError(f"servers must be a whole number in 1..{MAX_SERVERS}, not {servers!r}")
        strategies = [check_strategy(s) for s in strategies]
        if not strategies or len(set(strategies)) != len(strategies):
            raise ProxyError(f"strategies must name each routing strategy once, not {strategies!r}")
        if not isinstance(extra_args, (list, tuple)) or "--proxy-url" in extra_args:
            raise ProxyError("extra_args must be a list of strings without --proxy-url (the group sets it)")
        server_args = [list(a) for a in server_args] if server_args is not None else [[] for _ in range(servers)]
        if len(server_args) != servers or any("--proxy-url" in a for a in server_args):
            raise ProxyError(f"server_args needs one list of options per server ({servers}), without --proxy-url")
        self.server_args = server_args
        if not isinstance(heartbeat, int) or heartbeat < 1:
            raise ProxyError(f"heartbeat must be a whole number of seconds >= 1, not {heartbeat!r}")
        from labkit.backends import check_backend
        from labkit.engine import check_options
        from labkit.gpu import gpus
        from labkit.live import replace_earlier
        from labkit.models import resolve

        check_backend(backend)
        check_options(cache_ratio, server_kwargs.get("quant_policy", 0), server_kwargs.get("session_len"), tp)
        count = len(gpus()) if n_gpus is None else n_gpus
        if tp > 1 and 0 < count < tp:
            raise ProxyError(f"tp={tp} needs {tp} GPUs per server and this machine has {count}: use tp=1 (servers "
                             f"then share the GPU) or a machine with {tp} GPUs")
        self.model, self.model_dir = str(model), resolve(str(model))  # resolved (generated) once, before any thread
        # everything checked: now re-running the cell replaces the earlier group
        replace_earlier(_groups, name, "group")
        self.name, self.show, self.started = name, show, time.time()
        self.proxies: dict[str, Proxy] = {}
        self.servers: list[Server] = []
        self.killed: list[dict] = []
        self.devices = gpu_assignment(servers, count, tp)
        serve._install_handlers()  # SIGTERM / atexit handlers from the main thread, before any thread starts one
        self._names = [f"{name}-proxy-{s}" for s in strategies] + [f"{name}-{i}" for i in range(servers)]
        pool = ThreadPoolExecutor(max_workers=servers + len(strategies))
        ok = False
        try:
            # the first proxy before the servers (they register with it as they come up), the others alongside them
            first = self.proxies[strategies[0]] = Proxy(self.model, strategies[0], name=self._names[0],
                                                        heartbeat=heartbeat, show=False)
            args = list(extra_args) + ["--proxy-url", first.url]
            kwargs = dict(cache_ratio=cache_ratio, tp=tp, backend=backend, startup_timeout=startup_timeout,
                          show=False, **server_kwargs)
            if command is not None:
                kwargs["command"] = command
            start = time.monotonic()
            later = {s: pool.submit(Proxy, self.model, s, name=f"{name}-proxy-{s}", heartbeat=heartbeat, show=False)
                     for s in strategies[1:]}
            futures = [pool.submit(self._start_one, i, args, kwargs) for i in range(servers)]  # engine starts overlap
            errors: list[Exception] = []
            for f in futures:
                try:
                    self.servers.append(f.result())
                except Exception as err:  # KeyboardInterrupt goes straight to the clean-up below
                    errors.append(err)
            for s, f in later.items():
                try:
                    self.proxies[s] = f.result()
                except Exception as err:
                    errors.append(err)
            if errors:
                raise errors[0]
            self.start_seconds = time.monotonic() - start
            urls = [srv.base_url for srv in self.servers]
            first.wait_nodes(urls, timeout=30)
            for p in list(self.proxies.values())[1:]:
                for srv in self.servers:
                    p.add(srv.base_url)
            ok = True
        finally:
            if not ok:  # an error or Ctrl-C: stop what runs (threads still starting one then fail fast) ...
                self.stop(quiet=True)
            pool.shutdown(wait=True, cancel_futures=True)
            if not ok:  # ... and whatever a thread started meanwhile
                self.stop(quiet=True)
        _groups[name] = self
        if show:
            print(f"group {name!r}: {servers} api_server(s) ready in {self.start_seconds:.1f} s (started together), "
                  f"behind {len(self.proxies)} proxy(ies): " + ", ".join(f"{s} at {p.url}" for s, p in
                                                                      self.proxies.items()))

    def _start_one(self, i: int, args: list[str], kwargs: dict) -> Server:
        env = dict(LOCAL_NO_PROXY)  # the server registers with the proxy through `requests`, which reads http_proxy
        if self.devices[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[i]
        return Server(self.model, name=f"{self.name}-{i}", extra_args=self.server_args[i] + args, env=env, **kwargs)

    # ------------------------------------------------------------------ facts
    def proxy(self, strategy: str | None = None) -> Proxy:
        """The proxy with this routing strategy (the first one by default)."""
        if strategy is None:
            return next(iter(self.proxies.values()))
        if strategy not in self.proxies:
            raise ProxyError(f"this group has no {strategy!r} proxy: it started {list(self.proxies)}; pass "
                             f"strategies=[...] to Group")
        return self.proxies[strategy]

    def nodes(self, strategy: str | None = None):
        """The proxy's node list as a table: url, models, unfinished requests, mean latency, which server."""
        import pandas as pd

        by_url = {s.base_url: s for s in self.servers}
        rows = []
        for url, st in self.proxy(strategy).status().items():
            lat = st.get("latency") or []
            srv = by_url.get(url)
            rows.append({"node": url, "server": srv.name if srv else "?", "models": ", ".join(st.get("models", [])),
                         "unfinished": st.get("unfinished"), "mean latency s":
                         round(sum(lat) / len(lat), 3) if lat else None, "alive": bool(srv and srv.alive),
                         "GPU": (srv.env.get("CUDA_VISIBLE_DEVICES", "shared") if srv else None)})
        return pd.DataFrame(rows, columns=["node", "server", "models", "unfinished", "mean latency s", "alive", "GPU"])

    def describe(self):
        """Every process of the group: name, role, URL, pid, start seconds, GPU memory, command."""
        import pandas as pd

        rows = [{"name": p.server.name, "role": f"proxy ({s})", "url": p.url, "pid": p.server.pid,
                 "start s": round(p.server.start_seconds, 1), "GPU memory GiB": None, "command": p.command}
                for s, p in self.proxies.items()]
        for s in self.servers:
            d = s.describe()
            rows.append({"name": s.name, "role": "api_server", "url": s.base_url, "pid": s.pid,
                         "start s": d["start s"], "GPU memory GiB": d["GPU memory GiB"], "command": s.command})
        return pd.DataFrame(rows)

    def pids(self) -> set[int]:
        """Every live process of the group (all process groups)."""
        out: set[int] = set()
        for srv in [p.server for p in self.proxies.values()] + self.servers:
            if srv._proc is not None:
                out |= set(serve.group_members(srv.pgid))
        return out

    # ------------------------------------------------------------------ faults and lifecycle
    def kill(self, index: int = -1, sig: int = signal.SIGKILL) -> dict:
        """Crash one api_server (SIGKILL to the server process, as an out-of-memory kill would): the proxies
        learn of it only at their next heartbeat. Returns what was killed and when."""
        if not self.servers:
            raise ProxyError("the group has no server to kill")
        srv = self.servers[index]
        pid = srv.pid
        if pid is None:
            raise ProxyError(f"server {srv.name!r} is not running")
        os.kill(pid, sig)
        event = {"server": srv.name, "url": srv.base_url, "pid": pid, "time": time.time(),
                 "signal": signal.Signals(sig).name}
        self.killed.append(event)
        return event

    def kill_later(self, seconds: float, index: int = -1) -> threading.Timer:
        """kill(index) after `seconds` (in a timer thread: for a kill in the middle of a load test)."""
        timer = threading.Timer(seconds, self.kill, args=(index,))
        timer.daemon = True
        timer.start()
        return timer

    def wait_dropped(self, url: str, timeout: float | None = None) -> float:
        """Wait until every proxy has dropped `url` from its node list; the seconds it took."""
        timeout = timeout or 3 * max(p.heartbeat for p in self.proxies.values()) + 10
        return max(p.wait_nodes([url], timeout=timeout, present=False) for p in self.proxies.values())

    def stop(self, quiet: bool = False) -> None:
        """Stop every api_server and proxy of the group (also those still starting); wait for GPU memory."""
        before = [s.memory_before for s in self.servers if getattr(s, "memory_before", None) is not None]
        newer = _groups.get(self.name) not in (None, self)  # a later group took the name: its servers are not ours
        if _groups.get(self.name) is self:
            _groups.pop(self.name)
        for s in self.servers:
            s.stop(quiet=True, wait_memory=False)
        # servers a thread is still starting (an error or Ctrl-C during the start)
        for name in [] if newer else self._names:
            live = serve._live.get(name)
            if live is not None:
                live.stop(quiet=True, wait_memory=False)
        for p in self.proxies.values():
            p.stop()
        if before:
            from labkit.gpu import wait_for_memory_release

            wait_for_memory_release(min(before), timeout=30)
        if not quiet:
            print(f"stopped group {self.name!r}: {len(self.servers)} api_server(s), {len(self.proxies)} proxy(ies)")

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        alive = sum(s.alive for s in self.servers)
        return f"Group({self.name!r}, {alive}/{len(self.servers)} servers alive, proxies {list(self.proxies)})"
