"""The lab 06 playground, driven as a person drives it: set widget values, click buttons, read what the panels say.
CPU tests run the transformers baseline on generated models; the `gpu` test runs LMDeploy's engine."""
from __future__ import annotations

import ast
import datetime
import json
import threading
import time
from pathlib import Path

import pytest

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
VL = "generated:tiny-vl"
NOW = datetime.datetime.now(datetime.timezone.utc)


def build(model: str = TINY, engine: str = "transformers", **kw):
    import labkit.playground

    p = labkit.playground.build(model, engine, name=kw.pop("name", "test-playground"), **kw)
    p.view.gen.max_new_tokens.value = 8  # short replies: the tests check behaviour, not prose
    return p


@pytest.fixture(scope="module")
def pg():
    """One loaded playground on tiny-chat (transformers baseline) for the tests that only chat."""
    p = build(name="test-pg-shared").wait()
    assert p.controller.slots["A"].state == "ready", p.controller.slots["A"].message
    yield p
    p.close()


def pieces_counter(ctl) -> list:
    seen = []
    ctl.listeners.append(lambda event: seen.append(event) if event == "piece" else None)
    return seen


def test_load_shows_the_prediction_then_streams_a_reply_with_its_numbers(pg):
    panel, view, ctl = pg.view.panel_a, pg.view, pg.controller
    assert "predicted: weights" in panel.prediction.value and "tokens that fit" in panel.prediction.value
    assert "loaded tiny-chat" in panel.message.value and "transformers" in panel.message.value
    assert view.gauge_label.value == "no GPU (CPU run)"  # this machine has none
    seen = pieces_counter(ctl)
    view.gen.max_new_tokens.value = 24
    view.prompt.value = "Hello there"
    view.buttons["Send"].click()
    assert view.prompt.value == "", "Send empties the prompt box at once"
    pg.wait()
    reply = ctl.replies[-1]
    assert len(seen) > 1, f"the reply came in {len(seen)} piece(s): not streamed"
    assert reply.reply_tokens > 0 and reply.prompt_tokens and reply.ttft_s is not None and reply.tokens_per_s > 0
    stats = view.stats.value
    assert "prompt +" in stats and "reply tokens" in stats and "first token" in stats and "tok/s" in stats
    assert "finish_reason=" in stats
    assert "Hello there" in view.chat.value and html_text(reply.text)[:10] in view.chat.value
    assert html_text(reply.summary()) in view.chat.value, "each reply shows its numbers under it"


def html_text(text: str) -> str:
    import html

    return html.escape(text)


def test_a_slider_applies_to_the_next_message_without_reloading(pg):
    ctl, gen = pg.controller, pg.view.gen
    engine = ctl.slots["A"].engine
    gen.max_new_tokens.value = 3
    r = pg.ask("Count to ten.")
    assert r.reply_tokens <= 3 and r.finish_reason == "length", r
    gen.max_new_tokens.value, gen.temperature.value = 12, 0.0
    a = pg.ask("Say hi.")
    pg.view.buttons["Retry"].click()
    pg.wait()
    assert ctl.slots["A"].engine is engine, "changing a slider must not reload the engine"
    assert a.reply_tokens > 3 and ctl.last_reply() == a.text, "temperature 0 is greedy: Retry gives the same reply"
    gen.temperature.value, gen.seed.value = 0.9, 11
    c = pg.ask("Tell me a word.")
    pg.view.buttons["Retry"].click()
    pg.wait()
    assert ctl.last_reply() == c.text, "a fixed random_seed reproduces the reply on Retry"
    gen.seed.value = 0


def test_stop_really_stops_the_engine(pg):
    ctl, view = pg.controller, pg.view
    view.gen.max_new_tokens.value = 2048
    view.gen.temperature.value = 0.8
    seen = pieces_counter(ctl)
    view.prompt.value = "Write a very long story."
    start = time.perf_counter()
    view.buttons["Send"].click()
    while not seen and time.perf_counter() - start < 30:
        time.sleep(0.01)
    stopped = time.perf_counter()
    view.buttons["Stop"].click()
    pg.wait(60)
    took = time.perf_counter() - stopped
    reply = ctl.replies[-1]
    assert reply.finish_reason == "stopped" and reply.reply_tokens < 2048, reply
    alive = [t.name for t in threading.enumerate() if t.name == "labkit-hf-generate"]
    assert not alive, "generate() still runs after Stop: only the reading was stopped"
    assert took < 3, f"Stop took {took:.1f} s: the engine went on generating"
    assert ctl.history[-1]["content"] == reply.text and ctl.history[-1]["reply"] is reply, "the stopped reply is kept"


def test_retry_undo_clear_copy(pg):
    ctl, view = pg.controller, pg.view
    view.buttons["Clear"].click()
    assert ctl.history == [] and "no messages yet" in view.chat.value
    view.buttons["Retry"].click()
    assert "nothing to retry" in view.status.value
    view.buttons["Copy"].click()
    assert "nothing to copy" in view.status.value
    view.gen.max_new_tokens.value = 6
    first = pg.ask("one")
    pg.ask("two")
    assert len(ctl.history) == 4
    view.buttons["Undo"].click()
    assert [m["content"] for m in ctl.history] == ["one", first.text]
    view.buttons["Retry"].click()
    pg.wait()
    assert len(ctl.history) == 2 and ctl.history[0]["content"] == "one"
    view.buttons["Copy"].click()
    assert view.copy_box.value == ctl.last_reply() and view.copy_box.layout.display == ""
    view.buttons["Clear"].click()
    assert ctl.history == []


def test_presets_set_the_panel_and_the_story_homework_prompt(pg):
    gen, view = pg.view.gen, pg.view
    gen.preset.value = "precise"
    assert gen.temperature.value == 0.0 and gen.top_k.value == 1
    gen.preset.value = "creative"
    assert gen.temperature.value > 1.0 and gen.top_p.value == 0.95
    gen.preset.value = "story homework"
    assert "300 characters" in view.prompt.value and "storyteller" in pg.controller.system
    assert gen.options()["max_new_tokens"] == 400
    with pytest.raises(Exception, match="unknown preset 'wild'"):
        pg.controller.with_preset({}, "wild")
    view.prompt.value = ""
    gen.preset.value = "custom"
    gen.system.value = "You are a helpful assistant."


def test_buttons_refuse_clearly_when_there_is_nothing_to_do():
    p = build(name="test-pg-empty", load=False)
    try:
        view = p.view
        view.buttons["Send"].click()
        assert "type a prompt first" in view.status.value
        view.prompt.value = "hi"
        view.buttons["Send"].click()
        p.wait()
        assert "not loaded: pick a model and press Load" in view.status.value
        assert view.prompt.value == "hi", "a failed Send gives the typed text back"
        assert p.controller.history == []
        view.buttons["Compare"].click()
        p.wait()
        assert "not loaded" in view.status.value
        p.view.panel_a.unload_btn.click()
        assert "nothing loaded" in p.view.panel_a.message.value
    finally:
        p.close()


@pytest.mark.parametrize("model, expect", [
    ("/nonexistent/model", "does not exist"),
    ("{tmp}/empty", "no config.json"),
    ("{tmp}/noweights", "no weights"),
    ("no-such-model-anywhere", "unknown model"),
])
def test_a_bad_model_says_why_and_the_playground_stays_usable(model, expect, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    p = build(model.format(tmp=tmp_path), name="test-pg-bad")
    try:
        p.wait()
        panel = p.view.panel_a
        assert p.controller.slots["A"].state == "failed"
        assert expect in panel.message.value and expect in p.view.status.value and expect in panel.prediction.value
        assert "\n" not in p.error
        panel.model.value = TINY  # usable: the next load works
        panel.load_btn.click()
        p.wait()
        assert p.controller.slots["A"].state == "ready", p.controller.slots["A"].message
        assert p.ask("hi") is not None
    finally:
        p.close()


def test_bad_options_are_refused_before_anything_loads(tiny_dir):
    from labkit.playground import LoadConfig, PlaygroundError, make_plan

    for cfg, expect in [(LoadConfig(TINY, "transformers", cache_ratio=1.5), "cache_max_entry_count must be in"),
                        (LoadConfig(TINY, "transformers", quant_policy=3), "quant_policy must be one of"),
                        (LoadConfig(TINY, "transformers", session_len=4), "session_len must be"),
                        (LoadConfig(TINY, "pytorch"), "needs a CUDA GPU"),
                        (LoadConfig(TINY, "warp-drive"), "unknown backend 'warp-drive'"),
                        (LoadConfig(VL, "transformers"), "vision-language model"),
                        (LoadConfig("  ", "transformers"), "no model given")]:
        with pytest.raises((PlaygroundError, ValueError), match=expect):
            make_plan(cfg)
    assert make_plan(LoadConfig(TINY, "transformers")).engine == "transformers"  # and a good one passes


def test_the_prediction_follows_the_cache_ratio_and_kv_policy(pg):
    panel = pg.view.panel_a
    tokens = []
    for ratio, policy in [(0.4, 0), (0.2, 0), (0.2, 8), (0.2, 4)]:
        panel.cache_ratio.value, panel.quant_policy.value = ratio, policy
        text = panel.prediction.value
        tokens.append(int(text.split(" tokens that fit")[0].split("= ")[-1].replace(",", "")))
    assert tokens[1] < tokens[0] and tokens[0] / tokens[1] == pytest.approx(2, rel=0.02), tokens
    assert tokens[3] > tokens[2] > tokens[1], f"int8/int4 KV must fit more tokens: {tokens}"
    panel.cache_ratio.value, panel.quant_policy.value = 0.4, 0


def test_closed_engine_says_press_load(pg):
    p = build(name="test-pg-closed").wait()
    try:
        p.view.gen.max_new_tokens.value = 4
        p.ask("hi")
        before = list(p.controller.history)
        p.controller.slots["A"].engine.close()  # closed behind the playground's back
        p.view.prompt.value = "And then?"
        p.view.buttons["Send"].click()
        p.wait()
        assert "was closed outside the playground: press Load" in p.view.status.value
        assert p.controller.history == before and p.view.prompt.value == "And then?"
        p.view.buttons["Retry"].click()
        p.wait()
        assert p.controller.history == before, "a failed Retry keeps the old reply"
        p.view.panel_a.load_btn.click()
        p.wait()
        assert p.ask("And then?") is not None
    finally:
        p.close()


def test_busy_while_generating_and_unload_frees_the_engine():
    p = build(name="test-pg-busy").wait()
    try:
        p.view.gen.max_new_tokens.value = 2048
        p.view.prompt.value = "long"
        p.view.buttons["Send"].click()
        time.sleep(0.2)
        p.view.prompt.value = "second"
        p.view.buttons["Send"].click()
        assert "busy" in p.view.status.value
        p.view.buttons["Undo"].click()
        assert "busy: press Stop first" in p.view.status.value
        eng = p.controller.slots["A"].engine
        p.view.panel_a.unload_btn.click()  # stops the reply, then closes
        assert eng.closed and p.controller.slots["A"].engine is None
        assert "unloaded: memory freed" in p.view.panel_a.message.value
    finally:
        p.close()


def test_reload_with_other_settings_closes_the_previous_engine_first(tiny_dir):
    p = build(name="test-pg-reload").wait()
    try:
        old = p.controller.slots["A"].engine
        panel = p.view.panel_a
        panel.model.value = str(tiny_dir)  # the same model, given as a folder
        panel.session_len.value = 256
        panel.load_btn.click()
        p.wait()
        slot = p.controller.slots["A"]
        assert old.closed, "the previous engine must be closed before the next loads"
        assert slot.state == "ready" and slot.engine is not old and slot.plan.session_len == 256
        assert slot.config.model == str(tiny_dir)
        assert p.ask("hi") is not None
    finally:
        p.close()


def test_rebuilding_the_playground_closes_the_earlier_one():
    first = build(name="test-pg-twice").wait()
    eng = first.controller.slots["A"].engine
    second = build(name="test-pg-twice", load=False)
    try:
        assert eng.closed and first.controller.slots["A"].engine is None
    finally:
        second.close()


def test_compare_two_configurations_side_by_side_and_the_chart_grows(pg):
    view, ctl = pg.view, pg.controller
    view.gen.max_new_tokens.value, view.gen.temperature.value = 8, 0.0
    view.panel_b.load_btn.click()
    pg.wait()
    assert ctl.slots["B"].state == "ready", ctl.slots["B"].message
    view.compare_prompt.value = "Compare me."
    view.buttons["Compare"].click()
    pg.wait()
    table = ctl.compare_table()
    assert list(table["slot"]) == ["A", "B"] and (table["tokens_per_s"] > 0).all()
    for key in "AB":
        col = view.columns[key].value
        assert "tok/s" in col and "first token" in col and "memory no GPU" in col
    assert view.chart.value[:4] == b"\x89PNG"
    size = len(view.chart.value)
    view.buttons["Compare"].click()
    pg.wait()
    assert list(ctl.compare_table()["run"]) == [1, 1, 2, 2] and len(view.chart.value) > size
    view.panel_b.unload_btn.click()
    view.buttons["Compare"].click()
    pg.wait()
    assert "configuration B is not loaded" in view.status.value and "Compare tab" in view.status.value
    assert len(ctl.compares) == 4


def test_awq_needs_a_copy_and_an_lmdeploy_engine(tiny_dir):
    from labkit import quant
    from labkit.playground import LoadConfig, PlaygroundError, awq_copies, make_plan

    p = build(name="test-pg-awq", load=False)
    try:
        out = quant.awq(TINY, device=None, calib_samples=4, calib_seqlen=64)  # cached under LABKIT_HOME
        assert out in awq_copies(tiny_dir)
        p.view.panel_a.refresh_plan()
        assert not p.view.panel_a.awq.disabled, "a model with an AWQ copy offers it"
        with pytest.raises(PlaygroundError, match="cannot run AWQ weights"):
            make_plan(LoadConfig(TINY, "transformers", awq=True))
        p.view.panel_a.model.value = VL
        assert p.view.panel_a.awq.disabled, "a model without an AWQ copy does not"
        with pytest.raises(PlaygroundError, match="no AWQ copy yet"):
            make_plan(LoadConfig(VL, "transformers", awq=True))
    finally:
        p.close()


def test_image_upload_shows_its_token_cost_before_sending():
    from labkit import vision
    from labkit.models import resolve

    p = build(VL, name="test-pg-vl")
    try:
        p.wait()
        assert p.view.image_row.layout.display == "", "a vision-language model gets the image upload"
        assert "vision-language model" in p.view.panel_a.message.value  # the baseline cannot run it: it says so
        image = next(iter(vision.sample_images().values()))
        p.view.upload.value = [{"name": "x.png", "type": "image/png", "size": 0, "last_modified": NOW,
                                "content": memoryview(Path(image).read_bytes())}]
        cost = vision.token_cost(resolve(VL), Path(image))
        assert f"{cost:,} image tokens" in p.view.image_cost.value and "fits" in p.view.image_cost.value
        p.view.upload.value = [{"name": "bad.png", "type": "image/png", "size": 3, "content": memoryview(b"abc"),
                                "last_modified": NOW}]
        assert "color:#b00" in p.view.image_cost.value, "a broken image is refused in the panel"
        text_only = build(name="test-pg-text")
        try:
            assert text_only.view.image_row.layout.display == "none"
            with pytest.raises(Exception, match="reads text only"):
                text_only.controller.attach_image(Path(image))
        finally:
            text_only.close()
    finally:
        p.close()


def code_without_comments(source: str) -> str:
    """A cell's code with comments and strings dropped (what it runs)."""
    return ast.unparse(ast.parse(source))


def closing_cells(nb: dict) -> list[int]:
    """Indexes of code cells that close or unload the playground when run."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            code = code_without_comments("".join(cell["source"]).replace("%%gpu", ""))
            if any(word in code for word in (".close()", "unload", "Unload")):
                found.append(i)
    return found


def test_run_all_leaves_a_working_playground():
    nb = json.loads((ROOT / "notebooks" / "06_playground.ipynb").read_text())
    assert closing_cells(nb) == [], "a cell that Run All executes closes the playground"
    broken = {"cells": nb["cells"] + [{"cell_type": "code", "source": ["pg.close()"]}]}
    assert closing_cells(broken) == [len(nb["cells"])], "the check must catch a closing cell"
    last = "".join(nb["cells"][-1]["source"])
    assert "# pg.close()" in last and "remove the #" in last, "the last cell says how to close by hand"


@pytest.mark.gpu
def test_gpu_lmdeploy_reload_compare_stop_and_memory_back_after_unload(capsys):
    """LMDeploy's PyTorch engine: load, reload with another cache ratio, compare with int8 KV, Stop, image, unload."""
    import torch

    from labkit import vision
    from labkit.gpu import memory_used
    from labkit.kvcache import engine_capacity

    torch.empty(1, device="cuda")  # this process's CUDA context never goes back: make it before the baseline
    p = build(TINY, "pytorch", name="gpu-playground", load=False)
    figures = {}
    try:
        panel, view, ctl = p.view.panel_a, p.view, p.controller
        baseline = ctl.baseline_memory
        panel.cache_ratio.value = 0.2
        panel.load_btn.click()
        p.wait()
        assert ctl.slots["A"].state == "ready", ctl.slots["A"].message
        cap_a = engine_capacity(ctl.slots["A"].engine)
        view.gen.max_new_tokens.value = 32
        first = p.ask("Hello")
        assert first is not None and first.reply_tokens > 0 and first.memory_gib > 0, p.error
        figures["ratio 0.2"] = (cap_a["tokens"], ctl.slots["A"].engine.memory_gib, first.tokens_per_s)
        panel.cache_ratio.value = 0.1  # reload with another cache ratio
        panel.load_btn.click()
        p.wait()
        cap = engine_capacity(ctl.slots["A"].engine)
        figures["ratio 0.1"] = (cap["tokens"], ctl.slots["A"].engine.memory_gib)
        assert cap["tokens"] < cap_a["tokens"], (cap, cap_a)
        # Stop really stops: the engine aborts the request
        view.gen.max_new_tokens.value = 4000
        view.prompt.value = "long"
        view.buttons["Send"].click()
        deadline = time.monotonic() + 60
        while not ctl.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        stopped = time.perf_counter()
        view.buttons["Stop"].click()
        p.wait(60)
        figures["stop s"] = round(time.perf_counter() - stopped, 2)
        assert ctl.replies[-1].finish_reason == "stopped" and ctl.replies[-1].reply_tokens < 4000, ctl.replies[-1]
        assert figures["stop s"] < 5, figures
        # compare: B = the same model with an int8 KV cache
        view.panel_b.engine.value, view.panel_b.quant_policy.value, view.panel_b.cache_ratio.value = "pytorch", 8, 0.1
        view.panel_b.load_btn.click()
        p.wait()
        assert ctl.slots["B"].state == "ready", ctl.slots["B"].message
        view.gen.max_new_tokens.value = 32
        view.buttons["Compare"].click()
        p.wait()
        table = ctl.compare_table()
        assert len(table) == 2 and (table["memory_gib"] > 0).all(), table
        figures["compare"] = table[["config", "tokens_per_s", "ttft_s", "memory_gib"]].to_dict("records")
        assert "GiB" in view.gauge_label.value
        view.panel_b.unload_btn.click()
        # out of memory: a GPU filled to 0.5 GiB free refuses B with the numbers, and A goes on answering
        free, _total = torch.cuda.mem_get_info()
        ballast = torch.empty(free - 2**29, dtype=torch.uint8, device="cuda")
        try:
            view.panel_b.load_btn.click()
            p.wait()
            message = ctl.slots["B"].message
            assert ctl.slots["B"].state == "failed" and ("needs about" in message or "will not fit" in message), message
            figures["full GPU"] = message
            assert p.ask("Still there?") is not None, p.error
        finally:
            del ballast
            torch.cuda.empty_cache()
        # a vision-language model: the image's token cost before sending, then a reply about it
        panel.model.value, panel.cache_ratio.value = VL, 0.1
        panel.load_btn.click()
        p.wait()
        assert ctl.slots["A"].state == "ready", ctl.slots["A"].message
        assert view.image_row.layout.display == ""
        image = next(iter(vision.sample_images().values()))
        view.upload.value = [{"name": "x.png", "type": "image/png", "size": 0, "last_modified": NOW,
                              "content": memoryview(Path(image).read_bytes())}]
        assert "image tokens" in view.image_cost.value, view.image_cost.value
        seen = p.ask("What is in the picture?")
        assert seen is not None and seen.prompt_tokens > vision.token_cost(ctl.slots["A"].plan.model_dir, Path(image))
        figures["image"] = (view.image_cost.value, seen.summary())
        view.panel_a.unload_btn.click()
        after = memory_used()
        figures["memory MiB baseline / after unload"] = (baseline / 2**20, after / 2**20)
        assert after <= baseline + 512 * 2**20, figures
    finally:
        p.close()
        with capsys.disabled():
            print(f"\nplayground GPU figures: {figures}")
