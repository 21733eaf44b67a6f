"""Fixtures the test files share (the suite-wide glue is in the repository's conftest.py)."""
from __future__ import annotations

import pytest

from helpers import TINY


@pytest.fixture(scope="module")
def tiny_dir():
    """The generated tiny-chat model's folder (built once, cached under LABKIT_HOME)."""
    from labkit.models import resolve

    return resolve(TINY)
