"""`lmdeploy chat`, as lab 01 shows it, run for real: one question piped in, then the exit word."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import engine, models
from helpers import suite_backends

PROMPT_MARK = "double enter to end input >>> "  # what lmdeploy/cli/chat.py prints before each prompt


def _requested() -> list[str]:
    """The suite's engine (`gpu-suite.sh --backend`: each suite runs its own), else auto and both engines."""
    suite = suite_backends()
    return suite if len(suite) == 1 else ["auto", *suite]


@pytest.mark.gpu
@pytest.mark.parametrize("requested", _requested())
def test_lmdeploy_chat_answers_and_exits(requested):
    """Lab 01 shows the command for each backend; each runs where it can (auto is what a student types)."""
    model = models.default("chat")
    auto, why = engine.choose_backend(models.resolve(model))
    if requested != "auto" and requested == auto and "auto" in _requested():
        pytest.skip(f"{requested} is what auto picks here: the auto case ran it")
    if requested == "turbomind" and auto != "turbomind":
        pytest.skip(f"TurboMind cannot run here ({why})")
    backend = auto if requested == "auto" else requested
    cmd = engine.chat_command(model, requested, session_len=256, cache_ratio=0.1, eager=True)
    print(cmd, f"({why})")
    assert f"--backend {backend}" in cmd
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = shlex.split(cmd)
    if shutil.which("lmdeploy", path=env["PATH"]) is None:  # same command, through this Python
        argv = [sys.executable, "-m", "lmdeploy", *argv[1:]]
    # A prompt ends with an empty line; `exit` (and an empty line) ends the chat.
    stdin = f"Hello, who are you?\n\n{engine.CHAT_EXIT_WORD}\n\n"
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300, env=env)
    tail = f"stdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 0, tail
    parts = proc.stdout.split(PROMPT_MARK)
    assert len(parts) == 3, tail  # before the question, the reply, after `exit`
    assert parts[1].strip(), f"lmdeploy chat printed no reply\n{tail}"
    assert "exiting..." in parts[2], tail
