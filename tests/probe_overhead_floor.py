"""The measurement's floor under lab 01's overhead check, on the GPU (not part of the suite: run it by name,
`scripts/gpu-suite.sh --backend turbomind tests/probe_overhead_floor.py -m gpu -s`): raw lmdeploy paired against
itself (the null), against itself with labkit's GenerationConfig, under deadline.guarded, and labkit's whole path.
Prints the rows of docs/benchmarks.md's floor table; asserts nothing (a measurement, not a check)."""
import time

import pytest

from labkit import bench, deadline

pytestmark = pytest.mark.gpu


def test_probe_overhead_breakdown():
    from lmdeploy import GenerationConfig

    from labkit.engine import Engine, gen_config

    with Engine("generated:tiny-internlm2", name="probe", cache_ratio=0.1, eager=False) as eng:
        prompts = ["Tell me about the sea."] * 8
        raw_cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True, do_sample=False)
        lab_cfg = gen_config(max_new_tokens=32, temperature=0, ignore_eos=True)
        print("PROBE cfgs:", raw_cfg, "|||", lab_cfg)

        def t(fn):
            def run():
                s = time.perf_counter()
                fn()
                return time.perf_counter() - s
            return run
        raw = t(lambda: eng.pipe(prompts, gen_config=raw_cfg))
        rawlab = t(lambda: eng.pipe(prompts, gen_config=lab_cfg))
        guarded = t(lambda: deadline.guarded(lambda: eng.pipe(prompts, gen_config=raw_cfg), 600, "p", ""))
        gen = t(lambda: eng.generate(prompts, max_new_tokens=32, temperature=0, ignore_eos=True))
        for _ in range(3):
            raw(), rawlab(), guarded(), gen()
        for name, a, b in [("raw vs raw", raw, raw), ("raw(lab cfg) vs raw", rawlab, raw),
                           ("guarded(raw) vs raw", guarded, raw), ("generate vs raw", gen, raw)]:
            c = bench.paired(a, b, seconds=12, min_pairs=60)
            print(f"PROBE {eng.backend}: {name}: {c['overhead %']:+.2f}% over {c['pairs']} pairs "
                  f"(noise +/-{c['noise bound %']:.2f}%), {c['raw lmdeploy s'] * 1000:.2f} ms raw")
