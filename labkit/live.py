"""What this kernel started and has not stopped yet (engines, baselines, servers, web UIs), by name, so that
re-running the cell that made one replaces it instead of doubling the GPU memory or the port it holds, and
interpreter exit closes whatever is left.

`Live` is the base of Engine, HFEngine, Server and WebUI: each class keeps its own registry (`Cls._live`,
name -> object); `Cls.replace(name)` ends the earlier one, `obj._keep()` registers, `obj._forget()`
unregisters (from close / stop), and atexit ends them all.
"""
from __future__ import annotations

import atexit
import sys
from typing import Any, ClassVar


class Live:
    """Base of the objects a notebook starts by name and must always end (re-run: replace; exit: close)."""

    kind: ClassVar[str] = "object"           # what the messages call it: "engine", "server", ...
    _live: ClassVar[dict[str, "Live"]] = {}
    name: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_live" not in cls.__dict__:
            cls._live = {}  # one registry per class
            atexit.register(cls.end_all)

    # ------------------------------------------------------------------ what subclasses provide
    def _end(self, at_exit: bool = False) -> None:
        """Close / stop this object (subclasses: close() or stop())."""
        self.close()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ the registry
    def _keep(self) -> None:
        """Register under self.name (the object is now running)."""
        type(self)._live[self.name] = self

    def _forget(self) -> None:
        """Unregister, if this object is the one registered under its name."""
        if type(self)._live.get(self.name) is self:
            type(self)._live.pop(self.name)

    @classmethod
    def live(cls, name: str) -> "Live | None":
        """The running object called `name`, if any."""
        return cls._live.get(name)

    @classmethod
    def replace(cls, name: str) -> bool:
        """End the running object called `name` (before a new one takes its name); True if there was one."""
        obj = cls._live.get(name)
        if obj is None:
            return False
        verb = "stopping" if hasattr(obj, "stop") else "closing"
        print(f"{verb} the earlier {cls.kind} {name!r} ({obj!r}) first")
        obj._end()
        cls._live.pop(name, None)
        return True

    @classmethod
    def end_all(cls) -> None:
        """End every object of this class still running (at interpreter exit); errors are printed, not raised."""
        for name in list(cls._live):
            obj = cls._live.pop(name, None)
            if obj is None:
                continue
            try:
                obj._end(at_exit=True)
            except Exception as err:  # at exit: keep going
                print(f"could not close {cls.kind} {name!r}: {err}", file=sys.stderr)


def replace_earlier(live: dict[str, Any], name: str, what: str) -> bool:
    """Stop the live `what` (engine, baseline, server) called `name` in a plain dict registry; True if stopped."""
    obj = live.get(name)
    if obj is None:
        return False
    print(f"{'stopping' if hasattr(obj, 'stop') else 'closing'} the earlier {what} {name!r} ({obj!r}) first")
    (obj.stop if hasattr(obj, "stop") else obj.close)()
    return True
