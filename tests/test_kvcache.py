"""labkit.kvcache (labs 00, 04): the capacity predictor against hand arithmetic and against lmdeploy 0.18's
own executor and cache-plan code (on CPU), bad input. On a GPU, lab 04 checks it against real engines."""
from __future__ import annotations


import pytest

from labkit import kvcache, kvsweep
from labkit.kvcache import ModelShape
from helpers import one_line

GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def bench_shape_dir(tmp_path_factory):
    """The config of generated:bench-1.5b (Qwen2-1.5B shape) without weights: enough for the arithmetic."""
    from transformers import Qwen2Config

    from labkit.generate import SPECS

    s = SPECS["bench-1.5b"]
    d = tmp_path_factory.mktemp("bench-shape")
    cfg = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=s.max_positions, tie_word_embeddings=True)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(d)
    return d


def test_shape_reads_vocab(tiny_dir):
    assert ModelShape.from_dir(tiny_dir) == ModelShape(layers=2, kv_heads=2, head_dim=64, dtype_bytes=2, vocab=4096)


def test_shape_reads_every_kind_of_text_config(tiny_dir, tmp_path):
    """A vision model's text part under text_config, llm_config or language_config: the same shape."""
    import json

    inner = json.loads((tiny_dir / "config.json").read_text())
    for key in ("text_config", "llm_config", "language_config"):
        d = tmp_path / key
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["SomeVLModel"], key: inner,
                                                   "vision_config": {"hidden_size": 32}}))
        assert ModelShape.from_dir(d) == ModelShape.from_dir(tiny_dir), key
        assert kvcache.text_config(d)["architectures"] == ["SomeVLModel"]


def test_weights_bytes_counts_every_weight_pattern(tmp_path):
    from labkit.models import WEIGHT_PATTERNS

    for i, pattern in enumerate(WEIGHT_PATTERNS):
        (tmp_path / pattern.replace("*", f"w{i}")).write_bytes(b"x" * (10 ** i))
    (tmp_path / "config.json").write_text("{}")
    assert kvcache.weights_bytes(tmp_path) == sum(10 ** i for i in range(len(WEIGHT_PATTERNS)))


def test_bytes_per_token_is_a_block_over_its_tokens(tiny_dir):
    shape = ModelShape.from_dir(tiny_dir)  # blocks by hand in test_block_bytes_by_hand: 65536, 34816, 18432 bytes
    assert [kvcache.bytes_per_token(shape, p) for p in (0, 8, 4)] == [65536 / 64, 34816 / 64, 18432 / 64]
    wide = ModelShape(layers=1, kv_heads=1, head_dim=512)  # head_dim >= 512: blocks of 32 tokens
    assert kvcache.bytes_per_token(wide, 0) == kvcache.block_bytes(wide, 0) / 32 == 2 * 512 * 2
    padded = ModelShape(layers=1, kv_heads=1, head_dim=2)  # int8 K, V and scale+zero each padded to 256 bytes
    assert kvcache.bytes_per_token(padded, 8) == 4 * 256 / 64 == 16  # not 2 * (2 + 2 * 2) = 12 unpadded


def test_per_token_table(tiny_dir):
    table = kvcache.per_token_table(tiny_dir)
    assert list(table.columns) == ["quant_policy", "kv policy", "bytes per token", "vs fp16"]
    assert table["quant_policy"].tolist() == [0, 4, 8, 16, 17, 42]
    assert table["kv policy"].tolist()[:4] == ["0 (fp16/bf16 KV)", "4 (int4 KV)", "8 (int8 KV)", "16 (fp8 e4m3 KV)"]
    # 2 layers x 2 KV heads x (K + V) per token; TurboQuant: K 32 B + V 16 B + scales 4 B + 2 B a head
    assert table["bytes per token"].tolist() == [1024, 288, 544, 512, 512, 216]
    assert table["vs fp16"].tolist() == [1.0, 1024 / 288, 1024 / 544, 2.0, 2.0, 1024 / 216]
    assert table.equals(kvcache.per_token_table(ModelShape.from_dir(tiny_dir)))


def test_gain_vs_fp16_from_a_runs_table(tiny_dir):
    """A runs table shaped like sweep's (tokens per KV GiB from the predictor): the gain is the per-token ratio."""
    import pandas as pd

    rows = []
    for ratio, policy in [(0.8, 0), (0.1, 0), (0.4, 8), (0.4, 4)]:
        got = kvcache.predict(tiny_dir, ratio, policy, free_bytes=8 * GiB, max_batch_size=128)
        rows.append({"quant_policy": policy, "tokens per KV GiB": got["tokens"] / (got["kv_bytes"] / GiB)})
    gain = kvcache.gain_vs_fp16(pd.DataFrame(rows))
    per_token = kvcache.per_token_table(tiny_dir).set_index("quant_policy")["vs fp16"]
    assert sorted(gain) == [4, 8]
    assert gain == pytest.approx({4: per_token[4], 8: per_token[8]})
    assert kvcache.gain_vs_fp16(pd.DataFrame(rows[:3])) == pytest.approx({8: per_token[8]})
    with pytest.raises(ValueError, match="no quant_policy 0"):
        kvcache.gain_vs_fp16(pd.DataFrame(rows[2:]))


def test_block_bytes_by_hand(tiny_dir):
    shape = ModelShape.from_dir(tiny_dir)  # 2 layers, 2 KV heads, head_dim 64, bf16; blocks of 64 tokens
    # fp16: K and V each 64 tokens x 2 heads x 64 dims x 2 bytes = 16384 (a multiple of 256); x 2 x 2 layers
    assert kvcache.block_bytes(shape, 0) == (16384 + 16384) * 2 == 65536
    # int8: K, V 64 x 2 x 64 x 1 byte = 8192 each; scale+zero 64 x 2 heads x 2 values x 2 bytes = 512 each
    assert kvcache.block_bytes(shape, 8) == (8192 * 2 + 512 * 2) * 2 == 34816
    # int4: two values per byte -> 4096 each, same scale+zero
    assert kvcache.block_bytes(shape, 4) == (4096 * 2 + 512 * 2) * 2 == 18432
    # padding to 256 bytes shows with odd sizes: 1 head of 8 dims -> 64*8*2 = 1024 fp16, int4 64*4 = 256,
    # int4 scale+zero 64*1*2*2 = 256; int8 K 64*8 = 512
    odd = ModelShape(layers=1, kv_heads=1, head_dim=8)
    assert kvcache.block_bytes(odd, 0) == 2048 and kvcache.block_bytes(odd, 4) == 256 * 4
    tiny_heads = ModelShape(layers=1, kv_heads=1, head_dim=2)  # K 64*2*2 = 256; int8 K = 128 -> padded 256
    assert kvcache.block_bytes(tiny_heads, 8) == 256 * 4


def test_predict_by_hand(tiny_dir):
    # lmdeploy 0.18 executor/base.py: runtime = (max_prefill_token_num + 2 * max_batches) * vocab * 2;
    # blocks = int((free - runtime) * ratio) // block_bytes, halving max_prefill_token_num until >= 16 blocks.
    got = kvcache.predict(tiny_dir, 0.5, 0, free_bytes=GiB, max_batch_size=128)
    runtime = (8192 + 2 * 128) * 4096 * 2
    assert runtime == 69_206_016 == got["runtime_bytes"]
    assert int((GiB - runtime) * 0.5) // 65536 == 7664 == got["blocks"]
    assert got["tokens"] == 7664 * 64 and got["kv_bytes"] == 7664 * 65536
    # 80 MiB free, ratio 0.05: with 8192 prefill tokens only 11 blocks fit, so the engine halves to 4096
    small = kvcache.predict(tiny_dir, 0.05, 0, free_bytes=80 * MiB, max_batch_size=128)
    assert int((80 * MiB - runtime) * 0.05) // 65536 == 11
    assert (small["max_prefill_token_num"], small["blocks"]) == (4096, int((80 * MiB - 35_651_584) * 0.05) // 65536)
    assert small["blocks"] == 36


@pytest.mark.parametrize("gpu_name", ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-40GB",
                                      "NVIDIA A800 80GB PCIe", "NVIDIA L20Y", "NVIDIA GeForce RTX 4090", "Tesla T4"])
def test_default_max_batch_size_is_lmdeploys(gpu_name, monkeypatch):
    """labkit's table against lmdeploy's own get_max_batch_size, asked about the same device name."""
    import torch
    from lmdeploy.utils import get_max_batch_size

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: gpu_name)
    assert kvcache.default_max_batch_size(gpu_name) == get_max_batch_size("cuda")


@pytest.fixture
def lmdeploy_on_cpu(monkeypatch):
    """lmdeploy's ModelConfig asks CUDA whether bf16 works; say yes so its real config/plan code runs on CPU."""
    import lmdeploy.pytorch.config as lmd_config

    monkeypatch.setattr(lmd_config, "is_bf16_supported", lambda *a, **k: True)
    return lmd_config


@pytest.mark.parametrize("which", ["tiny", "bench"])
def test_block_bytes_match_lmdeploys_cache_plan(which, tiny_dir, bench_shape_dir, lmdeploy_on_cpu):
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan

    model_dir = tiny_dir if which == "tiny" else bench_shape_dir
    mc = lmdeploy_on_cpu.ModelConfig.from_pretrained(str(model_dir), dtype="auto", device_type="cuda", block_size=64)
    shape = ModelShape.from_dir(model_dir)
    for policy in (0, 4, 8, 16, 17, 42):  # every policy lmdeploy 0.18 knows
        cc = lmdeploy_on_cpu.CacheConfig(max_batches=128, block_size=64, num_cpu_blocks=0, num_gpu_blocks=0,
                                         quant_policy=QuantPolicy(policy))
        theirs = build_block_cache_plan(mc, cc, 1).logical_block_nbytes  # allocates one block on 'meta'
        assert kvcache.block_bytes(shape, policy) == theirs, (which, policy)
        assert kvcache.block_bytes(shape, 8 if policy == 0 else 0) != theirs  # a formula of the wrong policy fails


CASES = [(GiB, 0.5, 0, 128), (80 * GiB, 0.1, 4, 1024), (80 * GiB, 0.8, 8, 1024), (80 * MiB, 0.05, 0, 128),
         (300 * MiB, 0.01, 8, 1024), (24 * GiB, 0.4, 4, 384)]


@pytest.mark.parametrize("free, ratio, policy, batches", CASES)
def test_predict_matches_lmdeploys_executor(free, ratio, policy, batches, tiny_dir, bench_shape_dir, lmdeploy_on_cpu):
    """lmdeploy's own ExecutorBase.update_configs, fed a stated free-memory reading, against predict()."""
    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan
    from lmdeploy.pytorch.engine.executor.base import ExecutorBase, _WorkerCachePlanSizes

    C = lmdeploy_on_cpu

    class StatedFreeMemory(ExecutorBase):
        """The real executor arithmetic; only the GPU reading and the worker calls are replaced."""

        def gather_free_mem(self):
            return [free]

        def _prepare_worker_cache_plans(self, cache_config, spec_cache_config=None):
            plan = build_block_cache_plan(self.model_config, cache_config, 1)
            return [_WorkerCachePlanSizes(plan.logical_block_nbytes)]

        def set_cache_config(self, *args):
            pass

        def set_model_config(self, *args):
            pass

    for model_dir in (tiny_dir, bench_shape_dir):
        mc = C.ModelConfig.from_pretrained(str(model_dir), dtype="auto", device_type="cuda", block_size=64)
        cc = C.CacheConfig(max_batches=batches, block_size=64, num_cpu_blocks=0, num_gpu_blocks=0,
                           cache_max_entry_count=ratio, quant_policy=QuantPolicy(policy))
        ex = StatedFreeMemory(str(model_dir), mc, cc, C.BackendConfig(), C.DistConfig(), C.MiscConfig())
        try:
            ex.update_configs()
            theirs = (cc.num_gpu_blocks, cc.max_prefill_token_num)
        except RuntimeError:  # no room: lmdeploy refuses to start
            with pytest.raises(ValueError):
                kvcache.predict(model_dir, ratio, policy, free_bytes=free, max_batch_size=batches)
            continue
        ours = kvcache.predict(model_dir, ratio, policy, free_bytes=free, max_batch_size=batches)
        assert (ours["blocks"], ours["max_prefill_token_num"]) == theirs, (model_dir.name, free, ratio, policy)


@pytest.mark.parametrize("ratio, policy, expect", [
    (1.5, 0, "must be in (0, 1]"), (0, 0, "must be in (0, 1]"), (-0.2, 8, "must be in (0, 1]"),
    (1.0, 0, "must be below 1"), (0.4, 3, "quant_policy must be one of [0, 4, 8, 16, 17, 42]"),
    (0.4, 5, "quant_policy must be one of"),
])
def test_bad_input_is_one_clear_line(ratio, policy, expect, tiny_dir):
    with pytest.raises(ValueError) as err:
        kvcache.predict(tiny_dir, ratio, policy, free_bytes=GiB)
    assert expect in one_line(err)


def test_no_room_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError) as err:
        kvcache.predict(tiny_dir, 0.01, 0, free_bytes=70 * MiB, max_batch_size=128)
    assert "no room for a KV cache" in one_line(err)


def test_sweep_checks_every_run_before_starting(tiny_dir):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kvsweep.sweep(tiny_dir, [[0.1, 0], [1.5, 8]], ["hi"])
    with pytest.raises(ValueError, match="quant_policy must be one of"):
        kvsweep.sweep(tiny_dir, [[0.1, 0], [0.1, 2]], ["hi"])
    with pytest.raises(ValueError, match="need a quant_policy 0 run"):
        kvsweep.sweep(tiny_dir, [[0.1, 8]], ["hi"])


def test_capacity_table_and_budget_still_work(tiny_dir):
    table = kvcache.capacity_table(tiny_dir, ratios=(0.4,), free_bytes=8 * GiB, max_batch_size=384)
    assert list(table["kv policy"])[:3] == ["0 (fp16/bf16 KV)", "4 (int4 KV)", "8 (int8 KV)"]
    fp16, int4, int8, fp8, fp8_e5m2, turbo = table["tokens that fit"]
    assert int8 / fp16 > 1.8 and int4 / fp16 > 3.4 and fp8 / fp16 > 1.9 and turbo / fp16 > 4.5
    assert table["bytes per token"].tolist() == kvcache.per_token_table(tiny_dir)["bytes per token"].tolist()
    budget = kvcache.budget(tiny_dir, ratio=0.8, gpu_free_gib=24)  # lab 00
    assert len(budget) == 3 and (budget["tokens that fit"] > 0).all()
    assert budget["kv bytes/token"].tolist() == [1024, 288, 544]  # the same figure as the block layout's


def test_agreement():
    assert kvsweep.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == (100.0, 3.0)
    same, prefix = kvsweep.agreement([[1, 2, 3], [4, 5, 6]], [[1, 9, 3], [0, 5, 6]])
    assert round(same, 2) == 66.67 and prefix == 0.5


def test_kv_quality_checks_pass_the_measured_tables_and_fail_broken_ones():
    """The GPU suite's KV quality bounds on the tables it measured (2026-12-01), then on broken ones."""
    import pandas as pd

    from labkit.errors import InputError
    from labkit.kvquality import kv_checks

    def table(*rows):
        return pd.DataFrame(rows, columns=["quant_policy", "token agreement", "perplexity"])

    pytorch = table((0, 1.0, 4.4253), (8, 0.9409, 4.4168), (4, 0.9106, 4.4093))
    turbomind = table((0, 1.0, 4.4232), (8, 0.8857, 4.4257))
    assert all(ok for _, ok, _ in kv_checks(pytorch)) and all(ok for _, ok, _ in kv_checks(turbomind))
    for broken, failing in ((table((0, 1.0, 4.42), (8, 0.30, 4.43)), "int8 KV: greedy replies agree"),
                            (table((0, 1.0, 4.42), (8, 0.95, 9.10)), "int8 KV: perplexity within"),
                            (table((0, 1.0, 4.42), (8, 0.95, 4.43), (4, 0.05, 40.0)), "int4 KV: greedy replies")):
        failed = [what for what, ok, _ in kv_checks(broken) if not ok]
        assert len(failed) == 1 and failed[0].startswith(failing), failed
    with pytest.raises(InputError, match="quant_policy 0 and 8"):
        kv_checks(table((0, 1.0, 4.42)))


# On a GPU, notebooks/04_kv_cache.ipynb checks the predictor against real engines (blocks within 10%, the
# engine's own block count per KV policy); the GPU suite runs it there rather than starting another engine here.


def test_fp8_on_turbomind_is_refused_by_labkit_and_by_lmdeploy():
    """labkit says it in one line before lmdeploy's own assert would."""
    from lmdeploy import TurbomindEngineConfig

    from labkit.engine import engine_config

    with pytest.raises(ValueError) as err:
        engine_config("turbomind", quant_policy=16)
    assert "PyTorch engine only" in one_line(err)
    with pytest.raises(Exception, match="FP8 quantization is not supported"):  # pydantic's ValidationError
        TurbomindEngineConfig(quant_policy=16)
    with pytest.raises(ValueError) as err:  # lmdeploy's config takes 42; TurboMind's kernels would run it as int8
        engine_config("turbomind", quant_policy=42)
    assert "42 would run as int8" in one_line(err)
    assert int(TurbomindEngineConfig(quant_policy=42).quant_policy) == 42
    assert int(engine_config("pytorch", quant_policy=17).quant_policy) == 17
    assert int(engine_config("pytorch", quant_policy=42).quant_policy) == 42


# ----------------------------------------------------------------------------- every lmdeploy 0.18 KV policy

def test_labkit_knows_exactly_lmdeploys_kv_policies():
    from lmdeploy.messages import QuantPolicy

    assert sorted(kvcache.KV_POLICIES) == sorted(int(p) for p in QuantPolicy)


@pytest.mark.parametrize("policy", [0, 4, 8, 16, 17, 42])
def test_the_pytorch_engine_takes_every_policy(policy):
    assert kvcache.check_policy(policy, "pytorch", head_dim=64) == policy
    from labkit.engine import engine_config

    assert int(engine_config("pytorch", 0.5, policy).quant_policy) == policy  # lmdeploy's own config takes it


@pytest.mark.parametrize("policy, match", [(16, "refused by TurboMind"), (17, "refused by TurboMind"),
                                           (42, "PyTorch engine only")])
def test_turbomind_refuses_fp8_and_turboquant_with_the_engines_reason(policy, match):
    with pytest.raises(kvcache.OptionError, match=match) as err:
        kvcache.check_policy(policy, "turbomind")
    assert "\n" not in str(err.value)
    if policy in (16, 17):  # lmdeploy's own TurbomindEngineConfig refuses them the same way
        from lmdeploy import TurbomindEngineConfig

        with pytest.raises(ValueError, match="FP8 quantization is not supported"):  # pydantic's ValidationError
            TurbomindEngineConfig(quant_policy=policy)
    assert kvcache.check_policy(8, "turbomind") == 8


def test_turbomind_int4_is_refused_where_it_aborted_and_taken_elsewhere():
    """head_dim 64 aborted TurboMind with int4 (the GPU suite's kv_quality test): refused before anything loads, on
    TurboMind only; the course model's head_dim 128 and the PyTorch engine take it."""
    from labkit.engine import check_options
    from labkit.models import resolve

    with pytest.raises(kvcache.OptionError, match="aborts the whole process on an int4 KV cache .* head_dim 64") as err:
        check_options(0.05, 4, backend="turbomind", model_dir=resolve("trained:tiny-chat"))  # head_dim 64
    assert "\n" not in str(err.value) and "quant_policy 8" in str(err.value)
    assert kvcache.check_policy(4, "turbomind", head_dim=128) == 4
    assert kvcache.check_policy(4, "pytorch", head_dim=64) == 4
    check_options(0.05, 8, backend="turbomind", model_dir=resolve("trained:tiny-chat"))


def test_turboquant_needs_a_power_of_two_head_dim():
    with pytest.raises(kvcache.OptionError, match="power-of-two head_dim.*96"):
        kvcache.check_policy(42, "pytorch", head_dim=96)
    assert kvcache.check_policy(42, "pytorch", head_dim=128) == 42


@pytest.mark.parametrize("bad", [3, 1, 32, -1, "4", True, None, 4.5])
def test_other_policies_are_refused(bad):
    with pytest.raises(kvcache.OptionError, match="quant_policy must be one of"):
        kvcache.check_policy(bad)


def test_block_bytes_of_the_new_policies_follow_lmdeploys_layout():
    shape = kvcache.ModelShape(layers=1, kv_heads=1, head_dim=128)
    fp16 = kvcache.block_bytes(shape, 0, 64)
    assert kvcache.block_bytes(shape, 16, 64) == kvcache.block_bytes(shape, 17, 64) == fp16 // 2  # 1 byte a value
    assert kvcache.block_bytes(shape, 42, 64) < kvcache.block_bytes(shape, 4, 64)  # V at 2 bits
