"""Time limits for every request a notebook makes, so that no cell can hang: an engine call, a stream, a
web UI job or an HTTP request that gets no answer in time ends in a RequestTimeout that says what happened
and what to do. Used by labkit.engine (pipeline calls and streams), labkit.serve (openai clients) and
labkit.webui.

    reply = deadline.call(lambda: pipe(prompt), 300, "engine 'lab01'", fix="eng.close(), then ...")
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from labkit import config

T = TypeVar("T")


class RequestTimeout(TimeoutError):
    """A request got no answer within its time limit; the message says what to do."""


def default_timeout() -> float:
    """Seconds a single request may take: LABKIT_REQUEST_TIMEOUT, else 300 (students) or 180 (tests)."""
    return float(config.param("REQUEST_TIMEOUT", full=300, test=180))


def check_timeout(timeout: float | None) -> float:
    """The timeout in seconds (None: the default), or a ValueError if it is not a positive number."""
    if timeout is None:
        return default_timeout()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    return float(timeout)


def _message(what: str, seconds: float, fix: str) -> str:
    return f"{what} gave no answer within {seconds:g} s; {fix} (pass timeout=... to wait longer)"


def call(fn: Callable[[], T], timeout: float | None, what: str, fix: str) -> T:
    """fn() in a worker thread; its result, its exception, or a RequestTimeout after `timeout` seconds."""
    seconds = check_timeout(timeout)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=target, name="labkit-request", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise RequestTimeout(_message(what, seconds, fix))
    if "error" in box:
        raise box["error"]
    return box["value"]


def iterate(make: Callable[[], Iterator[T]], timeout: float | None, what: str, fix: str) -> Iterator[T]:
    """The items of make(), pulled in a worker thread; a RequestTimeout when no next item comes within
    `timeout` seconds (the limit is per item: a long stream that keeps flowing is fine)."""
    seconds = check_timeout(timeout)
    items: queue.Queue = queue.Queue()
    done = object()
    stop = threading.Event()

    def target() -> None:
        try:
            for item in make():
                items.put((True, item))
                if stop.is_set():
                    return
            items.put((True, done))
        except BaseException as err:
            items.put((False, err))

    threading.Thread(target=target, name="labkit-stream", daemon=True).start()
    try:
        while True:
            try:
                ok, item = items.get(timeout=seconds)
            except queue.Empty:
                raise RequestTimeout(_message(what, seconds, fix)) from None
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
