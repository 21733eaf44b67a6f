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


def suite_backends() -> list[str]:
    """The engines a gpu test runs on: the suite's (LABKIT_BACKEND, which `gpu-suite.sh --backend` sets), else
    both (each skips with its reason where it cannot run)."""
    import os

    chosen = os.environ.get("LABKIT_BACKEND", "auto")
    return [chosen] if chosen in ("pytorch", "turbomind") else ["pytorch", "turbomind"]


def course_case(hf, parser: str, a: int, b: int, c: int, dispatch=None, temperature: float = 0.0,
                max_rounds: int = 4, **request):
    """"Compute (a+b)*c" through lmdeploy's rendering and `parser` around a local model (labkit.tools); `request`:
    more fields of each request (e.g. max_tokens)."""
    from labkit import tools

    return tools.run_tool_loop(tools.LocalClient(hf, parser), "trained", f"Compute ({a}+{b})*{c}",
                               dispatch=dispatch or tools.DISPATCH, max_rounds=max_rounds, temperature=temperature,
                               top_p=1.0, **request)
