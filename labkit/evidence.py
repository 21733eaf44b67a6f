"""Evidence for grading: what each lab proved and which checks passed or failed, as a table for the
student and as machine-readable output (MIME type `application/vnd.labkit.evidence+json`) that a grader
reads back from the executed notebook with `read()` and checks with `verify()` (labkit.grade).

Every record (a `record(step, ...)` or a `labkit.check`) carries, besides its values:
- `student` (asked once, kept in $XDG_CONFIG_HOME/labkit/student.json; LABKIT_STUDENT overrides),
  `notebook` (the lab that `labkit.setup` named), `session` (random, one per kernel), `seq` (1, 2, ...
  in this kernel), `time` (UTC, microseconds), `environment` (versions, GPU name and NVML UUID, or None);
- `execution_count` and `cell_sha256`: the cell's number and the SHA-256 of its source as the kernel
  received it (IPython's raw input history), to compare with the cell in the saved notebook;
- `output_sha256`: SHA-256 of the `text/plain` of every labkit output (records and checks) that this cell
  displayed up to and including this one, joined by newlines. That is all the kernel knows of the cell's
  outputs: prints, plots and other displays are not covered (how a front end stores them varies);
- `prev_sha256` (the previous record of this notebook in this kernel, None for the first) and `sha256`
  (of the record itself, see `digest`): a hash chain per notebook.
Tamper-evident, not tamper-proof: anyone who recomputes the hashes can forge a record.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import math
import os
import re
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any
from labkit.errors import InputError

MIME = "application/vnd.labkit.evidence+json"
FORMAT = 2
_context: dict[str, Any] = {"notebook": None, "seq": 0, "last": {}, "cell": None, "shown": []}
SESSION = uuid.uuid4().hex  # one per kernel (process)
_STUDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class EvidenceError(InputError):
    """Evidence that cannot be read or written; the message says what to do."""


def set_notebook(name: str) -> None:
    """Name the lab that later records belong to (labkit.setup does this)."""
    _context["notebook"] = name


# ----------------------------------------------------------------------------- student id

def config_dir() -> Path:
    """labkit's settings folder: $XDG_CONFIG_HOME/labkit, else ~/.config/labkit."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "labkit"


def check_student_id(student: str) -> str:
    """`student` if it is a usable id (letters, digits, . _ @ -; at most 64), else an EvidenceError."""
    student = (student or "").strip()
    if not _STUDENT_RE.match(student):
        raise EvidenceError(f"student id {student!r} is not usable: use letters, digits, '.', '_', '@' or '-' "
                            "(at most 64), e.g. your university login")
    return student


def student_id() -> str | None:
    """The student id: LABKIT_STUDENT if set, else the one `labkit submit` stored, else None."""
    env = os.environ.get("LABKIT_STUDENT")
    if env:
        return check_student_id(env)
    path = config_dir() / "student.json"
    try:
        return check_student_id(json.loads(path.read_text(encoding="utf-8"))["student"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_student_id(student: str) -> Path:
    """Store the student id for later records and submissions; returns the settings file."""
    student = check_student_id(student)
    path = config_dir() / "student.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"student": student}) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- values and hashes

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


def _canonical(value: Any) -> Any:
    """Numbers as a JSON round trip through any front end leaves them (3.0 and 3 are the same)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of `text` as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest(entry: dict) -> str:
    """SHA-256 of a record without its `sha256` field: sorted keys, compact JSON, integral floats as ints."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return sha256_text(json.dumps(_canonical(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def output_digest(plain_texts: list[str]) -> str:
    """SHA-256 of the text/plain of a cell's labkit outputs so far (joined by newlines)."""
    return sha256_text("\n".join(plain_texts))


# ----------------------------------------------------------------------------- environment

def version(pkg: str) -> str | None:
    """The installed version of `pkg` (read from its metadata, no import), or None if it is not installed."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def versions(packages: tuple[str, ...] = ("lmdeploy", "torch", "transformers")) -> dict[str, str | None]:
    """Installed versions of `packages` (None where missing), for evidence and benchmark reports."""
    return {pkg: version(pkg) for pkg in packages}


def gpu_identity() -> tuple[str | None, str | None]:
    """(name, NVML UUID) of the first GPU this process may use (CUDA_VISIBLE_DEVICES), or (None, None)."""
    from labkit.gpu import _nvml, _text

    nv = _nvml()
    if nv is None:
        return None, None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.startswith(("GPU-", "MIG-")):
            handle = nv.nvmlDeviceGetHandleByUUID(visible)
        else:
            handle = nv.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        return _text(nv.nvmlDeviceGetName(handle)), _text(nv.nvmlDeviceGetUUID(handle))
    except Exception:
        return None, None


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = dict(versions(("lmdeploy", "torch", "transformers", "labkit")))
    env["gpu"], env["gpu_uuid"] = gpu_identity()
    return env


def _cell() -> tuple[int | None, str | None]:
    """(execution count, raw source) of the cell running now, from IPython's input history."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        raw = shell.history_manager.input_hist_raw if shell is not None and shell.history_manager else None
    except Exception:
        raw = None
    if not raw or len(raw) < 2:
        return None, None
    return len(raw) - 1, raw[-1]


# ----------------------------------------------------------------------------- writing

def make_entry(kind: str, step: str, values: dict, plain: str) -> dict:
    """A chained, hashed record of `values` whose displayed text is `plain` (record and check use this)."""
    count, source = _cell()
    if count is None or count != _context["cell"]:  # a new cell: its labkit outputs start over
        _context["cell"], _context["shown"] = count, []
    _context["shown"].append(plain)
    _context["seq"] += 1
    notebook = _context["notebook"]
    entry = {
        "format": FORMAT, "kind": kind, "step": step, "notebook": notebook, "student": student_id(),
        "session": SESSION, "seq": _context["seq"],
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        "execution_count": count, "cell_sha256": sha256_text(source) if source is not None else None,
        "output_sha256": output_digest(_context["shown"]),
        "values": _plain(values), "environment": _environment(),
        "prev_sha256": _context["last"].get(notebook),
    }
    entry["sha256"] = digest(entry)
    _context["last"][notebook] = entry["sha256"]
    return entry


def record(step: str, **values: Any) -> None:
    """Record what `step` proved: shows a table and leaves a machine-readable copy in the notebook."""
    if not step or not isinstance(step, str):
        raise InputError("record(step, ...) needs a step name such as 'homework-story'")
    if not values:
        raise InputError(f"record({step!r}) needs at least one value, e.g. record({step!r}, tokens=300)")
    plain_values = _plain(values)
    env = _environment()
    rows = list(plain_values.items()) + list(env.items())
    title = f"evidence: {step}"
    plain = title + "\n" + "\n".join(f"  {k:<24} {_format(v)}" for k, v in rows)
    entry = make_entry("record", step, values, plain)
    table = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                    f"<td style='text-align:left'>{html.escape(_format(v))}</td></tr>" for k, v in rows)
    show({"text/plain": plain, "text/html": f"<b>{html.escape(title)}</b><table>{table}</table>", MIME: entry})


def record_start(line: str, **values: Any) -> None:
    """The first record of a lab (labkit.setup): shows `line`; later records chain to it, the report times from it."""
    show({"text/plain": line, MIME: make_entry("start", "start", values, line)})


def check_line(what: str, passed: bool, detail: str = "") -> str:
    """The line a check shows: `ok   what  (detail)` or `FAILED: what (detail)`."""
    if passed:
        return f"ok   {what}" + (f"  ({detail})" if detail else "")
    return f"FAILED: {what}" + (f" ({detail})" if detail else "")


def record_check(what: str, passed: bool, detail: str = "", fix: str = "") -> None:
    """Show and record one check's result (labkit.check calls this before it raises)."""
    plain = check_line(what, passed, detail)
    entry = make_entry("check", "check", {"what": what, "passed": bool(passed), "detail": detail, "fix": fix}, plain)
    show({"text/plain": plain, MIME: entry})


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) < 300 else text[:297] + "..."
    return str(value)


def show(bundle: dict) -> None:
    """Display a MIME bundle in a notebook, or print its text elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(bundle, raw=True)
            return
    except ImportError:
        pass
    print(bundle["text/plain"])


# ----------------------------------------------------------------------------- reading

def load_notebook(notebook: str | Path) -> dict:
    """An .ipynb file as a dict, or an EvidenceError that says what is wrong."""
    path = Path(notebook)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvidenceError(f"no notebook at {path}: give the path of an executed .ipynb") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvidenceError(f"{path} is not a readable notebook ({err}); hand in the .ipynb that Jupyter saved") \
            from None


def outputs(nb: dict) -> list[tuple[int, int, dict]]:
    """(cell index, output index, record) for every evidence record in a notebook dict, in cell order."""
    found = []
    for ci, cell in enumerate(nb.get("cells", [])):
        for oi, out in enumerate(cell.get("outputs", []) or []):
            data = out.get("data", {}) if isinstance(out, dict) else {}
            if MIME in data:
                payload = data[MIME]
                try:
                    found.append((ci, oi, json.loads(payload) if isinstance(payload, str) else payload))
                except json.JSONDecodeError:
                    found.append((ci, oi, {"kind": "unreadable"}))
    return found


def read(notebook: str | Path) -> list[dict]:
    """Every evidence record in an executed notebook, in order (for graders)."""
    return [rec for _, _, rec in outputs(load_notebook(notebook))]
