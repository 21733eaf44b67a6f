"""The widget playground (lab 06): load any configuration, chat with it, compare two side by side.

    pg = labkit.playground.build()      # the lab's model, loading in the background
    pg                                  # the widgets

`controller` holds the state and does the work (in background threads: the kernel stays free),
`view` is the ipywidgets front, `configs` checks a configuration and predicts its memory before it
loads. Closing is explicit: the Unload buttons, `pg.close()`, or shutting the kernel down.
"""
from __future__ import annotations

from typing import Any

from labkit.playground.configs import (ENGINES, PRESETS, LoadConfig, Plan, PlaygroundError, awq_copies,
                                       engine_choices, make_plan)
from labkit.playground.controller import Controller, Reply

_current: dict[str, "Playground"] = {}


class Playground:
    """A controller and its view, shown in a notebook by putting it last in a cell."""

    def __init__(self, model: str, engine: str | None = None, name: str = "playground", load: bool = True,
                 model_b: str | None = None, engine_b: str | None = None):
        from labkit.playground.view import PlaygroundView

        old = _current.pop(name, None)
        if old is not None:  # re-running the cell that built it: the old one's engines go first
            print(f"closing the earlier playground {name!r} first")
            old.close()
        self.controller = Controller(name)
        self.view = PlaygroundView(self.controller, model, engine, model_b, engine_b)
        _current[name] = self
        if load:
            self.view.panel_a.load_btn.click()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.view.widget)

    def wait(self, timeout: float = 600) -> "Playground":
        """Wait until the running load / reply / compare is done."""
        self.controller.wait(timeout)
        return self

    def ask(self, text: str, timeout: float = 600) -> Reply | None:
        """Type `text`, press Send, wait for the reply; the Reply (None when it failed: see `error`)."""
        before = len(self.controller.replies)
        self.wait(timeout)
        self.view.prompt.value = text
        self.view.buttons["Send"].click()
        self.wait(timeout)
        return self.controller.replies[-1] if len(self.controller.replies) > before else None

    @property
    def error(self) -> str | None:
        """The last error the playground showed, or None."""
        return self.controller.error

    def close(self) -> None:
        """Unload both configurations (frees their memory)."""
        self.controller.close()
        _current.pop(self.controller.name, None)


def build(model: str | None = None, engine: str | None = None, load: bool = True, **kw: Any) -> Playground:
    """The playground on `model` (default: the lab's), starting to load it in the background."""
    from labkit.models import default

    return Playground(model or default("chat"), engine, load=load, **kw)


__all__ = ["Playground", "build", "Controller", "LoadConfig", "Plan", "Reply", "PlaygroundError", "PRESETS",
           "ENGINES", "awq_copies", "engine_choices", "make_plan"]
