"""labkit foundation: import cost, doctor, model resolution, generated models, evidence, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import evidence, generate, models
from labkit.models import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def test_import_labkit_is_light():
    code = ("import sys, time; t=time.perf_counter(); import labkit, labkit.config, labkit.gpu, labkit.models;"
            "dt=time.perf_counter()-t; print(dt, 'torch' in sys.modules, 'lmdeploy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5
    assert out[1:] == ["False", "False"], "import labkit must not import torch or lmdeploy"


def test_doctor_offline_is_fast_and_complete():
    from labkit.doctor import FAIL, OK, doctor
    from labkit.gpu import gpus

    start = time.perf_counter()
    report = doctor()
    assert time.perf_counter() - start < 5
    names = [r.check for r in report.rows]
    for needed in ("python", "gpu", "torch", "lmdeploy", "backend turbomind", "backend pytorch",
                   "disk labkit home", "hub Hugging Face", "hub ModelScope"):
        assert needed in names
    gpu_row = report.get("gpu")
    assert (gpu_row.status == FAIL) == (not gpus())
    assert report.get("lmdeploy").value == "0.18.0"
    for r in report.rows:  # every failed or warned check tells what to do
        if r.status != OK:
            assert r.fix, r


def test_doctor_cli_json():
    out = subprocess.run([sys.executable, "-m", "labkit.cli", "doctor", "--json", "--offline"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert {"ready", "rows", "seconds"} <= set(data)
    assert any(r["check"] == "gpu" for r in data["rows"])


def test_doctor_checks_the_hub_cache_downloads_go_to(tmp_path):
    """The doctor's disk row names huggingface_hub's own cache (it honours XDG_CACHE_HOME, for one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = ("import json; from labkit import doctor, models; r = doctor.doctor(check_hubs=False); "
            "print(json.dumps([str(models.hub_cache_dir()), r.get('disk hub cache').value]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cache, row = json.loads(out)
    assert cache == str(tmp_path / "huggingface" / "hub")
    assert row.endswith(f" at {cache}"), row


def test_doctor_lists_its_failures_and_how_to_fix_them(capsys):
    from labkit.doctor import FAIL, OK, Report, Row, verdict

    bad = Row("gpu", FAIL, "no NVIDIA GPU visible", "use a GPU machine")
    report = Report([Row("python", OK, "3.11"), bad])
    assert report.failures == [bad] and not report.ready
    assert verdict(report) is False
    out = capsys.readouterr().out
    assert "NOT READY" in out and "gpu: no NVIDIA GPU visible" in out and "fix: use a GPU machine" in out
    assert "python" not in out
    assert Report([Row("python", OK, "3.11")]).failures == []


def test_installed_versions():
    assert evidence.version("lmdeploy") == "0.18.0" == evidence.versions()["lmdeploy"]
    assert evidence.version("no-such-package-labkit") is None
    assert evidence.versions(("no-such-package-labkit",)) == {"no-such-package-labkit": None}


def test_resolve_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))


def test_resolve_folder_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_resolve_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weights"):
        models.resolve(str(tmp_path))


def test_resolve_unknown_name():
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        models.resolve("not-a-model")


def test_resolve_hub_id_offline_lists_every_place(monkeypatch, tmp_path):
    # No network in CI; point the hub at a closed local port so the download fails fast either way.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("LABKIT_SHARE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        models.resolve("internlm2_5-1_8b-chat")
    msg = str(err.value)
    assert "internlm2_5-1_8b-chat" in msg and "Hugging Face cache" in msg and "download" in msg
    assert "LABKIT_SHARE" in msg and "trained:tiny-chat" in msg


def test_resolve_falls_back_with_a_note(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    path = models.resolve("internlm2_5-1_8b-chat", fallback="generated:tiny-chat")
    assert path == generate.ensure("tiny-chat")
    assert "Using generated:tiny-chat instead" in capsys.readouterr().out


def test_resolve_finds_model_in_share(monkeypatch, tmp_path):
    src = generate.ensure("tiny-chat")
    share = tmp_path / "share"
    share.mkdir()
    os.symlink(src, share / "internlm2_5-1_8b-chat")
    monkeypatch.setenv("LABKIT_SHARE", str(share))
    assert models.resolve("internlm2_5-1_8b-chat", download=False) == src.resolve()


def test_generated_model_loads_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve("generated:tiny-chat")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert len(tok) == model.config.vocab_size == generate.SPECS["tiny-chat"].vocab
    assert model.config.hidden_size % 128 == 0 and model.config.intermediate_size % 128 == 0
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape[1] == ids.shape[1] + 8


def test_generated_model_is_deterministic(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = generate.ensure("tiny-chat")
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    second = generate.ensure("tiny-chat", quiet=True)
    assert first != second
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_generate_unknown_name():
    with pytest.raises(ModelNotFoundError, match="no generated model called 'huge'"):
        models.resolve("generated:huge")


def test_evidence_round_trip(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import labkit\nlabkit.setup('99_test')\n"
                                          "labkit.record('story', text='hello', tokens=3, speed=12.5)")]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)
    records = [r for r in evidence.read(path) if r["kind"] == "record"]  # after labkit.setup's "start" record
    assert len(records) == 1
    rec = records[0]
    assert rec["step"] == "story" and rec["notebook"] == "99_test"
    assert rec["values"] == {"text": "hello", "tokens": 3, "speed": 12.5}
    assert rec["environment"]["lmdeploy"] == "0.18.0"
    html = nb.cells[0].outputs[-1]["data"]["text/html"]
    assert "story" in html and "hello" in html


def test_evidence_rejects_empty_records():
    with pytest.raises(ValueError, match="at least one value"):
        evidence.record("nothing")


def test_gpu_magic_skips_visibly_without_cuda(tmp_path):
    """A %%gpu cell on a CPU machine prints one line and does not stop Run All."""
    import nbformat
    from nbclient import NotebookClient

    from labkit.gpu import has_cuda

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import labkit\nlabkit.setup('99_test')"),
                nbformat.v4.new_code_cell("%%gpu\nx = 41\nx + 1"),
                nbformat.v4.new_code_cell("print('after', globals().get('x'))")]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    gpu_out = nb.cells[1].outputs
    last = nb.cells[2].outputs[0]["text"]
    if has_cuda():
        assert gpu_out[0]["data"]["text/plain"] == "42" and "after 41" in last
    else:
        assert gpu_out[0]["text"].strip() == "skipped: this cell needs a CUDA GPU: found none; see 00_setup"
        assert "after None" in last


def test_notebooks_are_clean_and_gpu_cells_are_declared():
    """Committed notebooks carry no outputs; a cell is tagged `gpu` exactly when it starts with %%gpu."""
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs, "no notebooks found"
    for path in nbs:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name} cell {i} has outputs"
            tagged = "gpu" in cell["metadata"].get("tags", [])
            assert tagged == src.startswith("%%gpu"), f"{path.name} cell {i}: gpu tag and %%gpu must go together"
        first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
        assert f'labkit.setup("{path.stem}")' in first, f"{path.name} must start with labkit.setup"


def test_kvcache_input_checks():
    from labkit import kvcache

    for bad in (0, -0.1, 1.5, "0.4"):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            kvcache.check_ratio(bad)
    with pytest.raises(ValueError, match="quant_policy must be one of"):
        kvcache.check_policy(2)
    shape = kvcache.ModelShape.from_dir(generate.ensure("tiny-chat"))
    assert kvcache.bytes_per_token(shape, 8) < kvcache.bytes_per_token(shape, 0) / 1.8
    assert kvcache.bytes_per_token(shape, 4) < kvcache.bytes_per_token(shape, 8)


def test_doctor_does_not_wait_for_a_hub_that_never_answers(monkeypatch):
    """A hub that accepts the connection and then says nothing costs at most the probe timeout."""
    import socket

    from labkit.doctor import WARN, doctor

    with socket.socket() as deaf:
        deaf.bind(("127.0.0.1", 0))
        deaf.listen(8)  # never accepts, never answers
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{deaf.getsockname()[1]}")
        start = time.perf_counter()
        report = doctor()
        took = time.perf_counter() - start
    row = report.get("hub Hugging Face")
    assert row.status == WARN and "no answer" in row.value, row
    assert took < 5, f"doctor took {took:.1f} s"
