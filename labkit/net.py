"""Ports, URLs and HTTP clients for labkit's servers (lab 02): a free port, a busy port named in milliseconds,
the URL host that reaches a server, and the one HTTP library labkit itself uses (httpx, which openai uses too),
always with proxy settings ignored (the servers are on this machine)."""
from __future__ import annotations

import json
import shlex
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

from labkit.errors import ServerError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def check_port(host: str, port: int) -> int:
    """The port itself if a server could listen on host:port now, else a ServerError saying who holds it."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ServerError(f"port must be a whole number in 1..65535, not {port!r} (or None for a free one)")
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "busy"
        try:
            s.bind((host, port))
        except OSError as err:
            from labkit.registry import servers

            holder = next((e for e in servers() if e.get("port") == port and e["state"] != "gone"), None)
            who = (f"labkit's server {holder['name']!r} (pid {holder['pid']}) holds it: stop it, or run "
                   f"`labkit servers --stop`" if holder else "another program holds it (`ss -ltnp` shows which)")
            raise ServerError(f"port {port} on {host} is busy ({err.strerror}): {who}; "
                              f"or leave port=None to get a free one") from None
    return port


def http_client(timeout: float = 120.0, **kwargs: Any):
    """An httpx.Client for servers on this machine (proxy settings ignored)."""
    import httpx

    return httpx.Client(trust_env=False, timeout=timeout, **kwargs)


def get_json(url: str, api_key: str | None = None, timeout: float = 2.0) -> tuple[int, Any]:
    """(HTTP status, JSON body or None) of a GET; (0, None) when nothing answers."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key and api_key != "none" else {}
    try:
        with http_client(timeout) as client:
            resp = client.get(url, headers=headers)
    except httpx.HTTPError:
        return 0, None
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, None


def models_listed(base_url: str, api_key: str | None = None, timeout: float = 2.0) -> list[str] | None:
    """The model names /v1/models lists at `base_url`, or None when it does not answer 200 with a list."""
    status, body = get_json(base_url.rstrip("/") + "/v1/models", api_key, timeout)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    return [m.get("id") for m in body["data"] if isinstance(m, dict)]


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
    return openai.OpenAI(base_url=base_url, api_key=api_key, http_client=http_client(timeout, transport=Explained()),
                         **kwargs)


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
    """Print the curl command for a request, run it, and return the JSON reply (httpx if curl is missing)."""
    import shutil

    cmd = curl_command(url, body, api_key)
    print("$", shlex.join(cmd))
    if shutil.which("curl"):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ServerError(f"curl failed (exit {done.returncode}): {done.stderr.strip()[:300]}")
        return json.loads(done.stdout)
    print("(curl is not installed here: the same request is sent with Python's httpx)")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key and api_key != "none" else {}
    with http_client(timeout) as client:
        resp = client.get(url, headers=headers) if body is None else client.post(url, json=body, headers=headers)
    return resp.json()
