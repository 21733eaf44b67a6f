"""labkit.commands: the course's commands then and now. Every current form runs (lmdeploy's own parser, its
config objects, its chat templates); every old form that fails here fails in the real `lmdeploy` command too,
with the same error; docs/commands.md is what the table says."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import commands

ROOT = Path(__file__).resolve().parents[1]
FAILING = [r for r in commands.ROWS if r.today.startswith("fails")]


def test_at_least_15_old_forms_have_a_new_one():
    changed = [r for r in commands.ROWS if r.then != r.now and r.then != "(none)"]
    assert len(changed) >= 15, len(changed)
    assert all(r.changed and r.test for r in commands.ROWS)


@pytest.mark.parametrize("row", commands.ROWS, ids=[r.topic for r in commands.ROWS])
def test_every_row_runs(row, tiny_dir):
    """The current form runs on lmdeploy 0.18; the old one fails exactly where the table says it does."""
    now = commands.run(row.now, tiny_dir)
    assert now.ok, (row.now, now.said)
    then = commands.run(row.then, tiny_dir)
    assert then.ok == (not row.today.startswith("fails")), (row.then, then.said)


def _lmdeploy_argv(command: str) -> list[str]:
    argv = shlex.split(command.replace(commands.M, "/tmp/no-model"))
    if shutil.which("lmdeploy") is None:
        return [sys.executable, "-m", "lmdeploy", *argv[1:]]
    return argv


def test_old_commands_fail_in_the_real_lmdeploy_command_with_the_same_error():
    """Failing `lmdeploy ...` lines run as a student would run them: a removed command, a removed sub-command, a
    refused choice and a refused value (each costs ~3 s of imports; the in-process parser is the same code)."""
    rows = [r for r in FAILING if r.topic in ("offline conversion", "command-line client", "AWQ calibration data",
                                              "AWQ scale search")]
    assert len(rows) == 4
    procs = {r.topic: subprocess.Popen(_lmdeploy_argv(r.then), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")) for r in rows}
    try:
        for row in rows:
            out, err = procs[row.topic].communicate(timeout=240)
            last = [line for line in err.strip().splitlines() if line.strip()][-1]
            assert procs[row.topic].returncode == 2, (row.then, err[-400:])
            inproc = commands.run(row.then.replace(commands.M, "/tmp/no-model"))
            assert last == inproc.said, (row.then, last, inproc.said)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_changed_meanings_are_shown_on_what_lmdeploy_builds(tiny_dir):
    """The old forms that still run but do something else: the prompt lmdeploy builds, the flags it parses."""
    from lmdeploy import ChatTemplateConfig

    hi = commands.HI
    assert commands.render(hi, tiny_dir) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert commands.render(hi, tiny_dir, ChatTemplateConfig(model_name="internlm2")) == "Hi"  # no template at all
    pirate = [{"role": "system", "content": "You are a pirate."}] + hi
    assert commands.render(pirate, tiny_dir).startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    _, args = commands.parse("lmdeploy serve api_server m --quant-policy 4")
    from labkit.kvcache import QUANT_POLICIES
    assert args.quant_policy == 4 and QUANT_POLICIES[4] == "int4 KV"
    _, args = commands.parse("lmdeploy lite auto_awq m --search-scale")
    assert args.search_scale is True
    tool = commands.run("{'role': 'tool', 'tool_call_id': 'call_1', 'content': '8'}", tiny_dir).said
    env = commands.run("{'role': 'environment', 'name': 'plugin', 'content': '8'}", tiny_dir).said
    assert r"<tool_response>\n8\n</tool_response>" in tool and r"<|im_start|>environment\n8" in env


def test_a_bad_form_fails_with_lmdeploys_own_error(tmp_path):
    """The runner can fail: a wrong flag, a refused config, a command that is not lmdeploy's."""
    (tmp_path / "config.json").write_text("{}")  # a folder with no tokenizer: the form builds, its prompt cannot
    shown = commands.run("ChatTemplateConfig(model_name='hf', model_path='{model}')", tmp_path)
    assert shown.ok and "prompt not shown" in shown.said
    bad = commands.run("lmdeploy chat m --no-such-flag")
    assert not bad.ok and "unrecognized arguments: --no-such-flag" in bad.said
    fp8 = commands.run("TurbomindEngineConfig(quant_policy=16)")
    assert not fp8.ok and "FP8 quantization is not supported" in fp8.said
    assert not commands.run("pip install lmdeploy[nosuchextra]").ok
    with pytest.raises(ValueError, match="not an lmdeploy command line"):
        commands.parse("vllm serve m")
    # a row claiming the wrong outcome is caught by test_every_row_runs' comparison:
    wrong = commands.Row("x", "lmdeploy convert a b", "lmdeploy chat m", "v0", "works")
    assert commands.run(wrong.then).ok != (not wrong.today.startswith("fails"))


def test_docs_commands_md_is_current():
    text = (ROOT / "docs" / "commands.md").read_text()
    assert text == commands.docs(), "regenerate: python -m labkit.commands > docs/commands.md"
    assert text.count("\n| ") >= 16 and "FAILS: lmdeploy" in text


def test_template_table_shows_what_each_choice_does_to_the_prompt(tiny_dir):
    table = commands.template_table(tiny_dir, "Who are you?", "You are a pirate.").set_index("chat template")
    prompts = table["prompt lmdeploy builds"].tolist()
    default, system, old, old_meta, custom = prompts
    assert default.startswith("<|im_start|>user\nWho are you?") and old == "Who are you?"
    assert old_meta == "You are a pirate.Who are you?"  # the 2024 system prompt, with no template around it
    assert system == custom and system.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>\n")


def test_chat_commands_for_each_backend(tiny_dir, capsys):
    from labkit.gpu import has_cuda

    table = commands.chat_commands(tiny_dir).set_index("backend")
    assert "--backend pytorch" in table.loc["pytorch", "command"]
    if not has_cuda():
        assert table.loc["pytorch", "runs here"].startswith("no: no CUDA GPU")
        assert "Found no NVIDIA driver" in capsys.readouterr().out


def test_lmdeploy_chat_on_cpu_ends_in_the_cuda_error_lab_01_warns_of(tiny_dir):
    """What a student without a GPU sees when typing lab 01's command (the note in lab 01 quotes it)."""
    from labkit.engine import chat_command
    from labkit.gpu import has_cuda

    if has_cuda():
        pytest.skip("this machine has a CUDA GPU: lmdeploy chat runs here (tests/test_chat_cli.py)")
    argv = _lmdeploy_argv(chat_command(tiny_dir, "pytorch"))
    proc = subprocess.run(argv, input="hi\n\nexit\n\n", capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" in out
    assert "RuntimeError: Found no NVIDIA driver on your system" in out.strip().splitlines()[-1]
