"""Evidence for grading: what each lab proved, as a table for the student and as
machine-readable output (MIME type `application/vnd.labkit.evidence+json`) that a grader reads
back from the executed notebook with `read()`. Used by every lab's closing cells.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any
from labkit.errors import InputError

MIME = "application/vnd.labkit.evidence+json"
_context: dict[str, Any] = {"notebook": None}


def set_notebook(name: str) -> None:
    """Name the lab that later records belong to (labkit.setup does this)."""
    _context["notebook"] = name


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of `value` (numpy scalars, paths, dataclasses, DataFrames...)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # pandas DataFrame
        return _plain(value.to_dict(orient="records"))
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        try:
            return _plain(value.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return _plain(asdict(value))
    return str(value)


def version(pkg: str) -> str | None:
    """The installed version of `pkg` (read from its metadata, no import), or None if it is not installed."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def versions(packages: tuple[str, ...] = ("lmdeploy", "torch", "transformers")) -> dict[str, str | None]:
    """Installed versions of `packages` (None where missing), for evidence and benchmark reports."""
    return {pkg: version(pkg) for pkg in packages}


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = dict(versions())
    from labkit.gpu import gpus

    found = gpus()
    env["gpu"] = found[0].name if found else None
    return env


def record(step: str, **values: Any) -> None:
    """Record what `step` proved: shows a table and leaves a machine-readable copy in the notebook."""
    if not step or not isinstance(step, str):
        raise InputError("record(step, ...) needs a step name such as 'homework-story'")
    if not values:
        raise InputError(f"record({step!r}) needs at least one value, e.g. record({step!r}, tokens=300)")
    entry = {
        "step": step,
        "notebook": _context["notebook"],
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "values": _plain(values),
        "environment": _environment(),
    }
    _show(entry)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) < 300 else text[:297] + "..."
    return str(value)


def _show(entry: dict) -> None:
    rows = list(entry["values"].items()) + [(k, v) for k, v in entry["environment"].items()]
    title = f"evidence: {entry['step']}"
    plain = title + "\n" + "\n".join(f"  {k:<24} {_format(v)}" for k, v in rows)
    table = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                    f"<td style='text-align:left'>{html.escape(_format(v))}</td></tr>" for k, v in rows)
    bundle = {"text/plain": plain,
              "text/html": f"<b>{html.escape(title)}</b><table>{table}</table>",
              MIME: entry}
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(bundle, raw=True)
            return
    except ImportError:
        pass
    print(plain)


def read(notebook: str | Path) -> list[dict]:
    """Every evidence record in an executed notebook, in order (for graders)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if MIME in data:
                payload = data[MIME]
                found.append(json.loads(payload) if isinstance(payload, str) else payload)
    return found
