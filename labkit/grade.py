"""`labkit grade SUBMISSIONS/ --rubric RUBRIC.toml --out grades/`: score executed notebooks without running
them, flag what does not add up, and write grades.csv, a Gradescope results.json per submission and
report.html (labkit.grade_report); what an item earns is labkit.scoring. `--rerun N` re-executes a sample on this machine (labkit.rerun).

SUBMISSIONS/ holds submission-<student>.zip files (from `labkit submit`) and/or one folder of .ipynb files
per student (folder name = student id); a folder that itself holds .ipynb files is one submission.
"""
from __future__ import annotations

import csv
import json
import sys
import zipfile
from pathlib import Path

from labkit import crosscheck, evidence, integrity
from labkit.integrity import Finding, lab_name
from labkit.errors import InputError
from labkit.rubric import Rubric, load
from labkit.scoring import UNCREDIT, WHY, Grade, ItemResult, Submission, score_item  # noqa: F401 (re-exported)


class GradeError(InputError):
    """Submissions that cannot be graded; the message says what to do."""


def load_submissions(folder: str | Path) -> list[Submission]:
    """Every submission in `folder` (zips and per-student folders)."""
    root = Path(folder)
    if not root.is_dir():
        raise GradeError(f"{root} is not a folder: give the folder that holds the submission-*.zip files")
    if any(root.glob("*.ipynb")):
        return [_from_files(root.name, root, {p.name: p.read_bytes() for p in root.glob("*.ipynb")})]
    subs = []
    for path in sorted(root.iterdir()):
        if path.suffix == ".zip":
            student = path.stem.removeprefix("submission-")
            try:
                with zipfile.ZipFile(path) as zf:
                    files = {Path(n).name: zf.read(n) for n in zf.namelist() if n.endswith(".ipynb")}
                    manifest = json.loads(zf.read("evidence.json")) if "evidence.json" in zf.namelist() else {}
            except (zipfile.BadZipFile, json.JSONDecodeError) as err:
                subs.append(Submission(student, path, {}, [Finding("tampered", f"{path.name} is unreadable ({err})")]))
                continue
            sub = _from_files(student, path, files)
            if manifest.get("student") not in (None, student):
                sub.findings.append(Finding("student", f"the zip is named for {student!r}, its evidence.json says "
                                                       f"{manifest.get('student')!r}"))
            subs.append(sub)
        elif path.is_dir() and any(path.glob("*.ipynb")):
            subs.append(_from_files(path.name, path, {p.name: p.read_bytes() for p in path.glob("*.ipynb")}))
    if not subs:
        raise GradeError(f"no submissions in {root}: expected submission-<student>.zip files or student folders")
    return subs


def _from_files(student: str, source: Path, files: dict[str, bytes]) -> Submission:
    sub = Submission(student, source, {})
    for name, data in sorted(files.items()):
        try:
            sub.notebooks[lab_name(name)] = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            sub.findings.append(Finding("tampered", f"{name} is not a readable notebook"))
    return sub


def analyse(sub: Submission, rubric: Rubric) -> tuple[dict[str, list[Finding]], dict[str, list[dict]]]:
    """Per lab: what is wrong with it, and its records."""
    findings: dict[str, list[Finding]] = {"submission": list(sub.findings)}
    records: dict[str, list[dict]] = {}
    for lab, nb in sub.notebooks.items():
        recs = [r for _, _, r in evidence.outputs(nb)]
        records[lab] = recs
        fs: list[Finding] = []
        if integrity.is_cleared(nb):
            fs.append(Finding("cleared", f"{lab}: outputs cleared (or never run): there is no evidence to grade"))
        else:
            raised = integrity.errors(nb)
            why = None if raised else integrity.order_problem(nb)
            if why:
                fs.append(Finding("warn", f"{lab}: {why}"))
            fs += [Finding("raised", f"{lab}: raised in {line}") for line in raised]
            fs += [Finding(f.kind, f"{lab}: {f.text}", f.step) for f in integrity.verify(nb, lab, sub.student)]
            fs += [Finding(f.kind, f"{lab}: {f.text}", f.step)
                   for f in crosscheck.contradictions(recs, rubric.integrity)]
            if recs and all(r.get("student") is None for r in recs):
                fs.append(Finding("warn", f"{lab}: its records carry no student id (run before it was set)"))
            gen = integrity.generated_models(recs)
            if gen and rubric.require_course_model:
                fs.append(Finding("generated", f"{lab}: ran on generated model {gen[0]!r}, the rubric asks for the "
                                               "course model"))
        findings[lab] = fs
    return findings, records


def grade(folder: str | Path, rubric_path: str | Path, out: str | Path | None = None, rerun: int = 0,
          seed: int | None = None, handout: str | Path | None = None) -> list[Grade]:
    """Grade every submission in `folder`; with `out`, write grades.csv, gradescope/ and report.html."""
    rubric = load(rubric_path)
    subs = load_submissions(folder)
    analysed = {s.student: analyse(s, rubric) for s in subs}
    everyone = {st: [r for recs in a[1].values() for r in recs] for st, a in analysed.items()}
    for st, fs in crosscheck.shared(everyone, rubric.integrity).items():
        analysed[st][0]["submission"] += fs
    grades = []
    for sub in subs:
        findings, records = analysed[sub.student]
        items = [score_item(i, findings, records, rubric) for i in rubric.items]
        grades.append(Grade(sub.student, items, findings, records))
    if rerun:
        from labkit.rerun import rerun_sample

        rerun_sample(subs, grades, rubric, rerun, seed=seed, handout=handout)
    if out is not None:
        write_outputs(grades, rubric, Path(out))
    return grades


def write_outputs(grades: list[Grade], rubric: Rubric, out: Path) -> None:
    """grades.csv, gradescope/<student>/results.json and report.html in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["student"] + [i.id for i in rubric.items] + ["total", "max", "verdict", "flags"])
        for g in grades:
            w.writerow([g.student] + [f"{r.score:g}" for r in g.items] +
                       [f"{g.total:g}", f"{rubric.max_points:g}", g.verdict, " ".join(g.flags())])
    for g in grades:
        path = out / "gradescope" / g.student / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(gradescope(g, rubric), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    from labkit.grade_report import write_report

    write_report(grades, rubric, out / "report.html")


def gradescope(g: Grade, rubric: Rubric) -> dict:
    """Gradescope's autograder results.json for one submission (score, tests[], output, visibility)."""
    notes = [f.text for fs in g.findings.values() for f in fs]
    tests = [{"name": r.item.title, "number": str(n), "score": r.score, "max_score": r.item.points,
              "status": "passed" if r.status == "passed" else "failed",
              "output": f"{r.status}: {r.text}\nreads {r.item.reads()}", "tags": [r.item.notebook],
              "visibility": "visible"} for n, r in enumerate(g.items, start=1)]
    return {"score": g.total, "output": f"{g.student}: {g.verdict}, {g.total:g} of {rubric.max_points:g} points"
            + ("\n" + "\n".join(notes) if notes else ""), "visibility": "visible", "stdout_visibility": "hidden",
            "tests": tests}


def _cli(args) -> int:
    try:
        grades = grade(args.submissions, args.rubric, args.out, rerun=args.rerun, seed=args.seed,
                       handout=args.notebooks)
    except ValueError as err:  # GradeError, RubricError, EvidenceError
        print(f"error: {err}", file=sys.stderr)
        return 1
    width = max(len(g.student) for g in grades)
    for g in grades:
        most = sum(r.item.points for r in g.items)
        print(f"{g.student:<{width}}  {g.total:>5g} / {most:g}  {g.verdict}" +
              (f" ({', '.join(g.flags())})" if g.flags() else ""))
    print(f"wrote {Path(args.out) / 'grades.csv'}, {Path(args.out) / 'gradescope'}/, {Path(args.out) / 'report.html'}")
    return 0


def add_cli(sub) -> None:
    """`labkit grade SUBMISSIONS/ --rubric RUBRIC.toml --out grades/ [--rerun N]`."""
    p = sub.add_parser("grade", help="grade submissions from their recorded evidence (no GPU needed)")
    p.add_argument("submissions", help="folder of submission-<student>.zip files (or student folders)")
    p.add_argument("--rubric", default=str(Path(__file__).resolve().parents[1] / "grading" / "rubric.toml"),
                   help="the rubric (default: the course's grading/rubric.toml)")
    p.add_argument("--out", default="grades", help="where grades.csv, gradescope/ and report.html go")
    p.add_argument("--rerun", type=int, default=0, metavar="N",
                   help="re-execute N random submissions' labs here and compare their figures")
    p.add_argument("--seed", type=int, default=None, help="seed of the --rerun sample (default: random)")
    p.add_argument("--notebooks", default=None, help="the handed-out notebooks --rerun executes (default: notebooks/)")
    p.set_defaults(func=_cli)
