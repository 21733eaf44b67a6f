"""`labkit submit`: pack a student's executed notebooks into submission-<student>.zip for the instructor.

Refuses, with one line each, notebooks that were not run top to bottom in one kernel, or that ran on a
generated model where the rubric asks for the course model. The zip holds `notebooks/NN_name.ipynb` as
Jupyter saved them and `evidence.json` (the student, when, and each notebook's SHA-256 and records).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys
import zipfile
from pathlib import Path

from labkit import evidence, integrity
from labkit.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUBRIC = REPO / "grading" / "rubric.toml"


class SubmitError(InputError):
    """A submission that cannot be made; the message says what to do."""


def find_notebooks(paths: list[str | Path] | None = None) -> list[Path]:
    """The notebooks to hand in: the given files or folders, else ./notebooks/*.ipynb (or ./*.ipynb)."""
    if not paths:
        here = Path.cwd()
        paths = [here / "notebooks"] if (here / "notebooks").is_dir() else [here]
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.glob("*.ipynb") if not q.name.startswith("."))
        elif p.suffix == ".ipynb" and p.is_file():
            found.append(p)
        else:
            raise SubmitError(f"{p} is not a notebook or a folder of notebooks: give the executed .ipynb files")
    if not found:
        raise SubmitError(f"no .ipynb files in {', '.join(map(str, paths))}: run the labs there first")
    return found


def ask_student(student: str | None = None, interactive: bool | None = None) -> str:
    """The student id: `student`, else the stored one, else asked once on the terminal; stored for next time."""
    if student:
        evidence.set_student_id(student)
        return evidence.check_student_id(student)
    known = evidence.student_id()
    if known:
        return known
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise SubmitError("no student id yet: run `labkit submit --student YOUR_ID` once (it is kept in "
                          f"{evidence.config_dir() / 'student.json'})")
    typed = input("Your student id (as the instructor knows you, e.g. your university login): ")
    evidence.set_student_id(typed)
    return evidence.check_student_id(typed)


def rubric_requires_course_model(rubric: str | Path | None) -> bool:
    """Whether the rubric (default: the course's grading/rubric.toml) asks for the course model."""
    from labkit.rubric import load

    path = Path(rubric) if rubric else DEFAULT_RUBRIC
    return load(path).require_course_model


def write_zip(notebooks: dict[str, bytes], student: str, out_dir: str | Path) -> Path:
    """Write submission-<student>.zip holding `notebooks` (name -> .ipynb bytes) and evidence.json."""
    student = evidence.check_student_id(student)
    out = Path(out_dir) / f"submission-{student}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"student": student, "labkit": evidence.version("labkit"),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "notebooks": {}}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(notebooks.items()):
            zf.writestr(f"notebooks/{name}", data)
            records = [r for _, _, r in evidence.outputs(json.loads(data))]
            manifest["notebooks"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "records": records}
        zf.writestr("evidence.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    return out


def submit(paths: list[str | Path] | None = None, student: str | None = None, rubric: str | Path | None = None,
           out_dir: str | Path = ".") -> tuple[Path | None, list[str]]:
    """Pack the acceptable notebooks; returns (the zip or None, one line per refused notebook)."""
    student = ask_student(student)
    course = rubric_requires_course_model(rubric)
    accepted: dict[str, bytes] = {}
    refused: list[str] = []
    for path in find_notebooks(paths):
        nb = evidence.load_notebook(path)
        problems = integrity.submission_problems(nb, path.name, course)
        if problems:
            refused += problems
        else:
            accepted[path.name] = path.read_bytes()
    return (write_zip(accepted, student, out_dir) if accepted else None), refused


def _cli(args) -> int:
    try:
        out, refused = submit(args.notebooks, args.student, args.rubric, args.out)
    except (SubmitError, evidence.EvidenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in refused:
        print(f"refused {line}", file=sys.stderr)
    if out is None:
        print("error: no notebook could be handed in (see above)", file=sys.stderr)
        return 1
    with zipfile.ZipFile(out) as zf:
        n = sum(1 for name in zf.namelist() if name.startswith("notebooks/"))
    print(f"wrote {out} with {n} notebook(s)" + (f"; {len(refused)} refused: fix them and submit again"
                                                 if refused else ""))
    return 1 if refused else 0


def add_cli(sub) -> None:
    """`labkit submit [NOTEBOOKS...] [--student ID] [--rubric RUBRIC.toml] [--out DIR]`."""
    p = sub.add_parser("submit", help="pack your executed notebooks into submission-<student>.zip")
    p.add_argument("notebooks", nargs="*", help="executed .ipynb files or folders (default: ./notebooks)")
    p.add_argument("--student", help="your student id (asked once, then kept in ~/.config/labkit)")
    p.add_argument("--rubric", help="the course's rubric (default: grading/rubric.toml)")
    p.add_argument("--out", default=".", help="folder for the zip (default: here)")
    p.set_defaults(func=_cli)
