"""Time limits for every request a notebook makes, so that no cell can hang: an engine call, a stream, a
web UI job or an HTTP request that gets no answer in time ends in a RequestTimeout that says what happened
and what to do. Used by labkit.engine (pipeline calls and streams), labkit.serve (openai clients) and
labkit.webui.

    reply = deadline.call(lambda: pipe(prompt), 300, "engine 'lab01'", fix="eng.close(), then ...")
    reply = deadline.guarded(lambda: pipe(prompt), 300, "engine 'lab01'", "...", on_expire=abort)

`call` runs the request in a worker thread; `guarded` runs it in the notebook's own (main) thread and has a
watchdog thread interrupt it at the limit (a signal, as Ctrl-C does): no hand-over between threads, which cost
labkit's engine calls 0.9 ms each under TurboMind (lab 01's overhead check, GPU run of 2026-12-01).
"""
from __future__ import annotations

import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from labkit import config
from labkit.errors import LabkitError

T = TypeVar("T")


class RequestTimeout(LabkitError, TimeoutError):
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


class _Watchdog:
    """One daemon thread for the process: it waits for the armed request's limit and then signals the main
    thread (SIGALRM through pthread_kill, so it is the main thread's blocking wait that the signal ends). Between
    requests it sleeps on until the last limit it had, so that arming the next one (whose limit is later) does not
    have to wake it: a wake-up is a hand-over of the interpreter lock too."""

    REPEAT = 2.0  # seconds between signals while the request is still running past its limit

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.armed: tuple[object, float] | None = None  # (token, monotonic deadline) of the running request
        self.fired: object | None = None  # the token signalled
        self.until = math.inf  # what the thread sleeps until
        threading.Thread(target=self._run, name="labkit-deadline", daemon=True).start()

    def _run(self) -> None:
        last = math.inf
        while True:
            with self.lock:
                now, armed = time.monotonic(), self.armed
                if armed is not None and now >= armed[1]:
                    self.fired = armed[0]
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
                    self.armed = armed = (armed[0], now + self.REPEAT)  # again if the first one was swallowed
                if armed is not None:
                    self.until = armed[1]
                else:
                    self.until = last if last > now else math.inf
                self.wake.clear()
                until = self.until
            self.wake.wait(None if until == math.inf else until - now)
            last = until

    def arm(self, token: object, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self.lock:
            self.armed = (token, deadline)
            if deadline < self.until:
                self.wake.set()

    def disarm(self) -> None:
        with self.lock:
            self.armed = None


_watchdog: _Watchdog | None = None


def _on_signal(signum, frame) -> None:
    """The watchdog's signal: interrupt the guarded request as Ctrl-C does (a KeyboardInterrupt, which no
    `except Exception` on the way swallows); `guarded` turns it into a RequestTimeout."""
    armed = _watchdog.armed if _watchdog is not None else None
    if armed is not None and _watchdog.fired is armed[0]:
        raise KeyboardInterrupt


def _can_guard() -> bool:
    """The main thread, with SIGALRM free for labkit (not another library's) and no guarded call running."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return False
    if _watchdog is not None and _watchdog.armed is not None:
        return False  # a guarded call inside a guarded call: the inner one takes the worker-thread path
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, _on_signal)


def guarded(fn: Callable[[], T], timeout: float | None, what: str, fix: str,
            on_expire: Callable[[], None] | None = None) -> T:
    """fn() in the calling thread when it is the main one (else as `call`); past `timeout` seconds the watchdog
    interrupts it, `on_expire()` runs (e.g. aborting the request in the engine) and a RequestTimeout says so."""
    global _watchdog
    seconds = check_timeout(timeout)
    if not _can_guard():
        return call(fn, seconds, what, fix)
    if signal.getsignal(signal.SIGALRM) is not _on_signal:
        signal.signal(signal.SIGALRM, _on_signal)
    if _watchdog is None:
        _watchdog = _Watchdog()
    token, done, result = object(), False, None
    try:
        try:
            _watchdog.arm(token, seconds)
            result, done = fn(), True
        finally:
            _watchdog.disarm()
    except KeyboardInterrupt:
        _watchdog.disarm()  # the signal may have landed inside the disarm above, before it took effect
        if _watchdog.fired is not token:
            raise  # the student's Ctrl-C
        if not done:  # (the watchdog's signal landing after fn returned changes nothing)
            if on_expire is not None:
                on_expire()
            raise RequestTimeout(_message(what, seconds, fix)) from None
    return result
