"""Settings every lab shares: the run profile, notebook parameters, and where labkit keeps files.

Environment variables (all optional):
  LABKIT_PROFILE   `full` (default, for students) or `test` (small sweeps, used by the test suites)
  LABKIT_MODEL     model for every lab: a catalogue name, a hub id, a folder, or `generated:NAME`
  LABKIT_<NAME>    any notebook parameter read with `param(NAME, ...)`
  LABKIT_HOME      where generated models, quantized models and evidence go (default ~/.cache/labkit)
  LABKIT_SHARE     extra folder searched for course models (like the course's /root/share)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from labkit.errors import InputError

PROFILES = ("full", "test")


def profile() -> str:
    """The run profile: `full` for students, `test` for the test suites (small sweeps)."""
    value = os.environ.get("LABKIT_PROFILE", "full").strip().lower() or "full"
    if value not in PROFILES:
        raise InputError(f"LABKIT_PROFILE={value!r} is not one of {PROFILES}; unset it or pick one")
    return value


def param(name: str, full: Any, test: Any | None = None) -> Any:
    """A notebook parameter: LABKIT_<NAME> if set (JSON or text), else the profile's default."""
    raw = os.environ.get(f"LABKIT_{name.upper()}")
    if raw is not None:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    if test is not None and profile() == "test":
        return test
    return full


def home() -> Path:
    """labkit's own folder for generated models, quantized models and evidence."""
    path = Path(os.environ.get("LABKIT_HOME", Path.home() / ".cache" / "labkit")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_file(name: str) -> Path:
    """A file shipped with labkit (corpus, held-out text, images)."""
    return Path(__file__).parent / "data" / name
