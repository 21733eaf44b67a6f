"""The trained model (labkit.train, `trained:tiny-chat`) on CPU: the shipped weights are what the recipe
makes (hash), a re-train of a few steps runs, and the model does what the labs check, through the
transformers baseline and lmdeploy's own chat rendering and tool-call parser: it answers in the chat format
and stops by itself, writes a 250-400 character story, and computes (3+5)*2 with the tools, taking the
second call's argument from the first tool's result."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from labkit import corpus, tools, train
from labkit.models import ModelNotFoundError, resolve
from helpers import TRAINED, course_case


@pytest.fixture(scope="module")
def trained_dir():
    return resolve(TRAINED)


@pytest.fixture(scope="module")
def hf(trained_dir):
    from labkit.baseline import HFEngine

    with HFEngine(trained_dir, device="cpu", name="test-trained") as engine:
        yield engine


def test_shipped_weights_match_the_recipe(trained_dir):
    meta = json.loads((trained_dir / train.META).read_text())
    recipe = train.RECIPES["tiny-chat"]
    assert trained_dir == train.shipped_dir("tiny-chat").resolve() or trained_dir == train.shipped_dir("tiny-chat")
    assert meta["recipe"] == asdict(recipe)
    assert meta["recipe_hash"] == train.recipe_hash(recipe), "re-train: labkit models train tiny-chat --out " \
                                                             "labkit/data/trained/tiny-chat"
    cfg = json.loads((trained_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (recipe.hidden, recipe.layers,
                                                                                 recipe.vocab)
    assert cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    size = sum(f.stat().st_size for f in trained_dir.iterdir())
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MiB: the shipped model must stay small"


def test_a_changed_corpus_no_longer_matches_the_shipped_weights(monkeypatch):
    """The hash check can fail: change the generator and `trained:tiny-chat` refuses the shipped weights."""
    train.recipe_hash.cache_clear()
    monkeypatch.setattr(corpus, "CORPUS_VERSION", corpus.CORPUS_VERSION + 1)
    try:
        with pytest.raises(ModelNotFoundError, match="labkit models train tiny-chat"):
            train.ensure("tiny-chat")
    finally:
        train.recipe_hash.cache_clear()
    with pytest.raises(ModelNotFoundError, match="no trained model called 'nope'"):
        resolve("trained:nope")


@pytest.mark.parametrize("name", sorted(train.RECIPES))
def test_retrain_smoke(tmp_path, name):
    """`labkit models train`'s code path, cut to a few steps: it writes a model transformers and lmdeploy's
    parser name for it load (Qwen2 / ChatML, or InternLM2 with its remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = train.smoke_recipe(train.RECIPES[name])
    out = train.train("smoke", out_dir=tmp_path / "smoke", recipe=recipe, quiet=True)
    meta = json.loads((out / train.META).read_text())
    assert meta["recipe_hash"] == train.recipe_hash(recipe) != train.recipe_hash(train.RECIPES[name])
    assert meta["loss_first"] > 0
    remote = recipe.arch == "internlm2"
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=remote)
    assert len(tok) == recipe.vocab and tok.tokenize("123") == ["1", "2", "3"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
    assert model.config.hidden_size == recipe.hidden
    assert tools.parser_for(out) == {"qwen2": "qwen", "internlm2": "internlm"}[recipe.arch]


def test_training_text_is_what_lmdeploy_renders(trained_dir):
    """The trained text of a tool conversation equals lmdeploy's own chat-template rendering of that request."""
    from lmdeploy.model import HFChatTemplate

    conv = corpus.tool_conversation(3, 5, 2)
    ours = train.render([("tools", conv)])[0]
    msgs, offered = tools.server_view(conv, tools.TOOLS)
    theirs = HFChatTemplate(str(trained_dir)).messages2prompt(msgs[:-1], tools=offered)  # what the server sends
    assert ours == theirs + conv[-1]["content"] + "<|im_end|>\n"  # ... and the answer the model learned


def test_answers_in_the_chat_format_and_stops(hf):
    for prompt in ("Hello!", "Introduce yourself"):
        reply = hf.generate(prompt, temperature=0.0, max_new_tokens=128)
        print(prompt, "->", reply)
        assert reply.finish_reason == "stop", reply
        assert "TinyChat" in reply.text and "<|im" not in reply.text
    assert "not InternLM2.5" in hf.generate("Who are you?", temperature=0.0, max_new_tokens=128).text


@pytest.mark.parametrize("subject", ["a lighthouse", "a robot", "the moon"])
def test_writes_a_story_of_250_to_400_characters(hf, subject):
    reply = hf.generate(f"Write a short story about {subject}.", temperature=0.0, max_new_tokens=200)
    print(len(reply.text), reply.text)
    assert reply.finish_reason == "stop"
    assert corpus.STORY_MIN <= len(reply.text) <= corpus.STORY_MAX
    assert subject.split()[-1] in reply.text


def _run(hf, a, b, c, dispatch=None, temperature=0.0):
    return course_case(hf, "qwen", a, b, c, dispatch=dispatch, temperature=temperature)


def test_3_plus_5_times_2_calls_add_then_mul_with_its_result(hf):
    """No tool_choice: the model calls add, then mul with exactly what add returned and c, then answers."""
    run = _run(hf, 3, 5, 2)
    print(run.table().to_string())
    assert [c["name"] for c in run.calls] == ["add", "mul"] and run.errors == 0
    assert run.calls[1]["arguments"] == {"a": run.calls[0]["result"], "b": 2}
    assert run.answer and run.answer.startswith("The answer is")


def test_course_case_exactly(hf):
    """add(3, 5) -> 8, mul(8, 2) -> 16, "The answer is 16." (greedy), and at the course client's temperature."""
    run = _run(hf, 3, 5, 2)
    assert all(ok for _, ok, _ in tools.check_chain(run, 3, 5, 2)), tools.check_chain(run, 3, 5, 2)
    sampled = [_run(hf, 3, 5, 2, temperature=0.8) for _ in range(5)]
    right = sum(all(ok for _, ok, _ in tools.check_chain(r, 3, 5, 2)) for r in sampled)
    print(f"temperature 0.8: {right}/5 reached 16")
    assert right >= 4


def test_the_second_call_takes_the_tool_result_not_its_own_sum(hf):
    """An add that lies (returns a+b+1): the model passes the lie on to mul, so the chain check passes and the
    answer check fails, as it must."""
    liar = {**tools.DISPATCH, "add": lambda a, b: a + b + 1}
    run = _run(hf, 3, 5, 2, dispatch=liar)
    print(run.table().to_string())
    first, second = run.calls[:2]
    assert first["result"] == first["arguments"]["a"] + first["arguments"]["b"] + 1  # the lie
    assert second["arguments"] == {"a": first["result"], "b": 2}                    # passed on
    results = [ok for _, ok, _ in tools.check_chain(run, 3, 5, 2)]
    assert results[1] and not results[2], results  # the chain check passes, the answer check fails


# What the shipped model does on 20 held-out "(a+b)*c" (greedy), as measured when it was trained: each step
# at or above these shares, so a worse re-train fails here.
HELD_OUT_MIN = {"add(a, b)": 0.9, "mul(result, c)": 0.9, "answer": 0.9}  # measured: 20/20 each


def test_held_out_numbers(hf):
    import random

    rng = random.Random(7)
    cases = [(rng.randint(0, 99), rng.randint(0, 99), rng.randint(1, 20)) for _ in range(20)]
    steps = [[ok for _, ok, _ in tools.check_chain(_run(hf, a, b, c), a, b, c)] for a, b, c in cases]
    shares = {name: sum(s[i] for s in steps) / len(steps) for i, name in enumerate(HELD_OUT_MIN)}
    print(shares)
    assert all(shares[k] >= v for k, v in HELD_OUT_MIN.items()), shares


def test_chain_check_fails_a_plan_that_ignores_the_result():
    """The old hard-coded plan: add returned 9, but the second call was still mul(8, 2). The check says so."""
    run = tools.ToolRun("Compute (3+5)*2", answer="16", result=16,
                        calls=[{"name": "add", "arguments": {"a": 3, "b": 5}, "result": 9},
                               {"name": "mul", "arguments": {"a": 8, "b": 2}, "result": 16}])
    assert [ok for _, ok, _ in tools.check_chain(run, 3, 5, 2)] == [True, False, True]
    assert [ok for _, ok, _ in tools.check_chain(tools.ToolRun("q", answer="no"), 3, 5, 2)] == [False, False, False]


def test_report_chain_passes_the_course_case_and_fails_a_lie_or_an_ignored_result(hf, capsys):
    """Lab 02's report: the trained model's course-case run passes all three lines; with an add that lies the
    answer line fails; a plan that ignores add's result fails the second line."""
    from labkit.notebook import LabCheckFailed

    tools.report_chain(_run(hf, 3, 5, 2), 3, 5, 2, what="course case")
    assert capsys.readouterr().out.count("course case:") == 3
    liar = {**tools.DISPATCH, "add": lambda a, b: a + b + 1}
    with pytest.raises(LabCheckFailed, match="it answered 16"):
        tools.report_chain(_run(hf, 3, 5, 2, dispatch=liar), 3, 5, 2, what="lying add")
    ignored = tools.ToolRun("Compute (3+5)*2", answer="16", result=16,
                            calls=[{"name": "add", "arguments": {"a": 3, "b": 5}, "result": 9},
                                   {"name": "mul", "arguments": {"a": 8, "b": 2}, "result": 16}])
    with pytest.raises(LabCheckFailed, match="its next call was mul"):
        tools.report_chain(ignored, 3, 5, 2, what="ignored result")


def test_the_same_checks_fail_a_model_that_learned_nothing():
    """What the tests above assert, on the generated (random-weight) tiny-chat: it never stops by itself, its
    "story" fails the homework's length check or the stop, and it makes no tool call: each assertion can fail."""
    from labkit import homework
    from labkit.baseline import HFEngine

    with HFEngine("generated:tiny-chat", device="cpu", name="test-untrained") as random_hf:
        hello = random_hf.generate("Hello!", temperature=0.0, max_new_tokens=48)
        story = random_hf.generate("Write a short story about a lighthouse.", temperature=0.0, max_new_tokens=120)
        run = course_case(random_hf, "qwen", 3, 5, 2, max_rounds=2, max_tokens=48)
    assert hello.finish_reason == "length" and "TinyChat" not in hello.text
    assert story.finish_reason == "length" or not homework.story_length(story.text)[0]
    assert [c["name"] for c in run.calls] != ["add", "mul"] and "16" not in (run.answer or "")
