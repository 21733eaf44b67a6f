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


@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_engine_config_passes_options_and_leaves_none_to_lmdeploy(backend):
    """Both lmdeploy config classes build on CPU; options left as None get lmdeploy's defaults."""
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

    cls = TurbomindEngineConfig if backend == "turbomind" else PytorchEngineConfig
    cfg = engine.engine_config(backend, cache_ratio=0.4, quant_policy=8, session_len=4096)
    assert isinstance(cfg, cls)
    assert (cfg.cache_max_entry_count, int(cfg.quant_policy), cfg.session_len, cfg.tp) == (0.4, 8, 4096, 1)
    default = cls()
    assert (cfg.max_batch_size, cfg.model_format) == (default.max_batch_size, default.model_format)
    set_all = engine.engine_config(backend, max_batch_size=64, model_format="awq", eager=True)
    assert (set_all.max_batch_size, set_all.model_format, set_all.session_len) == (64, "awq", default.session_len)
    if backend == "pytorch":
        assert set_all.eager_mode is True and engine.engine_config(backend, eager=False).eager_mode is False


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


# On a GPU, notebooks/01_chat.ipynb exercises a real Engine (generate, batch, stream, close and the memory
# coming back); the GPU suite starts it there once rather than again here.


def test_start_failure_names_the_likely_cause():
    from pathlib import Path

    msg = engine._explain(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), Path("/m/tiny"), 0.8)
    assert "\n" not in msg and "likely cause: out of GPU memory: lower cache_ratio (now 0.8)" in msg


@pytest.mark.gpu
def test_a_gpu_too_full_for_the_model_is_refused_before_anything_loads():
    """A real GPU filled up to 0.5 GiB free: Engine and Server refuse with the numbers and what to do,
    before lmdeploy loads anything or a server process starts."""
    import torch

    from labkit import serve
    from labkit.gpu import GiB, NoGPUError, memory_used

    torch.cuda.init()
    free, _total = torch.cuda.mem_get_info()
    ballast = torch.empty(free - GiB // 2, dtype=torch.uint8, device="cuda")
    try:
        held = memory_used()
        name = "test-too-full"
        for make in (lambda: engine.Engine("generated:tiny-chat", name=name),
                     lambda: serve.Server("generated:tiny-chat", name=name, show=False)):
            # Engine raises NoGPUError; Server says it as a ServerError ("server ... not started: ...")
            with pytest.raises((NoGPUError, serve.ServerError), match=r"needs about 1\.0 GiB free on the GPU, but .* has 0\.\d GiB free"
                                                 r".*stop other engines or servers"):
                make()
        assert memory_used() < held + 64 * 2**20, "something was loaded after all"
        assert not [e for e in serve.servers() if e["name"] == name], "a server process was started"
    finally:
        del ballast
        torch.cuda.empty_cache()


def test_a_ctrl_c_during_the_load_is_noted_and_still_interrupts():
    """lmdeploy's PyTorch engine turns a Ctrl-C in its environment check into exit(1); Engine tells the two apart
    by noting the SIGINT. The note must not swallow it: the KeyboardInterrupt still comes, the handler comes back."""
    import os
    import signal

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a kernel (a background job ignores it)
    try:
        with pytest.raises(KeyboardInterrupt):
            with engine._noting_ctrl_c() as ctrl_c:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
        assert ctrl_c["seen"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with engine._noting_ctrl_c() as quiet:
            pass
        assert not quiet["seen"]
    finally:
        signal.signal(signal.SIGINT, outer)
