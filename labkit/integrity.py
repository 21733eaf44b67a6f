"""What a saved notebook's own evidence says about how it ran: in order top to bottom, cleared, raised,
on a generated model, and whether its records still match the cells and each other (hashes, chain).
Used by `labkit submit` (labkit.submit) and `labkit grade` (labkit.grade). Reads only; runs nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from labkit import evidence

MODEL_KEYS = ("model", "model_dir", "awq_dir")
GENERATED_NAMES = ("tiny-chat", "tiny-vl", "bench-1.5b")  # labkit.generate's models (see generate.available())


@dataclass
class Finding:
    """One thing wrong with a notebook: `kind` (cleared, order, raised, tampered, chain, student, generated,
    inconsistent, shared) and a sentence for the instructor."""

    kind: str
    text: str
    step: str | None = None


def lab_name(filename: str) -> str:
    """`01_chat` for `.../01_chat.ipynb` (the name labkit.setup gives the lab)."""
    return PurePath(filename).name.removesuffix(".ipynb")


def code_cells(nb: dict) -> list[tuple[int, dict]]:
    """(index, cell) of every non-empty code cell."""
    return [(i, c) for i, c in enumerate(nb.get("cells", []))
            if c.get("cell_type") == "code" and _source(c).strip()]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def is_cleared(nb: dict) -> bool:
    """True when no code cell has an output or an execution count (outputs cleared, or never run)."""
    cells = code_cells(nb)
    return bool(cells) and all(not c.get("outputs") and c.get("execution_count") is None for _, c in cells)


def errors(nb: dict) -> list[str]:
    """One line per error output: `cell N: Name: message`."""
    found = []
    for i, cell in code_cells(nb):
        for out in cell.get("outputs", []) or []:
            if out.get("output_type") == "error":
                value = str(out.get("evalue", "")).strip().splitlines()
                found.append(f"cell {i + 1}: {out.get('ename', 'Error')}: {value[0] if value else ''}")
    return found


def order_problem(nb: dict) -> str | None:
    """Why the notebook was not run top to bottom in one kernel (execution counts 1, 2, 3, ...), or None."""
    cells = code_cells(nb)
    counts = [c.get("execution_count") for _, c in cells]
    if not cells or all(n is None for n in counts):
        return "it was not run (no execution counts): open it, Kernel > Restart Kernel and Run All Cells, save"
    for k, ((i, _), n) in enumerate(zip(cells, counts), start=1):
        if n != k:
            got = "not run" if n is None else f"run as [{n}]"
            return (f"cell {i + 1} was {got}, expected [{k}]: it was not run top to bottom in one kernel; "
                    "Kernel > Restart Kernel and Run All Cells, then save")
    return None


def is_generated(name: str) -> bool:
    """True for labkit's generated models (`generated:NAME`, a folder under .../generated/, or NAME-vN)."""
    name = str(name).replace("\\", "/")
    if name.startswith("generated:") or "/generated/" in name:
        return True
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return any(re.match(rf"^{re.escape(g)}(-v\d+)?($|[-_])", base) for g in GENERATED_NAMES)


def generated_models(records: list[dict]) -> list[str]:
    """The generated models that the notebook's records name (in `model`, `model_dir`, `awq_dir`)."""
    names = []
    for rec in records:
        for key in MODEL_KEYS:
            value = (rec.get("values") or {}).get(key)
            if isinstance(value, str) and is_generated(value) and value not in names:
                names.append(value)
    return names


def plain_text(out: dict) -> str:
    """An output's text/plain as one string (nbformat may store it as a list of lines)."""
    text = (out.get("data") or {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else str(text)


def verify(nb: dict, notebook: str, student: str | None) -> list[Finding]:
    """Every way the notebook's records disagree with its cells, with each other, or with `student`."""
    found: list[Finding] = []
    cells = nb.get("cells", [])
    prev_by_session: dict[str, str] = {}
    seq_by_session: dict[str, int] = {}
    shown: dict[int, list[str]] = {}
    for ci, oi, rec in evidence.outputs(nb):
        step = _label(rec)
        if rec.get("kind") == "unreadable" or rec.get("format") != evidence.FORMAT:
            found.append(Finding("tampered", f"cell {ci + 1}: a record labkit cannot read (edited, or an old "
                                             "labkit): re-run the lab with this labkit", step))
            continue
        cell = cells[ci]
        shown.setdefault(ci, []).append(plain_text(cell["outputs"][oi]))
        if evidence.digest(rec) != rec.get("sha256"):
            found.append(Finding("tampered", f"cell {ci + 1}: record {step} was changed after it ran "
                                             "(its hash does not match its contents)", step))
        if rec.get("cell_sha256") != evidence.sha256_text(_source(cell)):
            found.append(Finding("tampered", f"cell {ci + 1}: the cell's code is not the code that made "
                                             f"record {step} (edited after it ran)", step))
        if rec.get("execution_count") != cell.get("execution_count"):
            found.append(Finding("tampered", f"cell {ci + 1}: record {step} says it ran as "
                                             f"[{rec.get('execution_count')}], the cell says "
                                             f"[{cell.get('execution_count')}]", step))
        if rec.get("output_sha256") != evidence.output_digest(shown[ci]):
            found.append(Finding("tampered", f"cell {ci + 1}: the text shown for {step} is not what labkit "
                                             "displayed (edited output)", step))
        session = rec.get("session")
        if rec.get("prev_sha256") != prev_by_session.get(session) or \
                rec.get("seq", 0) <= seq_by_session.get(session, 0):
            found.append(Finding("chain", f"cell {ci + 1}: record {step} does not follow the record before it "
                                          "(records removed, reordered, pasted in from another run, or cells "
                                          "re-run without a kernel restart)", step))
        prev_by_session[session], seq_by_session[session] = rec.get("sha256"), rec.get("seq", 0)
        if rec.get("notebook") != lab_name(notebook):
            found.append(Finding("tampered", f"cell {ci + 1}: record {step} was made in lab "
                                             f"{rec.get('notebook')!r}, not {lab_name(notebook)!r}", step))
        if student is not None and rec.get("student") not in (None, student):
            found.append(Finding("student", f"cell {ci + 1}: record {step} was made by student "
                                            f"{rec.get('student')!r}, not {student!r}", step))
    if len(prev_by_session) > 1:
        found.append(Finding("chain", f"records come from {len(prev_by_session)} different kernel sessions: "
                                      "parts of other runs were pasted in"))
    return found


def _label(rec: dict) -> str:
    if rec.get("kind") == "check":
        return f"check '{(rec.get('values') or {}).get('what', '?')}'"
    return str(rec.get("step"))


def submission_problems(nb: dict, notebook: str, require_course_model: bool) -> list[str]:
    """What keeps a notebook out of a submission (for `labkit submit`), one sentence each."""
    name = lab_name(notebook)
    problems = []
    why = order_problem(nb)
    if why:
        problems.append(f"{name}: {why}")
    if require_course_model:
        gen = generated_models([r for _, _, r in evidence.outputs(nb)])
        if gen:
            problems.append(f"{name}: it ran on generated model {gen[0]!r}, the rubric asks for the course "
                            "model: unset LABKIT_MODEL, re-run on a GPU machine with the course model")
    return problems
