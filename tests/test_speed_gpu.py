"""Lab 01's two speed claims on a GPU, where they can be measured: LMDeploy is faster than transformers
(bench-1.5b, a Qwen2-1.5B-shaped model, batch 8), and labkit's whole call path costs less than a fixed
tolerance over raw lmdeploy (the trained model), a check shown failing on a path slowed on purpose. Both with CUDA
graphs, as students run (the test profile's eager mode, which saves start time elsewhere, made the PyTorch engine 1.1x
transformers on 2026-12-01: launch-bound, not what lab 01 claims)."""
from __future__ import annotations

import pytest

from labkit import bench
from helpers import TRAINED

pytestmark = pytest.mark.gpu


def test_lmdeploy_is_faster_than_transformers_on_bench_1_5b():
    from labkit.baseline import HFEngine
    from labkit.engine import Engine

    sizes = dict(batch_sizes=(8,), prompt_tokens=64, new_tokens=64, repeats=2)
    with HFEngine("generated:bench-1.5b", name="test-speed-hf") as hf:
        hf_speed = bench.measure(hf, **sizes)
    with Engine("generated:bench-1.5b", name="test-speed", cache_ratio=0.2, eager=False) as eng:  # CUDA graphs
        lmd_speed = bench.measure(eng, **sizes)
    ratio = float(bench.compare(hf_speed, lmd_speed).filter(like=" / ").iloc[-1, 0])
    print(f"bench-1.5b batch 8: transformers {hf_speed['output tok/s'].iloc[0]:.0f} tok/s, LMDeploy "
          f"{lmd_speed['output tok/s'].iloc[0]:.0f} tok/s ({ratio:.1f}x, {eng.backend})")
    assert ratio > 2


def test_overhead_check_passes_and_fails_a_slowed_path():
    from labkit.engine import Engine

    with Engine(TRAINED, name="test-overhead", cache_ratio=0.05, eager=False) as eng:  # CUDA graphs, as students
        cost = bench.overhead(eng, batch=8, new_tokens=32, seconds=30)
        what, ok, detail = bench.overhead_check(cost)
        print(what, ok, detail)
        assert ok, detail
        slow = bench.overhead(eng, batch=8, new_tokens=32, seconds=10,
                              slowdown_s=0.1 * cost["raw lmdeploy s"])  # a wrapper 10% slower
        print("slowed:", bench.overhead_check(slow))
        assert not bench.overhead_check(slow)[1]
        assert slow["overhead %"] > bench.OVERHEAD_TOLERANCE_PCT  # it fails for being slow, not for noise
