"""The trained model on the real lmdeploy engines (GPU): `lmdeploy serve api_server --tool-call-parser qwen`
with the course's client code (openai client, tools add/mul, no tool_choice, no max_tokens, a dispatch
table instead of eval), the story and the stop reason, and quality numbers: perplexity before/after AWQ
and KV int8/int4 against fp16 (agreement, perplexity). On the suite's engine (`gpu-suite.sh --backend`), else on
each backend that can run here; TurboMind skips with its reason where it cannot.

    python -m pytest tests/test_trained_gpu.py -q -s        # prints every number it asserts on
"""
from __future__ import annotations

import pytest

from labkit import corpus, tools
from helpers import TRAINED, suite_backends

pytestmark = pytest.mark.gpu


def _backend_or_skip(backend: str, model_dir) -> str:
    from labkit.engine import EngineError, choose_backend

    try:
        return choose_backend(model_dir, backend)[0]
    except EngineError as err:
        pytest.skip(f"{backend}: {err}")


@pytest.fixture(scope="module", params=suite_backends())
def server(request):
    from labkit.models import resolve
    from labkit.serve import Server

    model_dir = resolve(TRAINED)
    backend = _backend_or_skip(request.param, model_dir)
    with Server(model_dir, name=f"test-trained-{backend}", backend=backend, cache_ratio=0.05,
                tool_call_parser="qwen", session_len=4096, show=False) as srv:
        yield srv


def test_course_client_computes_3_plus_5_times_2(server):
    """The course's function-calling client (tools add and mul, no tool_choice, no max_tokens): greedy, then at its
    temperature 0.8: add(3, 5), mul(8, 2) with the 8 from add's result, "The answer is 16."."""
    def course_run(temperature):
        run = tools.run_tool_loop(server.client(), server.model_name, "Compute (3+5)*2", temperature=temperature,
                                  max_tokens=None, tool_choice=None)
        return run, tools.check_chain(run, 3, 5, 2)

    run, checks = course_run(0.0)
    print(server.backend, run.table().to_string())
    print(checks)
    assert all(ok for _, ok, _ in checks) and run.errors == 0, checks
    assert [c["name"] for c in run.calls] == ["add", "mul"] and run.result == 16
    sampled = [course_run(0.8) for _ in range(5)]
    right = sum(all(ok for _, ok, _ in checks) for _, checks in sampled)
    print(f"{server.backend}: temperature 0.8: {right}/5 reached 16")
    assert right >= 4  # on CPU (transformers, temperature 0.8, top_p 1): 20/20


def test_held_out_tool_calls(server):
    import random

    rng = random.Random(11)
    cases = [(rng.randint(0, 99), rng.randint(0, 99), rng.randint(1, 20)) for _ in range(10)]
    good = 0
    for a, b, c in cases:
        run = tools.run_tool_loop(server.client(), server.model_name, f"Compute ({a}+{b})*{c}", temperature=0.0)
        good += all(ok for _, ok, _ in tools.check_chain(run, a, b, c))
    print(f"{server.backend}: {good}/{len(cases)} held-out (a+b)*c fully right through the tools")
    assert good >= 8  # on CPU (transformers, greedy): 20/20 of another held-out set (tests/test_trained.py)


def test_story_and_stop_without_max_tokens(server):
    """The course's curl-style request without max_tokens: the model stops by itself, with a 250-400 char story."""
    from labkit.serve import curl

    body = {"model": server.model_name, "temperature": 0.8,
            "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}]}
    reply = curl(f"{server.openai_url}/chat/completions", body)
    choice = reply["choices"][0]
    text = choice["message"]["content"]
    print(server.backend, choice["finish_reason"], len(text), text)
    assert choice["finish_reason"] == "stop"
    assert corpus.STORY_MIN <= len(text) <= corpus.STORY_MAX
    hello = curl(f"{server.openai_url}/chat/completions",
                 {"model": server.model_name, "messages": [{"role": "user", "content": "Hello!"}]})
    assert hello["choices"][0]["finish_reason"] == "stop" and "TinyChat" in hello["choices"][0]["message"]["content"]


@pytest.mark.parametrize("backend", suite_backends())
def test_awq_perplexity_on_the_engine(tmp_path, backend):
    """AWQ made on the GPU, served by the suite's engine: perplexity within the lab's bound of the original's."""
    from labkit import quant
    from labkit.engine import Engine
    from labkit.models import resolve

    model_dir = resolve(TRAINED)
    backend = _backend_or_skip(backend, model_dir)
    awq_dir = quant.awq(model_dir, work_dir=tmp_path / "awq", calib_samples=8, calib_seqlen=128)
    ppl = {}
    for label, folder in (("bf16", model_dir), ("awq", awq_dir)):
        with Engine(folder, backend=backend, name="test-trained-ppl", cache_ratio=0.05) as eng:
            ppl[label] = quant.perplexity(eng, seqlen=256, windows=8)
    print(f"{backend}: perplexity on held-out generated text: bf16 {ppl['bf16']:.4f}, AWQ {ppl['awq']:.4f} "
          f"(x{ppl['awq'] / ppl['bf16']:.4f})")
    assert ppl["bf16"] < quant.TRAINED_PPL_MAX
    assert ppl["awq"] <= quant.AWQ_PPL_BOUND * ppl["bf16"]


KV_CHILD = """
import sys
from labkit.kvquality import kv_quality
policies = tuple(int(p) for p in sys.argv[3].split(","))
print("TABLE", kv_quality(sys.argv[1], policies=policies, backend=sys.argv[2]).to_json(orient="records"), flush=True)
"""


@pytest.mark.parametrize("backend", suite_backends())
def test_kv_cache_int8_int4_quality(backend):
    """KV int8 / int4 against fp16 on the trained model: greedy replies' token agreement and perplexity. In a child
    process: TurboMind aborted the whole pytest process here once (SIGABRT), so an abort is this test's failure, with
    the engine's last lines."""
    import json
    import signal
    import subprocess
    import sys

    import pandas as pd

    from labkit import kvcache
    from labkit.engine import check_options
    from labkit.kvquality import kv_checks
    from labkit.models import resolve

    model_dir = resolve(TRAINED)
    backend = _backend_or_skip(backend, model_dir)
    policies = (0, 8, 4)
    if backend == "turbomind" and kvcache.ModelShape.from_dir(model_dir).head_dim in kvcache.TM_INT4_ABORTS:
        with pytest.raises(kvcache.OptionError, match="TurboMind aborts the whole process on an int4 KV cache"):
            check_options(0.05, 4, backend="turbomind", model_dir=model_dir)  # refused before it loads
        policies = (0, 8)
    child = subprocess.run([sys.executable, "-c", KV_CHILD, str(model_dir), backend, ",".join(map(str, policies))],
                           capture_output=True, text=True, timeout=480)
    out = child.stdout + child.stderr
    if child.returncode != 0:
        how = (f"killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0
               else f"exit code {child.returncode}")
        pytest.fail(f"kv_quality on {backend} {how}; its last lines:\n" + "\n".join(out.splitlines()[-25:]))
    table = pd.DataFrame(json.loads(out.split("TABLE ", 1)[1].splitlines()[0]))
    print(table.to_string())
    checks = kv_checks(table)  # the bounds and why: labkit.kvquality (tests/test_kvcache.py feeds them broken tables)
    print(checks)
    assert all(ok for _, ok, _ in checks), checks
