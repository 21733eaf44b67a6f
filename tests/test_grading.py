"""Instructor grading: evidence records, `labkit submit`, `labkit grade` on fixture submissions made by really
executing the labs on CPU (tests/data/grading/, made by scripts/make_grading_fixtures.py), exports, --rerun.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import one_line
from labkit import evidence, grade, integrity, rubric

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "grading"
CPU_RUBRIC = REPO / "grading" / "rubric-cpu.toml"
COURSE_RUBRIC = REPO / "grading" / "rubric.toml"

_spec = importlib.util.spec_from_file_location("fixtures", REPO / "scripts" / "make_grading_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LABKIT_STUDENT", raising=False)


def _grades(folder, rubric_path=CPU_RUBRIC, **kw) -> dict[str, grade.Grade]:
    return {g.student: g for g in grade.grade(folder, rubric_path, **kw)}


def _notebooks(zip_path: Path) -> dict[str, dict]:
    with zipfile.ZipFile(zip_path) as zf:
        return {Path(n).name: json.loads(zf.read(n)) for n in zf.namelist() if n.endswith(".ipynb")}


def _unpack(zip_path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, nb in _notebooks(zip_path).items():
        (folder / name).write_text(json.dumps(nb), encoding="utf-8")
    return folder


def _run(notebook_cells: list[str], path: Path, student: str) -> dict:
    """Execute a small notebook for real (nbclient, a fresh kernel) as `student`; cells may raise."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in notebook_cells]
    old = os.environ.get("LABKIT_STUDENT")
    os.environ["LABKIT_STUDENT"] = student
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    finally:
        os.environ.pop("LABKIT_STUDENT") if old is None else os.environ.__setitem__("LABKIT_STUDENT", old)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return json.loads(json.dumps(nb))  # sources as single strings, as nbformat.read gives them


# ----------------------------------------------------------------------------- the fixture class

def test_fixture_verdicts():
    """Every fixture submission gets its verdict, for the reason it was made."""
    g = _grades(DATA / "class")
    assert g["alice"].verdict == "complete" and g["alice"].total == rubric.load(CPU_RUBRIC).max_points
    assert g["carol"].verdict == "partial" and g["carol"].flags() == []
    passed = {r.item.id for r in g["carol"].items if r.status == "passed"}
    assert passed == {"setup", "kv_checks", "kv_prediction"}
    assert all(r.status == "missing" for r in g["carol"].items if r.item.id not in passed)
    assert g["dan"].verdict == "flagged" and g["dan"].flags() == ["cleared"] and g["dan"].total == 0
    assert g["erin"].flags() == ["inconsistent", "tampered"]
    erin_awq = next(r for r in g["erin"].items if r.item.id == "awq_size")
    assert erin_awq.status == "flagged" and "changed after it ran" in erin_awq.text
    assert g["frank"].flags() == ["tampered"]
    texts = [f.text for f in g["frank"].findings["06_playground"]]
    assert any("changed after it ran" in t for t in texts) and any("edited output" in t for t in texts)
    assert g["hank"].flags() == ["raised"]
    assert any("LabCheckFailed" in f.text for f in g["hank"].findings["05_vision"])
    hank_checks = [r for r in g["hank"].records["05_vision"] if r["kind"] == "check"]
    assert hank_checks[-1]["values"]["passed"] is False  # the failed check was recorded before it raised
    for student in ("erin", "frank", "hank"):  # the labs they did not touch still count
        assert next(r for r in g[student].items if r.item.id == "setup").status == "passed"


def test_copied_submission_is_flagged_for_both(tmp_path):
    folder = tmp_path / "subs"
    folder.mkdir()
    for zp in (DATA / "class" / "submission-alice.zip", DATA / "copied" / "submission-gina.zip"):
        shutil.copy(zp, folder)
    g = _grades(folder)
    for student, other in (("alice", "gina"), ("gina", "alice")):
        assert g[student].flags() == ["shared"] and g[student].total == 0
        assert any(f"kernel session" in f.text and other in f.text for f in g[student].findings["submission"])
    # re-hashed: only the sharing shows
    assert not any(f.kind == "tampered" for fs in g["gina"].findings.values() for f in fs)


def test_generated_model_run_against_the_course_rubric():
    g = _grades(DATA / "course", COURSE_RUBRIC)["ivan"]
    assert "generated" in g.flags() and g.total == 0
    assert any("generated model" in f.text for f in g.findings["04_kv_cache"])
    # the same run passes the CPU rubric's items for those labs
    cpu = _grades(DATA / "course", CPU_RUBRIC)["ivan"]
    assert cpu.flags() == [] and next(r for r in cpu.items if r.item.id == "kv_prediction").status == "passed"


# ----------------------------------------------------------------------------- exports

def test_exports_csv_gradescope_report(tmp_path):
    import pandas as pd
    from jsonschema import validate

    out = tmp_path / "grades"
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "grade", str(DATA / "class"), "--rubric", str(CPU_RUBRIC),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "alice" in r.stdout and "complete" in r.stdout
    df = pd.read_csv(out / "grades.csv")
    items = [i.id for i in rubric.load(CPU_RUBRIC).items]
    assert list(df.columns) == ["student"] + items + ["total", "max", "verdict", "flags"]
    assert sorted(df["student"]) == ["alice", "carol", "dan", "erin", "frank", "hank"]
    assert (df[items].sum(axis=1) == df["total"]).all()
    assert df.set_index("student").loc["alice", "total"] == df["max"].iloc[0]
    schema = {  # the fields Gradescope's autograder specification documents for results.json
        "type": "object", "required": ["tests"],
        "properties": {"score": {"type": "number"}, "output": {"type": "string"},
                       "visibility": {"enum": ["hidden", "after_due_date", "after_published", "visible"]},
                       "stdout_visibility": {"enum": ["hidden", "after_due_date", "after_published", "visible"]},
                       "tests": {"type": "array", "items": {
                           "type": "object", "required": ["score", "max_score", "name", "status"],
                           "properties": {"score": {"type": "number"}, "max_score": {"type": "number"},
                                          "name": {"type": "string"}, "number": {"type": "string"},
                                          "status": {"enum": ["passed", "failed"]}, "output": {"type": "string"},
                                          "tags": {"type": "array", "items": {"type": "string"}},
                                          "visibility": {"enum": ["hidden", "after_due_date", "after_published",
                                                                  "visible"]}}}}}}
    for student in df["student"]:
        res = json.loads((out / "gradescope" / student / "results.json").read_text())
        validate(res, schema)
        assert res["score"] == sum(t["score"] for t in res["tests"]) == df.set_index("student").loc[student, "total"]
    with pytest.raises(Exception):
        validate({"tests": [{"name": "x", "score": 1, "max_score": 1, "status": "ok"}]}, schema)
    page = (out / "report.html").read_text()
    assert page.count("<img alt='plot' src='data:image/png;base64,") == 5
    assert "src='http" not in page and "<script" not in page
    for text in ("alice: complete", "dan: flagged", "outputs cleared", "was changed after it ran", "raised in"):
        assert text in page


# ----------------------------------------------------------------------------- evidence records

def test_records_chain_and_verify(tmp_path):
    nb = _run(["import labkit\nlabkit.setup('98_calc')",
               "labkit.record('calc', total=sum(range(10)), text='hello', characters=5)\n"
               "labkit.check('adds', True, 'ok')",
               "labkit.check('fails', 1 == 2, 'one is not two', fix='none')", "print('after')"],
              tmp_path / "98_calc.ipynb", "stud1")
    recs = [r for _, _, r in evidence.outputs(nb)]
    assert [(r["kind"], r["seq"]) for r in recs] == [("start", 1), ("record", 2), ("check", 3), ("check", 4)]
    assert recs[0]["values"] == {"lab": "98_calc", "profile": "test"} and recs[0]["execution_count"] == 1
    assert recs[3]["values"] == {"what": "fails", "passed": False, "detail": "one is not two", "fix": "none"}
    assert recs[0]["prev_sha256"] is None and recs[2]["prev_sha256"] == recs[1]["sha256"] == evidence.digest(recs[1])
    assert {r["student"] for r in recs} == {"stud1"} and len({r["session"] for r in recs}) == 1
    assert recs[0]["environment"]["gpu"] is None and recs[0]["environment"]["gpu_uuid"] is None  # CPU here
    assert recs[2]["execution_count"] == 2 and recs[2]["cell_sha256"] == evidence.sha256_text(nb["cells"][1]["source"])
    assert integrity.verify(nb, "98_calc.ipynb", "stud1") == []
    assert integrity.errors(nb) == ["cell 3: LabCheckFailed: FAILED: fails (one is not two)"]

    def kinds(doc, student="stud1"):
        return sorted({f.kind for f in integrity.verify(doc, "98_calc.ipynb", student)})

    edited = copy.deepcopy(nb)
    edited["cells"][1]["source"] = edited["cells"][1]["source"].replace("range(10)", "range(99)")
    assert kinds(edited) == ["tampered"]
    shown = copy.deepcopy(nb)
    shown["cells"][1]["outputs"][0]["data"]["text/plain"] = "evidence: calc\n  total  999"
    assert kinds(shown) == ["tampered"]
    dropped = copy.deepcopy(nb)
    del dropped["cells"][1]["outputs"][1]
    assert kinds(dropped) == ["chain"]
    assert kinds(nb, "someone-else") == ["student"]
    assert kinds(nb) == [] and integrity.order_problem(nb) is None
    other = copy.deepcopy(nb)
    other["cells"][0]["execution_count"] = 5
    assert "cell 1 was run as [5], expected [1]" in integrity.order_problem(other)


def test_student_id_and_missing_file(tmp_path, monkeypatch):
    assert evidence.student_id() is None
    path = evidence.set_student_id("s.one@uni")
    assert path == tmp_path / "config" / "labkit" / "student.json" and evidence.student_id() == "s.one@uni"
    monkeypatch.setenv("LABKIT_STUDENT", "env-id")
    assert evidence.student_id() == "env-id"
    with pytest.raises(evidence.EvidenceError) as err:
        evidence.set_student_id("no spaces please")
    assert "not usable" in one_line(err)
    with pytest.raises(evidence.EvidenceError) as err:
        evidence.read(tmp_path / "nothing.ipynb")
    assert "no notebook at" in one_line(err)


def test_forged_records_that_contradict_are_flagged():
    """A student who recomputes the hashes passes the hash checks, but not the contradiction checks."""
    alice = _notebooks(DATA / "class" / "submission-alice.zip")
    ints = rubric.load(COURSE_RUBRIC).integrity

    def forged(name, step, edit, **env):
        nb = copy.deepcopy(alice[name])
        for _, _, rec in evidence.outputs(nb):
            if rec.get("step") == step:
                edit(rec["values"])
                rec["environment"].update(env)
        nb = fixtures.rehash(nb)
        assert integrity.verify(nb, name, "alice") == [] or all(
            f.kind == "tampered" and "text shown" in f.text for f in integrity.verify(nb, name, "alice"))
        from labkit.crosscheck import contradictions

        return [f.text for f in contradictions([r for _, _, r in evidence.outputs(nb)], ints)]

    def bigger(v):
        v["sizes"][1]["MiB on disk"] = v["sizes"][0]["MiB on disk"] * 2

    texts = forged("03_awq.ipynb", "awq", bigger)
    assert any("larger on disk" in t for t in texts) and any("its check saw" in t for t in texts)
    texts = forged("01_chat.ipynb", "baseline", lambda v: v.update(model="internlm2_5-1_8b-chat",
                                                                    reply_tokens_per_s=9000.0), gpu="NVIDIA H200")
    assert any("beyond the memory-bandwidth roofline" in t for t in texts)
    texts = forged("06_playground.ipynb", "playground", lambda v: v.update(text="a short story", characters=300))
    assert any("says 300 characters, its text has 13" in t for t in texts)
    assert forged("04_kv_cache.ipynb", "kv-cache-prediction", lambda v: v.update(note="x")) == []


def test_more_gpu_memory_after_awq_contradicts_only_a_model_whose_weights_shrank():
    """A 1.5 MiB model on the PyTorch engine really needs more GPU memory after AWQ (the kernels' buffers, measured);
    a 3 GB model whose weights shrank to 1.1 GB cannot."""
    from labkit.crosscheck import contradictions

    def run(disk_before, disk_after, gpu_before, gpu_after):
        records = [{"kind": "record", "step": "awq", "values": {"sizes": [{"MiB on disk": disk_before},
                                                                          {"MiB on disk": disk_after}]}},
                   {"kind": "record", "step": "awq-gpu", "values": {"table": [
                       {"weights + runtime GiB": gpu_before}, {"weights + runtime GiB": gpu_after}]}}]
        return [f.text for f in contradictions(records, {})]

    assert run(1.533, 0.635, 0.283, 0.41) == []  # the GPU suite's lab 03 on the PyTorch engine, 2026-12-01
    assert any("needs more GPU memory" in t for t in run(2950, 1100, 3.54, 3.9))
    assert run(2950, 1100, 3.54, 1.54) == []


def test_the_gpu_suites_tools_item_credits_16_by_the_model_alone_and_nothing_less():
    """rubric-gpu-suite.toml's function-calling item on lab 02's record as the GPU run of 2026-12-01 wrote it
    (trained:tiny-internlm2-chat: add, mul, 16, no forcing), then with each thing wrong."""
    items = {i.id: i for i in rubric.load(REPO / "grading" / "rubric-gpu-suite.toml").items}
    tools_item = items["tools"]
    good = {"result": 16, "forced": False, "answer": "The answer is 16.",
            "transcript": [{"who": "user", "what": "asks"}, {"who": "assistant", "what": "calls add"},
                           {"who": "tool", "what": "add returns"}, {"who": "assistant", "what": "calls mul"},
                           {"who": "tool", "what": "mul returns"}, {"who": "assistant", "what": "answers"}]}

    def failed(values):
        return [text for ok, text in (c.evaluate(values) for c in tools_item.conditions) if not ok]

    assert failed(good) == []
    for wrong, says in (({"result": 21}, "result = 21"), ({"forced": True}, "forced"), ({"answer": ""}, "answer"),
                        ({"transcript": good["transcript"][:3]}, "transcript")):
        got = failed({**good, **wrong})
        assert len(got) == 1 and got[0].startswith(says), (wrong, got)


# ----------------------------------------------------------------------------- labkit submit

def test_submit_cli(tmp_path):
    alice = _unpack(DATA / "class" / "submission-alice.zip", tmp_path / "alice")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    cmd = [sys.executable, "-m", "labkit.cli", "submit", str(alice), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "labkit submit --student" in r.stderr
    r = subprocess.run(cmd + ["--student", "alice", "--rubric", str(CPU_RUBRIC)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "out" / "submission-alice.zip") as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("evidence.json"))
    assert sorted(names) == ["evidence.json"] + [f"notebooks/{n}.ipynb" for n in fixtures.ALL]
    assert manifest["student"] == "alice" and len(manifest["notebooks"]["03_awq.ipynb"]["records"]) == 6
    assert _grades(tmp_path / "out")["alice"].verdict == "complete"
    # the course rubric asks for the course model: every notebook (each ran on generated:tiny-chat) is refused
    r = subprocess.run(cmd + ["--out", str(tmp_path / "out2")], capture_output=True, text=True, env=env, timeout=120)
    refused = [ln for ln in r.stderr.splitlines() if ln.startswith("refused ")]
    assert r.returncode == 1 and len(refused) == 7 and all("generated model" in ln for ln in refused)
    # a notebook that stopped at an error was not run top to bottom
    hank = _unpack(DATA / "class" / "submission-hank.zip", tmp_path / "hank")
    r = subprocess.run([sys.executable, "-m", "labkit.cli", "submit", str(hank), "--student", "hank", "--rubric",
                        str(CPU_RUBRIC), "--out", str(tmp_path / "out3")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "refused 05_vision: cell 50 was not run" in r.stderr and "1 notebook(s)" in r.stdout


# ----------------------------------------------------------------------------- rubric and rerun

def test_rubric_errors_and_paths(tmp_path):
    with pytest.raises(rubric.RubricError) as err:
        rubric.load(tmp_path / "none.toml")
    assert "no rubric at" in one_line(err)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[items]]\nid = "x"\nnotebook = "01_chat"\npoints = 1\n')
    with pytest.raises(rubric.RubricError) as err:
        rubric.load(bad)
    assert "needs `step = ...`" in one_line(err)
    bad.write_text('[[items]]\nid = "x"\nnotebook = "01_chat"\nstep = "s"\npoints = 1\n'
                   'conditions = [ { value = "a", atleast = 3 } ]\n')
    with pytest.raises(rubric.RubricError) as err:
        rubric.load(bad)
    assert "unknown condition key" in one_line(err)
    values = {"runs": [{"ratio": 0.8, "kv": 2.0}, {"ratio": 0.4, "kv": 1.0}],
              "transcript": [{"what": "calls add"}, {"what": "add returns"}, {"what": "calls mul"}]}
    assert rubric.get(values, "runs[ratio=0.4].kv") == 1.0 and rubric.get(values, "runs[-1].ratio") == 0.4
    assert len(rubric.get(values, "transcript[what^=calls ]")) == 2
    assert rubric.get(values, "runs[ratio=0.1].kv") is rubric.MISSING
    cond = rubric.Condition(None, ("runs[ratio=0.4].kv", "runs[ratio=0.8].kv"), {"min": 0.4, "max": 0.6})
    assert cond.evaluate(values) == (True, "runs[ratio=0.4].kv / runs[ratio=0.8].kv = 0.5")
    assert cond.evaluate({"runs": [{"ratio": 0.8, "kv": 2.0}, {"ratio": 0.4, "kv": 1.9}]})[0] is False


def test_rerun_compares_figures(tmp_path):
    """--rerun executes the handed-out notebook here and catches a forged figure that kept its hashes valid."""
    handout = tmp_path / "handout"
    cells = ["import labkit\nlabkit.setup('97_calc')", "labkit.record('calc', total=sum(range(1000)), note='n')"]
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    handout.mkdir()
    nbformat.write(nb, handout / "97_calc.ipynb")
    subs = tmp_path / "subs"
    from labkit.submit import write_zip

    for student in ("honest", "forger"):
        run = _run(cells, tmp_path / student / "97_calc.ipynb", student)
        if student == "forger":
            for _, _, rec in evidence.outputs(run):
                rec["values"]["total"] = 123
            run = fixtures.rehash(run)
        write_zip({"97_calc.ipynb": json.dumps(run).encode()}, student, subs)
    rub = tmp_path / "r.toml"
    rub.write_text('[rerun]\nfigures = [ { step = "calc", value = "total", tolerance = 0.0 } ]\n'
                   '[[items]]\nid = "calc"\nnotebook = "97_calc"\nstep = "calc"\npoints = 1\n'
                   'conditions = [ { value = "total", min = 1 } ]\n')
    before = _grades(subs, rub)
    assert before["forger"].total == 1 and before["honest"].total == 1  # the forgery passes the static checks
    after = _grades(subs, rub, rerun=2, seed=0, handout=handout, out=tmp_path / "g")
    assert after["honest"].rerun == ["agrees: calc.total: student 4.995e+05, re-run 4.995e+05 (0.0% apart, allowed 0%)"]
    assert after["forger"].rerun[0].startswith("DIFFERS: calc.total: student 123, re-run 4.995e+05")
    assert after["forger"].total == 0 and after["forger"].flags() == ["inconsistent"] and after["honest"].total == 1
    assert "Re-run on the instructor" in (tmp_path / "g" / "report.html").read_text()


def test_shipped_rubrics_read_steps_the_labs_record():
    """Every record item of the shipped rubrics names a step that its lab's notebook records today."""
    import re

    recorded = {}
    for nb_path in (REPO / "notebooks").glob("*.ipynb"):
        src = "".join("".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"])
        recorded[nb_path.stem] = set(re.findall(r"labkit\.record\(\s*\"([^\"]+)\"", src))
    for path in sorted((REPO / "grading").glob("*.toml")):
        rub = rubric.load(path)
        for item in rub.items:
            assert item.notebook in recorded, (path.name, item.id)
            if item.kind == "record":
                assert item.step in recorded[item.notebook], (path.name, item.id, item.step)
        for fig in rub.rerun:
            assert any(fig["step"] in steps for steps in recorded.values()), (path.name, fig)
    assert rubric.load(COURSE_RUBRIC).require_course_model and rubric.load(COURSE_RUBRIC).max_points == 100


def test_fixture_script_refuses_notebooks_without_execution_counts(tmp_path):
    zp = tmp_path / "executed-notebooks.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        zf.write(REPO / "notebooks" / "00_setup.ipynb", "notebooks/00_setup.ipynb")  # committed clean: no counts
    with pytest.raises(SystemExit, match="carry no execution counts"):
        fixtures.load_zip(zp)


def test_sharing_by_times_figures_and_gpu():
    from labkit.crosscheck import shared

    def recs(zip_name, folder="class"):
        return [r for nb in _notebooks(DATA / folder / zip_name).values() for _, _, r in evidence.outputs(nb)]

    alice, erin = recs("submission-alice.zip"), recs("submission-erin.zip")
    ints = rubric.load(CPU_RUBRIC).integrity
    assert shared({"alice": alice, "erin": erin}, ints) == {"alice": [], "erin": []}  # two honest runs
    renamed = copy.deepcopy(alice)
    for r in renamed:
        r["session"] = "f" * 32  # a copier who also rewrote the session ids: the microsecond times remain
    said = shared({"alice": alice, "gina": renamed}, ints)
    assert [f.kind for f in said["gina"]] == ["shared", "shared"]  # the times, and the measured figures
    assert "same step and time" in said["gina"][0].text and "identical measured figures" in said["gina"][1].text
    same = copy.deepcopy(erin)
    awq = next(r for r in same if r.get("step") == "awq")
    mine = next(r for r in alice if r.get("step") == "awq")["values"]
    awq["values"]["quantize_seconds"], awq["values"]["agreement"]["seconds"] = (mine["quantize_seconds"],
                                                                                 mine["agreement"]["seconds"])
    said = shared({"alice": alice, "erin": same}, ints)
    assert "identical measured figures (awq.agreement.seconds, awq.quantize_seconds)" in said["erin"][0].text
    for r in alice + erin:
        r["environment"]["gpu_uuid"] = "GPU-1234"
    assert [f.kind for f in shared({"alice": alice, "erin": erin}, ints)["erin"]] == ["shared"]
    warn_only = {**ints, "shared_gpu_uuid": "warn"}
    assert [f.kind for f in shared({"alice": alice, "erin": erin}, warn_only)["erin"]] == ["warn"]


def test_student_folders_and_a_single_submission_folder(tmp_path):
    """Per-student folders of .ipynb files grade like zips; a folder of .ipynb files is one submission
    (the shape Gradescope's autograder gets in /autograder/submission)."""
    alice = _unpack(DATA / "class" / "submission-alice.zip", tmp_path / "subs" / "alice")
    _unpack(DATA / "class" / "submission-carol.zip", tmp_path / "subs" / "carol")
    g = _grades(tmp_path / "subs")
    assert (g["alice"].verdict, g["carol"].verdict) == ("complete", "partial")
    assert list(_grades(alice)) == ["alice"] and _grades(alice)["alice"].verdict == "complete"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "submission-x.zip").write_bytes(b"not a zip")
    assert _grades(broken)["x"].flags() == ["tampered"]
    with pytest.raises(grade.GradeError) as err:
        grade.load_submissions(tmp_path / "empty-none")
    assert "is not a folder" in one_line(err)


@pytest.mark.gpu
def test_records_carry_the_gpu_name_and_uuid(tmp_path):
    """On a GPU machine every record names the GPU and its NVML UUID (None on CPU, checked above)."""
    from labkit.gpu import gpus

    nb = _run(["import labkit\nlabkit.setup('96_gpu')", "labkit.check('runs', True)"], tmp_path / "96_gpu.ipynb", "g1")
    envs = [r["environment"] for _, _, r in evidence.outputs(nb)]
    assert len(envs) == 2 and all(e["gpu"] == gpus()[0].name for e in envs)
    assert all(str(e["gpu_uuid"]).startswith(("GPU-", "MIG-")) for e in envs)
