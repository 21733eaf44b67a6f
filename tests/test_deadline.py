"""No cell can hang: labkit.deadline's limits, the openai client against a real socket that never
answers, and an engine request that runs past its limit (gpu)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from labkit import deadline


def test_call_returns_raises_or_times_out():
    assert deadline.call(lambda: 42, 5, "x", "y") == 42
    with pytest.raises(KeyError):
        deadline.call(lambda: {}["missing"], 5, "x", "y")
    start = time.perf_counter()
    with pytest.raises(deadline.RequestTimeout) as err:
        deadline.call(lambda: time.sleep(5), 0.2, "engine 'demo'", "close it and try again")
    assert time.perf_counter() - start < 2
    assert str(err.value) == ("engine 'demo' gave no answer within 0.2 s; close it and try again "
                              "(pass timeout=... to wait longer)")


def test_iterate_limits_the_wait_for_each_item():
    def slow_after(n):
        for i in range(n):
            yield i
        time.sleep(5)
        yield n

    assert list(deadline.iterate(lambda: iter(range(3)), 5, "x", "y")) == [0, 1, 2]
    got = []
    with pytest.raises(deadline.RequestTimeout, match="stream gave no answer within"):
        for item in deadline.iterate(lambda: slow_after(2), 0.3, "stream", "y"):
            got.append(item)
    assert got == [0, 1]

    def broken():
        yield 1
        raise ValueError("bad piece")

    with pytest.raises(ValueError, match="bad piece"):
        list(deadline.iterate(broken, 5, "x", "y"))


def test_bad_timeouts_are_refused(monkeypatch):
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
            deadline.check_timeout(bad)
    monkeypatch.setenv("LABKIT_REQUEST_TIMEOUT", "7")
    assert deadline.check_timeout(None) == 7.0


def test_openai_client_gives_up_once_and_says_what_to_do():
    """A real listening socket that accepts and never answers, like a stuck server."""
    import openai

    from labkit.serve import openai_client

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        accepted = []
        threading.Thread(target=lambda: [accepted.append(srv.accept()) for _ in range(3)], daemon=True).start()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
        start = time.perf_counter()
        with pytest.raises(openai.APITimeoutError) as err:
            openai_client(url, timeout=0.5).models.list()
        took = time.perf_counter() - start
    assert took < 2.5, f"{took:.1f} s: retried?"
    assert len(accepted) == 1  # one attempt, no retries
    cause = str(err.value.__cause__)
    assert f"the server at {url} gave no answer within 0.5 s" in cause and "server.log_tail()" in cause


@pytest.mark.gpu
def test_engine_request_past_its_limit_ends_with_a_message():
    from labkit.engine import Engine

    with Engine("generated:tiny-chat", name="deadline", cache_ratio=0.05) as eng:
        with pytest.raises(deadline.RequestTimeout) as err:
            eng.generate(["Tell me a long story."] * 8, max_new_tokens=300, ignore_eos=True, timeout=0.05)
        assert "engine 'deadline' gave no answer within 0.05 s" in str(err.value) and "close the engine" in str(err.value)
        pieces = list(eng.stream("Hi", max_new_tokens=4, timeout=60))  # the engine still answers afterwards
        assert pieces
