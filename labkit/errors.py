"""labkit's error classes: one base, `LabkitError`, so that `except labkit.LabkitError` catches every refusal
labkit makes (each message is one line that says what to do next). Each lab's errors derive from it, and
still from ValueError / RuntimeError / ... where that is what they are, so older `except ValueError` code
keeps working. Kept free of imports so every module can use it."""
from __future__ import annotations


class LabkitError(Exception):
    """Base of every error labkit raises on purpose; the message says what went wrong and what to do."""


class InputError(LabkitError, ValueError):
    """A bad argument or option (a wrong value, a wrong type, a name labkit does not know)."""


class OptionError(InputError):
    """An engine option lmdeploy would refuse (cache ratio, KV quant policy, session_len, tp, backend)."""


class ServerError(LabkitError, RuntimeError):
    """A server could not start or stopped unexpectedly; the message says why and what to do."""


class EngineError(LabkitError, RuntimeError):
    """An engine could not be built or used; the message says what to do."""
