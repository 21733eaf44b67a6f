"""labkit.engine: input checks on any machine; a real engine on a GPU (one start, shared)."""
from __future__ import annotations

import pytest

from labkit import engine
from labkit.engine import EngineError


def test_unknown_backend():
    with pytest.raises(EngineError, match="unknown backend 'tensorrt'"):
        engine.check_backend("tensorrt")


@pytest.mark.parametrize("n", [0, -5, 1.5])
def test_bad_max_new_tokens(n):
    with pytest.raises(EngineError, match="max_new_tokens must be a whole number >= 1"):
        engine.gen_config(max_new_tokens=n)


@pytest.mark.parametrize("ratio", [0, 1.2, -1])
def test_bad_cache_ratio(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        engine.engine_config("pytorch", cache_ratio=ratio)


def test_bad_quant_policy():
    with pytest.raises(ValueError, match="quant_policy must be one of"):
        engine.engine_config("pytorch", quant_policy=3)


def test_missing_model_path_fails_before_gpu_work(tmp_path):
    from labkit.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        engine.Engine(str(tmp_path / "missing"))


def test_no_gpu_error_is_one_clear_line():
    from labkit.gpu import NoGPUError, has_cuda

    if has_cuda():
        pytest.skip("this machine has a GPU: the no-GPU message cannot show here")
    with pytest.raises(NoGPUError, match="needs a CUDA GPU: found none; see 00_setup"):
        engine.Engine("generated:tiny-chat")


@pytest.fixture(scope="module")
def tiny_engine():
    eng = engine.Engine("generated:tiny-chat", name="test-engine", cache_ratio=0.2)
    yield eng
    eng.close()


@pytest.mark.gpu
def test_engine_generates_streams_and_closes(tiny_engine):
    from labkit.gpu import memory_used

    eng = tiny_engine
    print("engine", eng.describe())
    assert eng.backend in ("pytorch", "turbomind")
    r = eng.generate("hello", max_new_tokens=16, ignore_eos=True)
    assert r.generate_token_len == 16 and r.finish_reason == "length"
    batch = eng.generate(["a", "b", "c"], max_new_tokens=8, ignore_eos=True)
    assert [x.generate_token_len for x in batch] == [8, 8, 8]
    pieces = [x.text for x in eng.stream("stream me", max_new_tokens=12, ignore_eos=True)]
    assert len(pieces) > 1
    assert eng.memory_gib > 0
    before = eng.memory_before
    eng.close()
    assert memory_used() < before + 512 * 2**20, "GPU memory did not come back after close()"
    with pytest.raises(EngineError, match="is closed"):
        eng.generate("again")
