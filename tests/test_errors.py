"""One error base class: every error class labkit defines derives from labkit.errors.LabkitError, so that
`except LabkitError` catches every refusal labkit makes (and `except ValueError` still catches bad input)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import labkit
from labkit.errors import InputError, LabkitError


def _error_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(labkit.__path__, "labkit."):  # packages too (labkit.vision, .playground)
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


def test_every_labkit_error_derives_from_labkit_error():
    classes = _error_classes()
    assert len(classes) >= 10, classes  # the walk finds them (ServerError, EngineError, ImageError, ...)
    strays = [f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, LabkitError)]
    assert not strays, f"error classes outside LabkitError: {strays}"


def test_the_walk_would_see_a_stray(monkeypatch):
    """The check can fail: an error class that does not derive from LabkitError is reported."""
    import labkit.config as cfg

    class StrayError(ValueError):
        pass

    StrayError.__module__ = "labkit.config"
    monkeypatch.setattr(cfg, "StrayError", StrayError, raising=False)
    assert StrayError in _error_classes() and not issubclass(StrayError, LabkitError)


@pytest.mark.parametrize("call", [
    lambda: __import__("labkit.kvcache", fromlist=["x"]).check_ratio(1.5),
    lambda: __import__("labkit.kvcache", fromlist=["x"]).check_policy(3),
    lambda: __import__("labkit.evidence", fromlist=["x"]).record(""),
    lambda: __import__("labkit.tools", fromlist=["x"]).check_parser("nope"),
])
def test_bad_input_is_a_labkit_error_and_still_a_value_error(call):
    with pytest.raises(LabkitError) as err:
        call()
    assert isinstance(err.value, ValueError) and isinstance(err.value, InputError)
