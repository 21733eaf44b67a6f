"""Decisions come from the model folder that `resolve` returned, not from the name asked for: the
tool-call parser, whether lab 02 forces tool calls, remote code for the api_server. Lab 02's own set-up
cell, run with the InternLM2-shaped model, picks InternLM's parser."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import generate, serve, tools
from labkit.models import resolve

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]):
    """lmdeploy 0.18's own CLI parser applied to an api_server command line (nothing runs)."""
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.serve import SubCliServe

    if "api_server" not in SubCliServe.subparsers.choices:
        SubCliServe.add_parser_api_server()
    return CLI.parser.parse_args(argv[1:])


def test_course_name_that_fell_back_to_tiny_chat_gets_the_qwen_parser(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub: the course model cannot come
    monkeypatch.setenv("LABKIT_SHARE", str(tmp_path))
    model = "internlm2_5-1_8b-chat"
    folder = resolve(model, fallback="generated:tiny-chat")
    assert "Using generated:tiny-chat instead" in capsys.readouterr().out
    assert tools.parser_for(model, folder) == "qwen"      # the name alone would say 'internlm'
    assert tools.parser_for(model) == "internlm"          # without a folder: the catalogue's
    assert tools.forced_for(folder)                       # random weights: lab 02 forces the calls


def test_internlm2_shaped_folder_gets_the_internlm_parser():
    folder = resolve("generated:tiny-internlm2")
    assert tools.parser_for("generated:tiny-internlm2", folder) == "internlm" == tools.parser_for(folder)
    assert tools.forced_for(folder)


def test_a_folder_labkit_did_not_generate_is_not_forced(tmp_path):
    real = shutil.copytree(resolve("generated:tiny-internlm2"), tmp_path / "internlm2_5-1_8b-chat")
    (real / generate.MARKER).unlink()
    assert generate.info(real) is None and not tools.forced_for(real)
    assert tools.parser_for("generated:tiny-chat", real) == "internlm"  # the folder wins over the name
    cfg = json.loads((real / "config.json").read_text())
    cfg["architectures"] = ["SomethingElse"]
    (real / "config.json").write_text(json.dumps(cfg))
    assert tools.parser_for("internlm2_5-1_8b-chat", real) is None  # unknown architecture: no guess from the name


def test_api_server_trusts_remote_code_where_the_folder_needs_it(tiny_dir):
    tlm = resolve("generated:tiny-internlm2")
    args = _parse(serve.api_server_args(tlm, host="127.0.0.1", port=23333, backend="turbomind", model_name="m",
                                        tool_call_parser=tools.parser_for(tlm)))
    assert args.trust_remote_code and args.tool_call_parser == "internlm" and args.backend == "turbomind"
    args = _parse(serve.api_server_args(tiny_dir, host="127.0.0.1", port=23333, backend="pytorch", model_name="m"))
    assert not args.trust_remote_code  # tiny-chat ships no code: nothing to trust


def _run_cells(notebook: str, indices: list[int], env: dict) -> str:
    """Run some code cells of a notebook, as they are, in a fresh Python; their output."""
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    code = "\n".join("".join(cells[i]["source"]) for i in indices)
    assert "%%" not in code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("model,parser", [("generated:tiny-internlm2", "internlm"), ("generated:tiny-chat", "qwen")])
def test_lab02_setup_cell_picks_the_parser_of_its_model(model, parser):
    cells = json.loads((ROOT / "notebooks" / "02_serving.ipynb").read_text())["cells"]
    setup = [i for i, c in enumerate(cells) if "TOOL_PARSER =" in "".join(c["source"])]
    out = _run_cells("02_serving.ipynb", [1, *setup], {"LABKIT_MODEL": model})
    assert out.strip().splitlines()[-1].endswith(f"| tool-call parser: {parser}")


def test_a_lab_can_have_its_own_model(monkeypatch):
    """LABKIT_MODEL_<NN> picks the model of lab NN only (the GPU suite runs labs 01 and 02 on tiny-internlm2)."""
    from labkit import evidence, models

    monkeypatch.setenv("LABKIT_MODEL", "generated:tiny-chat")
    monkeypatch.setenv("LABKIT_MODEL_02", "generated:tiny-internlm2")
    before = evidence._context.get("notebook")
    try:
        evidence.set_notebook("02_serving")
        assert models.default("chat") == "generated:tiny-internlm2"
        assert models.default("vision") != "generated:tiny-internlm2"
        evidence.set_notebook("03_awq")
        assert models.default("chat") == "generated:tiny-chat"
    finally:
        evidence.set_notebook(before)
