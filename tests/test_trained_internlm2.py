"""The trained model in InternLM2.5's format (`trained:tiny-internlm2-chat`, labkit.train) on CPU: the shipped
weights are what the recipe makes, the folder is built like the course model (remote code, packed wqkv, its chat
template), and through transformers, the model's own chat template and lmdeploy's `internlm` tool-call parser it
chats, stops, writes a 250-400 character story and computes (3+5)*2 with the tools, taking the second call's argument
from the first tool's result."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from labkit import corpus, tools, train
from labkit.models import resolve
from helpers import course_case

NAME = "tiny-internlm2-chat"


@pytest.fixture(scope="module")
def model_dir():
    return resolve(f"trained:{NAME}")


@pytest.fixture(scope="module")
def hf(model_dir):
    from labkit.baseline import HFEngine

    with HFEngine(model_dir, device="cpu", name="test-trained-internlm2") as engine:
        yield engine


def _run(hf, a, b, c, dispatch=None, temperature=0.0):
    return course_case(hf, "internlm", a, b, c, dispatch=dispatch, temperature=temperature)


def test_shipped_weights_match_the_recipe_and_the_course_models_structure(model_dir):
    meta = json.loads((model_dir / train.META).read_text())
    recipe = train.RECIPES[NAME]
    assert model_dir == train.shipped_dir(NAME)
    assert meta["recipe"] == asdict(recipe) and meta["recipe_hash"] == train.recipe_hash(recipe), \
        f"re-train: labkit models train {NAME} --out labkit/data/trained/{NAME}"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForCausalLM"] and "AutoModelForCausalLM" in cfg["auto_map"]
    assert tools.parser_for(model_dir) == "internlm"
    from labkit import config

    for code in ("configuration_internlm2.py", "modeling_internlm2.py"):  # a model folder carries its remote code:
        assert (model_dir / code).read_bytes() == config.data_file(code).read_bytes(), code  # labkit's, verbatim
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert any(k.endswith("attention.wqkv.weight") for k in f.keys())  # packed, as InternLM2.5 stores it


def test_chats_and_stops_in_its_own_format(hf):
    reply = hf.generate("Introduce yourself", temperature=0.0, max_new_tokens=128)
    assert reply.finish_reason == "stop" and "TinyChat" in reply.text and "<|im" not in reply.text, reply
    story = hf.generate("Write a short story about a lighthouse.", temperature=0.0, max_new_tokens=200)
    print(len(story.text), story.text)
    assert story.finish_reason == "stop" and corpus.STORY_MIN <= len(story.text) <= corpus.STORY_MAX


def test_3_plus_5_times_2_through_internlm2s_tool_calls(hf):
    """No tool_choice: add(3, 5), then mul(8, 2) with the 8 from add's result, then 16, read by lmdeploy's parser."""
    run = _run(hf, 3, 5, 2)
    print(run.table().to_string())
    assert all(ok for _, ok, _ in tools.check_chain(run, 3, 5, 2)), tools.check_chain(run, 3, 5, 2)
    sampled = sum(all(ok for _, ok, _ in tools.check_chain(_run(hf, 3, 5, 2, temperature=0.8), 3, 5, 2))
                  for _ in range(5))
    print(f"temperature 0.8: {sampled}/5 reached 16")
    assert sampled >= 4  # measured when trained: 10/10


def test_the_second_call_takes_the_tool_result(hf):
    """An add that lies (a+b+1): the model passes the lie on, so the chain check passes and the answer check fails."""
    liar = {**tools.DISPATCH, "add": lambda a, b: a + b + 1}
    run = _run(hf, 3, 5, 2, dispatch=liar)
    checks = [ok for _, ok, _ in tools.check_chain(run, 3, 5, 2)]
    assert run.calls[1]["arguments"] == {"a": 9, "b": 2} and checks[1] and not checks[2], run.table().to_string()
