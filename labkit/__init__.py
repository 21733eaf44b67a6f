"""labkit: the shared package behind every LMDeploy Lab notebook.

`import labkit` is light: submodules (and torch / lmdeploy behind them) load on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# Shortcuts used by the notebooks: name -> (module, attribute).
_SHORTCUTS = {
    "setup": ("notebook", "setup"),
    "param": ("config", "param"),
    "record": ("evidence", "record"),
    "resolve": ("models", "resolve"),
    "check": ("notebook", "check"),
    "LabkitError": ("errors", "LabkitError"),
}


def __getattr__(name: str) -> Any:
    if name in _SHORTCUTS:
        mod, attr = _SHORTCUTS[name]
        return getattr(importlib.import_module(f"labkit.{mod}"), attr)
    if importlib.util.find_spec(f"labkit.{name}") is not None:  # labkit.doctor, labkit.serve, ...
        return importlib.import_module(f"labkit.{name}")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """`%load_ext labkit`: register the `%%gpu` cell magic."""
    from labkit.notebook import register_magics

    register_magics(ipython)
