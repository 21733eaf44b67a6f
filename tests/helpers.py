"""Small helpers the test files share."""
from __future__ import annotations

import pytest

TINY = "generated:tiny-chat"


def one_line(err: pytest.ExceptionInfo) -> str:
    """The error's message, asserting it is one line (labkit's errors say what to do in one line)."""
    text = str(err.value)
    assert text and "\n" not in text, f"error should be one line: {text!r}"
    return text
TRAINED = "trained:tiny-chat"
