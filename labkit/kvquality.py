"""What KV-cache quantization (`quant_policy` 8 = int8, 4 = int4) costs in quality, measured on a model that
learned its text (labkit's trained model): greedy replies compared token by token with the fp16 cache's,
and perplexity on held-out text, one engine per policy (GPU). Used by the GPU suite and lab 04's numbers.

    kv_quality(resolve("trained:tiny-chat"), policies=(0, 8, 4))   # a table, one row per policy
"""
from __future__ import annotations

from pathlib import Path

from labkit.errors import InputError

PROMPTS = ("Write a short story about a lighthouse.", "Write a short story about a fox.",
           "Tell me a short story about the sea.", "Introduce yourself", "What is 12 + 30?",
           "Write a story of about 300 characters about a violin.")


def _agreement(ref: list[int], got: list[int]) -> float:
    """Share of the reference reply's tokens that the other reply matches before it first differs."""
    same = 0
    for x, y in zip(ref, got):
        if x != y:
            break
        same += 1
    return same / max(1, len(ref))


def kv_quality(model_dir: str | Path, policies: tuple[int, ...] = (0, 8, 4), backend: str = "pytorch",
               new_tokens: int = 160, ppl_windows: int = 8, cache_ratio: float = 0.05):
    """One row per quant_policy: token agreement of greedy replies with policy 0's, perplexity (a table)."""
    import pandas as pd

    from labkit.engine import Engine
    from labkit.quant_quality import perplexity

    if 0 not in policies:
        raise InputError("policies must include 0 (the fp16 KV cache every other row is compared with)")
    from labkit.engine import check_options, choose_backend

    chosen = choose_backend(model_dir, backend)[0]
    for policy in policies:  # every policy checked before the first engine loads
        check_options(cache_ratio, policy, backend=chosen, model_dir=model_dir)
    replies: dict[int, list[list[int]]] = {}
    rows = []
    for policy in sorted(policies, key=lambda p: p != 0):
        with Engine(model_dir, backend=chosen, name="kv-quality", quant_policy=policy,
                    cache_ratio=cache_ratio) as eng:
            out = eng.generate(list(PROMPTS), max_new_tokens=new_tokens, temperature=0.0)
            replies[policy] = [list(r.token_ids) for r in out]
            ppl = perplexity(eng, seqlen=256, windows=ppl_windows)
        ref = replies[0]
        rows.append({"quant_policy": policy, "KV cache": {0: "fp16/bf16", 8: "int8", 4: "int4"}.get(policy, policy),
                     "token agreement": round(sum(_agreement(r, g) for r, g in zip(ref, replies[policy]))
                                              / len(ref), 4),
                     "perplexity": round(ppl, 4), "backend": eng.backend})
    return pd.DataFrame(rows)
