"""labkit.vision.engines (lab 05): vision towers TurboMind cannot run are refused before anything loads; the
over-long prompt is recognised as either engine reports it; predicted image tokens are compared with the
engine's own count image by image; every request has a deadline."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from labkit import models, vision
from helpers import one_line, suite_backends

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def tiny_vl() -> Path:
    return models.resolve("generated:tiny-vl")


def _with_vision(tiny_vl: Path, out: Path, **vision_cfg) -> Path:
    """A copy of tiny-vl's config (no weights: enough for the checks that read configs) with other vision sizes."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((tiny_vl / "config.json").read_text())
    cfg["vision_config"].update(vision_cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_tiny_vl_has_vision_heads_turbomind_runs(tiny_vl):
    assert vision.vision_head_dim(tiny_vl) == 64 and 64 in vision.TURBOMIND_VIT_HEAD_DIMS
    assert vision.turbomind_vision_problem(tiny_vl) is None


def test_a_vision_head_dim_turbomind_cannot_run_is_named_in_one_line(tiny_vl, tmp_path, tiny_dir):
    old = _with_vision(tiny_vl, tmp_path / "heads16", hidden_size=64, num_attention_heads=4)  # tiny-vl v1
    why = vision.turbomind_vision_problem(old)
    assert why and "head_dim 16" in why and "\n" not in why and "64 or 128" in why
    wide = _with_vision(tiny_vl, tmp_path / "heads128", hidden_size=256, num_attention_heads=2)
    assert vision.turbomind_vision_problem(wide) is None
    assert vision.turbomind_vision_problem(tiny_dir) is None  # a text model has no vision tower


@pytest.mark.gpu
def test_choose_backend_falls_back_or_refuses_before_loading(tiny_vl, tmp_path, capsys):
    """With TurboMind available: auto picks the PyTorch engine and says why; 'turbomind' asked for gets the PyTorch
    engine too, with the reason in one printed line (labkit's one rule for a model TurboMind cannot run, as
    lmdeploy does; the GPU run of 2026-12-01 showed this test expecting a refusal instead)."""
    from labkit.engine import choose_backend

    backend, why = choose_backend(tiny_vl, "auto")
    if backend != "turbomind":
        pytest.skip(f"auto is not TurboMind here ({why}): nothing to fall back from")
    old = _with_vision(tiny_vl, tmp_path / "heads16", hidden_size=64, num_attention_heads=4)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny_vl / name).is_file():
            shutil.copy(tiny_vl / name, old / name)
    backend, why = choose_backend(old, "auto")
    assert backend == "pytorch" and "head_dim 16" in why
    capsys.readouterr()
    backend, why = choose_backend(old, "turbomind")
    printed = capsys.readouterr().out.strip().splitlines()
    assert backend == "pytorch" and "head_dim 16" in why
    assert len(printed) == 1 and printed[0].startswith("TurboMind cannot run heads16:") and "head_dim 16" in printed[0]


def _refusal(err) -> object:
    """The Response lmdeploy 0.18's pipeline (pipeline.py _infer) makes of a RequestError."""
    from lmdeploy.messages import Response

    return Response(text="", generate_token_len=0, input_token_len=0, finish_reason="error", token_ids=[], index=0,
                    error_code=err.code.value, error_message=err.message)


def test_context_refusal_is_recognised_from_both_engines():
    from lmdeploy.messages import Response, ResponseType
    from lmdeploy.serve.core.async_engine import AsyncEngine
    from lmdeploy.serve.core.exceptions import ErrorCode, RequestError

    checked_first = RequestError(ErrorCode.CONTEXT_LENGTH_EXCEEDED,  # async_engine.preprocess, either engine
                                 "Input length (2325) must be smaller than the model context length (2048).")
    turbomind = AsyncEngine._request_error_from_status(ResponseType.INPUT_LENGTH_ERROR)  # TurboMind's kTooLong
    assert vision.is_context_refusal(_refusal(checked_first)) and vision.is_context_refusal(_refusal(turbomind))
    # and not anything else
    assert not vision.is_context_refusal(_refusal(RequestError(ErrorCode.PREPROCESS_FAILED)))
    assert not vision.is_context_refusal(_refusal(AsyncEngine._request_error_from_status(ResponseType.OUT_OF_MEMORY)))
    cut = Response(text="", generate_token_len=0, input_token_len=2000, finish_reason="length", token_ids=[], index=0)
    assert not vision.is_context_refusal(cut)


@pytest.fixture(scope="module")
def input_lens(tiny_vl):
    """input_token_len of each sample picture with QUESTION, as lmdeploy 0.18 counts it before the GPU
    (its MultimodalProcessor + InternVL preprocessor, what the pipeline and api_server run), on CPU."""
    import asyncio

    from lmdeploy import PytorchEngineConfig
    from lmdeploy.model import get_chat_template
    from lmdeploy.serve.processors import MultimodalProcessor
    from lmdeploy.tokenizer import Tokenizer
    from lmdeploy.vl.engine import ImageEncoder

    path = str(tiny_vl)
    encoder = ImageEncoder(path, "pytorch", backend_config=PytorchEngineConfig(dtype="float16"))
    proc = MultimodalProcessor(Tokenizer(path), get_chat_template(path), vl_encoder=encoder, backend="pytorch")
    imgs = {k: vision.load(p) for k, p in vision.sample_images().items() if k in ("circle", "chart", "text", "large")}
    lens = {}
    for k, img in imgs.items():
        messages = MultimodalProcessor.format_prompts((QUESTION, img))[0]
        lens[k] = len(asyncio.run(proc.get_prompt_input(prompt=messages, do_preprocess=True))["input_ids"])
    return imgs, lens


def test_prediction_is_compared_image_by_image_with_the_engines_count(tiny_vl, input_lens):
    imgs, lens = input_lens
    text = vision.text_tokens(tiny_vl, QUESTION)
    predicted = [vision.token_cost(tiny_vl, img) for img in imgs.values()]
    assert vision.check_prediction(predicted, list(lens.values()), text) == []
    # A wrong prediction by a constant (one tile too many for every image) kept the old check green: the
    # difference between prompt length and prediction was the same for every picture. Now it fails, per image.
    wrong = [p + 256 for p in predicted]
    diffs = {got - p for p, got in zip(wrong, lens.values())}
    assert len(diffs) == 1  # what the lab used to check: passes on the wrong prediction
    problems = vision.check_prediction(wrong, list(lens.values()), text)
    assert len(problems) == len(imgs) and "the engine counted" in problems[0]
    assert vision.check_prediction(predicted[:2], list(lens.values()), text)  # a missing reply is a problem too


def test_within_gives_the_answer_or_a_deadline_message():
    assert vision.within(5, lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        vision.within(5, lambda: 1 / 0)
    start = time.monotonic()
    with pytest.raises(vision.RequestTimeout) as err:
        vision.within(0.3, lambda: time.sleep(5), "the first image request")
    assert time.monotonic() - start < 2
    assert "the first image request gave no answer within 0.3 s" in one_line(err) and "backend='pytorch'" in str(err.value)


def test_memory_table_and_load_or_none(tiny_vl, capsys):
    weights = vision.weights_by_part(tiny_vl)

    class Stopped:  # what memory_table reads from a labkit Engine: backend and memory_gib
        backend, memory_gib = "turbomind", 1.5

    table = vision.memory_table(Stopped(), weights, first_image_mib=12.0)
    assert table["what"].tolist()[-3:] == ["KV cache (TurboMind does not report it)",
                                           "engine in all (weights + KV + runtime)", "first image, extra at its peak"]
    assert table["MiB"].tolist()[-2:] == [1536.0, 12.0] and len(table) == len(weights) + 3
    assert vision.load_or_none("/no/such/picture.png") is None
    assert "no image file at /no/such/picture.png" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", suite_backends())  # the suite's engine (each suite runs its own), else both
def test_tiny_vl_sees_an_image_and_refuses_the_4k_one_on_each_engine(tiny_vl, backend):
    """Lab 05's path on each engine: an answer within the deadline, the image costs exactly as predicted,
    and the 4K picture refused as an over-long prompt (TurboMind ran its own InternViT here: head_dim 64)."""
    from labkit.engine import Engine, EngineError, choose_backend

    try:
        choose_backend(tiny_vl, backend)
    except EngineError as err:
        pytest.skip(f"{backend} cannot run here: {err}")
    imgs = {k: vision.load(p) for k, p in vision.sample_images().items() if k in ("circle", "text", "large")}
    with Engine(tiny_vl, backend=backend, cache_ratio=0.05, session_len=2048, name=f"vl-{backend}") as eng:
        assert eng.backend == backend
        replies = vision.within(180, lambda: eng.generate([(QUESTION, imgs["circle"]), (QUESTION, imgs["text"])],
                                                          max_new_tokens=8), f"tiny-vl on {backend}")
        assert all(r.finish_reason in ("stop", "length") for r in replies), replies
        predicted = [vision.token_cost(tiny_vl, imgs[k]) for k in ("circle", "text")]
        assert vision.check_prediction(predicted, [r.input_token_len for r in replies],
                                       vision.text_tokens(tiny_vl, QUESTION)) == []
        trap = vision.within(180, lambda: eng.generate((QUESTION, imgs["large"]), max_new_tokens=8), "the 4K picture")
        assert vision.is_context_refusal(trap), (trap.finish_reason, trap.error_code, trap.error_message)


def test_server_chat_has_a_deadline():
    """A server that accepts the connection and never answers: the lab's message within the deadline."""
    import socket

    import openai

    from labkit.serve import free_port

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{silent.getsockname()[1]}/v1", api_key="none",
                               timeout=60, max_retries=0)
        start = time.monotonic()
        with pytest.raises(vision.RequestTimeout, match="no answer within 0.5 s"):
            vision.server_chat(client, "m", [{"role": "user", "content": "hi"}], timeout=0.5, max_tokens=4)
        assert time.monotonic() - start < 3
    finally:
        silent.close()
    closed = openai.OpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIConnectionError):  # the server's own errors come through unchanged
        vision.server_chat(closed, "m", [{"role": "user", "content": "hi"}], timeout=30, max_tokens=4)
