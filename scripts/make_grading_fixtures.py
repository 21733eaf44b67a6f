"""Make the grading test fixtures (tests/data/grading/) from really executed notebooks.

    # 1. execute the labs on this machine, once per fixture student (CPU: LABKIT_PROFILE=test, generated models)
    python scripts/make_grading_fixtures.py execute --work /tmp/lkfix
    # 2. pack the submissions, with the doctored ones derived from the real runs
    python scripts/make_grading_fixtures.py pack --work /tmp/lkfix --out tests/data/grading
    # on the GPU machine (gpu cells run): alice's run only, in two halves of under 10 minutes each
    python scripts/make_grading_fixtures.py execute --work $OUT/grading-runs --students alice \
        --labs 00_setup 01_chat 02_serving 03_awq
    python scripts/make_grading_fixtures.py execute --work $OUT/grading-runs --students alice \
        --labs 04_kv_cache 05_vision 06_playground
    python scripts/make_grading_fixtures.py pack --work .../grading-runs --out tests/data/grading-gpu
    labkit grade tests/data/grading-gpu/class --rubric grading/rubric-gpu-suite.toml --out grades-gpu
    # or, with no extra GPU time, the GPU suite's own executed notebooks, run with LABKIT_STUDENT=alice (the
    # suite's kernels keep IPython's history and conftest each cell's execution count, so the evidence can match
    # its cells; a count that is off is flagged, not hidden):
    python scripts/make_grading_fixtures.py pack --from-zip executed-notebooks.zip --out tests/data/grading-gpu

Fixture students (class/ is graded with grading/rubric-cpu.toml, course/ with grading/rubric.toml):
  alice  complete: every lab, run top to bottom      carol  partial: labs 00 and 04 only
  dan    cleared: alice's notebooks, outputs cleared   erin   edited numbers: lab 03's AWQ size changed
  frank  edited text: lab 06's reply changed           gina   copied: alice's notebooks, renamed, re-hashed
  hank   errored: lab 05 run with SESSION_LEN=100000, so a check fails and the notebook raises
  ivan   (course/) a real run on the generated model, graded against the course rubric
Outputs are kept small: images, HTML and widget views are dropped, long prints cut (labkit's own
evidence outputs stay whole: they are what the grader checks).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkit import evidence  # noqa: E402
from labkit.submit import write_zip  # noqa: E402

ALL = ["00_setup", "01_chat", "02_serving", "03_awq", "04_kv_cache", "05_vision", "06_playground"]
RUNS = {  # student -> (labs, extra environment)
    "alice": (ALL, {}),
    "carol": (["00_setup", "04_kv_cache"], {}),
    "erin": (["00_setup", "03_awq"], {}),
    "frank": (["00_setup", "06_playground"], {}),
    "hank": (["00_setup", "05_vision"], {"LABKIT_SESSION_LEN": "100000"}),
    "ivan": (["00_setup", "04_kv_cache"], {}),
}
KEEP_MIME = ("text/plain", evidence.MIME)


def execute(work: Path, students: list[str], timeout: int, only: list[str] | None = None) -> None:
    """Run each student's labs with nbclient (a fresh kernel each), saving the executed notebooks."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for key, value in {"LABKIT_PROFILE": "test", "LABKIT_MODEL": "generated:tiny-chat", "HF_HUB_OFFLINE": "1",
                       "LABKIT_MODEL_VISION": "generated:tiny-vl", "TRANSFORMERS_OFFLINE": "1",
                       "MPLBACKEND": "Agg", "TORCH_COMPILE_DISABLE": "1", "PYTHONUNBUFFERED": "1"}.items():
        os.environ.setdefault(key, value)  # as the test suites run the labs (conftest.py)
    for student in students:
        labs, extra = RUNS[student]
        out = work / student
        out.mkdir(parents=True, exist_ok=True)
        for lab in [x for x in labs if not only or x in only]:
            nb = nbformat.read(REPO / "notebooks" / f"{lab}.ipynb", as_version=4)
            env = {"LABKIT_STUDENT": student, **extra}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            t0 = time.time()
            try:
                NotebookClient(nb, timeout=timeout, kernel_name="python3",
                               resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
                status = "ok"
            except CellExecutionError as err:
                status = "raised: " + re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip().splitlines()[-1])[:120]
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            nbformat.write(nb, out / f"{lab}.ipynb")
            print(f"{student} {lab}: {status} ({time.time() - t0:.0f} s)", flush=True)


def shrink(nb: dict) -> dict:
    """A copy of `nb` with only text/plain and labkit evidence kept in outputs, long prints cut."""
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        outs = []
        for out in cell.get("outputs", []) or []:
            if out.get("output_type") == "stream":
                text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                out["text"] = text if len(text) <= 1500 else text[:1500] + "\n[... cut for the test data]\n"
            elif out.get("output_type") in ("display_data", "execute_result"):
                out["data"] = {k: v for k, v in out.get("data", {}).items() if k in KEEP_MIME}
                out["metadata"] = {}
                if not out["data"]:
                    continue
                if evidence.MIME not in out["data"]:
                    text = "".join(out["data"]["text/plain"]) if isinstance(out["data"]["text/plain"], list) \
                        else out["data"]["text/plain"]
                    out["data"]["text/plain"] = text[:1500]
            elif out.get("output_type") == "error":
                out["traceback"] = [re.sub(r"\x1b\[[0-9;]*m", "", t)[-600:] for t in out.get("traceback", [])][-3:]
            outs.append(out)
        cell["outputs"] = outs
    return nb


def rehash(nb: dict, **changes) -> dict:
    """What a forger does: set `changes` in every record and recompute the hashes and the chain."""
    prev: dict[str, str | None] = {}
    for ci, oi, rec in evidence.outputs(nb):
        rec.update(changes)
        rec["prev_sha256"] = prev.get(rec["session"])
        rec["sha256"] = evidence.digest(rec)
        prev[rec["session"]] = rec["sha256"]
        nb["cells"][ci]["outputs"][oi]["data"][evidence.MIME] = rec
    return nb


def clear(nb: dict) -> dict:
    """Outputs and execution counts cleared, as Jupyter's "Clear All Outputs" leaves a notebook."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def edit_record(nb: dict, step: str, edit, shown: tuple[str, str] | None = None) -> dict:
    """Change the values of record `step` (and, with `shown` = (old, new), its shown text), without re-hashing."""
    nb = copy.deepcopy(nb)
    for ci, oi, rec in evidence.outputs(nb):
        if rec.get("step") == step:
            out = nb["cells"][ci]["outputs"][oi]
            before = json.dumps(rec["values"])
            edit(rec["values"])
            out["data"][evidence.MIME] = rec
            if shown:
                text = out["data"]["text/plain"]
                out["data"]["text/plain"] = ("".join(text) if isinstance(text, list) else text).replace(*shown)
            if before == json.dumps(rec["values"]):
                raise SystemExit(f"edit of {step} changed nothing")
            return nb
    raise SystemExit(f"no record {step!r} to edit")


def _smaller_awq(values: dict) -> None:
    values["sizes"][-1]["MiB on disk"] = round(values["sizes"][-1]["MiB on disk"] / 2, 2)


NEW_REPLY = "The sea is calm and blue tonight."


def _other_reply(values: dict) -> None:
    values["reply"] = NEW_REPLY


def load_dir(folder: Path) -> dict[str, dict]:
    """name.ipynb -> notebook dict for every notebook in `folder`."""
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.ipynb"))}


def load_zip(path: Path) -> dict[str, dict]:
    """name.ipynb -> notebook dict for every notebook in a zip (e.g. the GPU suite's executed-notebooks.zip)."""
    with zipfile.ZipFile(path) as zf:
        nbs = {Path(n).name: json.loads(zf.read(n)) for n in zf.namelist()
               if n.endswith(".ipynb") and re.match(r"\d\d_", Path(n).name)}
    counted = [c.get("execution_count") for nb in nbs.values() for c in nb["cells"] if c.get("cell_type") == "code"]
    if not nbs or all(n is None for n in counted):
        raise SystemExit(f"{path}: these notebooks carry no execution counts (a GPU suite run from before conftest "
                         "kept them), so their evidence cannot match: run the suite again, or `execute` (see --help)")
    return nbs


def pack(runs: dict[str, dict[str, dict]], out: Path) -> None:
    """Write class/ and course/ submissions from real runs (student -> notebooks) and their doctored copies."""
    if out.exists():
        shutil.rmtree(out)
    subs: dict[str, tuple[str, dict[str, dict]]] = {}
    alice = runs["alice"]
    subs["alice"] = ("class", alice)
    for name in ("carol", "hank"):
        if name in runs:
            subs[name] = ("class", runs[name])
    subs["dan"] = ("class", {k: clear(v) for k, v in alice.items()})
    erin = runs.get("erin", alice)  # without their own runs, the doctored copies of alice's go to folders of their own
    subs["erin"] = ("class" if "erin" in runs else "solo-erin",
                    {k: edit_record(v, "awq", _smaller_awq) if k == "03_awq.ipynb" else v for k, v in erin.items()})
    frank = runs.get("frank", alice)
    old = next(r["values"]["reply"] for _, _, r in evidence.outputs(frank["06_playground.ipynb"])
               if r.get("step") == "playground")
    subs["frank"] = ("class" if "frank" in runs else "solo-frank",
                     {k: edit_record(v, "playground", _other_reply, (old, NEW_REPLY)) if k == "06_playground.ipynb"
                      else v for k, v in frank.items()})
    subs["gina"] = ("copied", {k: rehash(copy.deepcopy(v), student="gina") for k, v in alice.items()})
    if "ivan" in runs:
        subs["ivan"] = ("course", runs["ivan"])
    for student, (folder, nbs) in subs.items():
        data = {k: (json.dumps(shrink(v), indent=1, ensure_ascii=False) + "\n").encode() for k, v in nbs.items()}
        path = write_zip(data, student, out / folder)
        print(f"{path.relative_to(out.parent)}: {len(data)} notebooks, {path.stat().st_size / 1024:.0f} KiB")


def main() -> int:
    """Command line: `execute` or `pack`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("execute")
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("--students", nargs="*", default=list(RUNS))
    e.add_argument("--timeout", type=int, default=900)
    e.add_argument("--labs", nargs="*", help="only these labs (e.g. 00_setup 01_chat), to split a long run")
    k = sub.add_parser("pack")
    k.add_argument("--work", type=Path)
    k.add_argument("--from-zip", type=Path, help="executed-notebooks.zip of the GPU suite: used as alice's run")
    k.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "grading")
    args = p.parse_args()
    if args.cmd == "execute":
        execute(args.work, args.students, args.timeout, args.labs)
        return 0
    runs = {s: load_dir(args.work / s) for s in RUNS if args.work and (args.work / s).is_dir()}
    if args.from_zip:
        runs["alice"] = load_zip(args.from_zip)
    if "alice" not in runs:
        p.error("need alice's run: `execute` first, or --from-zip")
    pack(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
