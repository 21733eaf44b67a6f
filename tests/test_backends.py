"""Both engines: LABKIT_BACKEND for a lab run by hand, what TurboMind lacks said in one line, a model
TurboMind cannot run handed to the PyTorch engine with the reason, and scripts/gpu-suite.sh's
--backend option (it stops before anything runs where TurboMind's libraries are missing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import one_line
from labkit import backends, engine

ROOT = Path(__file__).resolve().parents[1]


def _fake_lmdeploy(root: Path, binary: bool) -> Path:
    """An lmdeploy package folder with or without a TurboMind binary (and no CUDA 12 libraries beside it)."""
    pkg = root / "lmdeploy"
    (pkg / "turbomind").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if binary:
        (pkg / "turbomind" / "_turbomind.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    return root


def _missing_in(site: Path) -> list[str]:
    code = "import json; from labkit.backends import turbomind_missing; print(json.dumps(turbomind_missing()))"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "LD_LIBRARY_PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_turbomind_missing_names_what_is_missing(tmp_path):
    assert _missing_in(_fake_lmdeploy(tmp_path / "a", binary=False))[0].startswith("lmdeploy/turbomind/_turbomind")
    missing = _missing_in(_fake_lmdeploy(tmp_path / "b", binary=True))
    if missing:  # a machine with CUDA 12 installed system-wide finds them; this one should not
        assert set(missing) <= set(backends.TURBOMIND_LIBS)
    assert backends.turbomind_missing() == []  # the real install here has its binary and libraries


def test_labkit_backend_variable(monkeypatch, tiny_dir):
    monkeypatch.setenv("LABKIT_BACKEND", "pytorch")
    assert backends.requested_backend("auto") == ("pytorch", "LABKIT_BACKEND")
    assert backends.requested_backend("turbomind") == ("turbomind", "asked for")  # an explicit choice wins
    assert backends.choose_backend(tiny_dir) == ("pytorch", "LABKIT_BACKEND")
    monkeypatch.setenv("LABKIT_BACKEND", "tm")
    with pytest.raises(engine.EngineError) as err:
        backends.requested_backend()
    assert "LABKIT_BACKEND='tm'" in one_line(err)
    monkeypatch.setenv("LABKIT_BACKEND", "auto")
    assert backends.requested_backend() == ("auto", "asked for")


def test_choices_are_logged_for_the_summary(monkeypatch, tmp_path, tiny_dir):
    log = tmp_path / "engines.jsonl"
    monkeypatch.setenv("LABKIT_ENGINE_LOG", str(log))
    monkeypatch.setenv("LABKIT_BACKEND", "pytorch")
    backends.choose_backend(tiny_dir)
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["backend"] == "pytorch" and entry["model"] == tiny_dir.name
    assert entry["test"] == "tests/test_backends.py"


def test_turbomind_without_gpu_is_one_line(tiny_dir):
    from labkit.gpu import gpus

    if gpus():
        pytest.skip("this machine has a GPU: the no-GPU refusal cannot be shown here")
    with pytest.raises(engine.EngineError) as err:
        backends.choose_backend(tiny_dir, "turbomind")
    assert "cannot run here: no GPU" in one_line(err)


@pytest.mark.gpu
def test_a_model_turbomind_cannot_run_gets_the_pytorch_engine(tmp_path, capsys):
    """A Mistral config (an architecture lmdeploy's PyTorch engine has and TurboMind has not): one line."""
    from transformers import MistralConfig

    if backends.turbomind_missing():
        pytest.skip(f"TurboMind cannot load here (missing {backends.turbomind_missing()}): nothing to fall back from")
    cfg = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1024)
    cfg.architectures = ["MistralForCausalLM"]
    cfg.save_pretrained(tmp_path)
    backend, why = backends.choose_backend(tmp_path, "turbomind")
    assert backend == "pytorch" and "TurboMind does not support" in why
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"TurboMind cannot run {tmp_path.name}:") and "PyTorch" in out[0]


def _suite(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-suite.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_suite_rejects_a_bad_backend_or_part():
    done = _suite("--backend", "vllm")
    assert done.returncode == 2 and "--backend takes turbomind, pytorch or auto, not 'vllm'" in done.stderr
    done = _suite("--backend", "pytorch", "--part", "6")
    assert done.returncode == 2 and "--part takes 1, 2, 3, 4 or 5, not '6'" in done.stderr


def test_suite_stops_in_one_line_where_turbomind_cannot_load(tmp_path):
    site = _fake_lmdeploy(tmp_path / "site", binary=False)
    py = Path(sys.executable).parent
    done = _suite("--backend", "turbomind", "--part", "1",
                  env={"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "PATH": f"{py}{os.pathsep}{os.environ['PATH']}",
                       "LABKIT_REPORT_DIR": str(tmp_path / "out")})
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    [line] = lines
    assert line.startswith("--backend turbomind: TurboMind cannot load here, missing lmdeploy/turbomind/_turbomind")
    assert "make turbomind-chunks" in line and "pytest" not in done.stdout  # nothing ran


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_bench_engines_refuses_in_one_line_without_a_gpu():
    from labkit.gpu import gpus

    if gpus():
        pytest.skip("this machine has a GPU: the no-GPU refusal cannot be shown here")
    done = _script("scripts/bench_engines.py", "--repeats", "1")
    assert done.returncode == 1 and done.stderr.strip() == \
        "error: the engine benchmark needs a CUDA GPU: found none; see 00_setup"
    done = _script("scripts/bench_engines.py", "--batches", "0")
    assert done.returncode == 1 and "batch_sizes must be whole numbers >= 1" in done.stderr


def test_bench_engines_section_replaces_an_earlier_run(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    for n in (1, 2):
        run = tmp_path / f"run{n}.md"
        run.write_text(f"<!-- bench_engines: begin -->\nrun {n}\n<!-- bench_engines: end -->\n")
        done = _script("scripts/bench_engines.py", "--from-file", str(run), "--append", str(doc))
        assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and "run 2" in text and "run 1" not in text


@pytest.mark.gpu
def test_bench_chat_skips_the_transformers_baseline_for_awq(tmp_path):
    """An AWQ folder: the baseline is skipped with a printed reason, LMDeploy is still measured."""
    from labkit import quant

    awq_dir = quant.awq("generated:tiny-chat", **quant.lab_settings())  # lab 03 made it already in the suite
    done = subprocess.run([sys.executable, "scripts/bench_chat.py", "--model", str(awq_dir), "--batches", "1",
                           "--new-tokens", "16", "--repeats", "1", "--cache-ratio", "0.05", "--no-overhead"],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformers baseline skipped: " in done.stdout and "AWQ model" in done.stdout


def test_labkit_engine_still_offers_the_backend_names():
    """Notebooks and older code call labkit.engine.choose_backend etc.: the same objects as labkit.backends'."""
    for name in ("BACKENDS", "check_backend", "requested_backend", "choose_backend", "turbomind_missing",
                 "TURBOMIND_LIBS", "TURBOMIND_HOWTO", "needs_remote_code", "check_architecture"):
        assert getattr(engine, name) is getattr(backends, name), name
    assert engine.EngineError is backends.EngineError
