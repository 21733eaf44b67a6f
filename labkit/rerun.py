"""`labkit grade --rerun N`: re-execute the handed-out labs for a random sample of N submissions on the
instructor's machine (nbclient, a fresh kernel per lab) and compare the figures the rubric's [rerun] lists,
within their stated tolerances. The instructor's own copy of each notebook runs, not the student's, so a
forged record or an edited cell cannot change what the re-run measures.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

from labkit import evidence
from labkit.rubric import MISSING, Rubric, get
from labkit.scoring import score_item

REPO = Path(__file__).resolve().parents[1]


def execute(notebook: Path, workdir: Path, timeout: int = 1800) -> dict:
    """Run `notebook` top to bottom (cells may raise; the run goes on) and return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    nbformat.write(nb, workdir / notebook.name)
    return dict(nb)


def compare(student: Any, ours: Any, tolerance: float) -> tuple[bool, str]:
    """Whether a student's figure agrees with the re-run's: numbers within `tolerance` (relative), else equal."""
    if student is MISSING or ours is MISSING:
        return False, f"student {_txt(student)}, re-run {_txt(ours)}"
    if isinstance(student, (int, float)) and isinstance(ours, (int, float)) and not isinstance(student, bool):
        scale = max(abs(student), abs(ours), 1e-12)
        off = abs(student - ours) / scale
        return off <= tolerance + 1e-9, (f"student {student:.4g}, re-run {ours:.4g} ({off:.1%} apart, "
                                         f"allowed {tolerance:.0%})")
    return student == ours, f"student {_txt(student)}, re-run {_txt(ours)}"


def _txt(x: Any) -> str:
    return "missing" if x is MISSING else repr(x)[:60]


def _last(records: list[dict], step: str) -> dict | None:
    return next((r for r in reversed(records) if r.get("kind") == "record" and r.get("step") == step), None)


def rerun_sample(subs: list, grades: list, rubric: Rubric, n: int, seed: int | None = None,
                 handout: str | Path | None = None) -> list[str]:
    """Re-run `n` random submissions' labs here; note agreements and differences on their grades."""
    if not rubric.rerun:
        raise ValueError(f"{rubric.path.name} has no [rerun] figures: add e.g. figures = [{{ step = \"awq\", "
                         "value = \"sizes[1].MiB on disk\", tolerance = 0.02 }]")
    folder = Path(handout) if handout else REPO / "notebooks"
    rng = random.Random(seed)
    picked = rng.sample(sorted(subs, key=lambda s: s.student), min(n, len(subs)))
    by_student = {g.student: g for g in grades}
    lines: list[str] = []
    for sub in picked:
        g = by_student[sub.student]
        labs = sorted({f["step"] and _lab_of(g.records, f["step"]) for f in rubric.rerun} - {None})
        if not labs:
            g.rerun.append("nothing to compare: none of the [rerun] steps is in this submission")
            continue
        with tempfile.TemporaryDirectory(prefix="labkit-rerun-") as tmp:
            ours: dict[str, list[dict]] = {}
            saved = os.environ.get("LABKIT_STUDENT")
            os.environ["LABKIT_STUDENT"] = f"rerun-{sub.student}"[:64]
            try:
                for lab in labs:
                    path = folder / f"{lab}.ipynb"
                    if not path.is_file():
                        g.rerun.append(f"{lab}: no handed-out notebook {path} to re-run")
                        continue
                    ours[lab] = [r for _, _, r in evidence.outputs(execute(path, Path(tmp)))]
            finally:
                os.environ.pop("LABKIT_STUDENT") if saved is None else os.environ.__setitem__("LABKIT_STUDENT", saved)
        for fig in rubric.rerun:
            lab = _lab_of(g.records, fig["step"])
            if lab is None or lab not in ours:
                continue
            mine, theirs = _last(ours[lab], fig["step"]), _last(g.records[lab], fig["step"])
            got = get(theirs["values"], fig["value"]) if theirs else MISSING
            want = get(mine["values"], fig["value"]) if mine else MISSING
            ok, text = compare(got, want, float(fig.get("tolerance", 0.0)))
            line = f"{'agrees' if ok else 'DIFFERS'}: {fig['step']}.{fig['value']}: {text}"
            g.rerun.append(line)
            if not ok:
                from labkit.integrity import Finding

                g.findings.setdefault("submission", []).append(
                    Finding("inconsistent", f"re-run here disagrees: {fig['step']}.{fig['value']}: {text}"))
        lines += [f"{sub.student}: {t}" for t in g.rerun]
    if any("DIFFERS" in t for t in lines):  # a re-run that disagrees takes the credit of the whole submission
        for g in grades:
            if any("DIFFERS" in t for t in g.rerun):
                g.items = [score_item(r.item, g.findings, g.records, rubric) for r in g.items]
    return lines


def _lab_of(records: dict[str, list[dict]], step: str) -> str | None:
    """The lab whose records hold `step` (None when this submission has none)."""
    return next((lab for lab, recs in records.items() if _last(recs, step) is not None), None)
