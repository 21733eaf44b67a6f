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


# Agreement counts each of the 6 greedy replies up to its first token that differs, so one early divergence costs up
# to 1/6. Measured on 2026-12-01 (trained tiny-chat): int8 0.941 (PyTorch engine) and 0.886 (TurboMind, under the
# former bound of 0.9, which PyTorch's int4 at 0.911 passed too: it told nothing apart); perplexity, within 0.2% of
# fp16 on both engines, is the tighter check.
INT8_AGREEMENT_MIN, INT4_AGREEMENT_MIN, INT8_PPL_BOUND = 0.8, 0.6, 1.1


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


def kv_checks(table) -> list[tuple[str, bool, str]]:
    """The checks on a `kv_quality` table, (what, passed, measured) each: int8 (and int4, where measured) agree with
    fp16's greedy replies, and int8's perplexity stays within INT8_PPL_BOUND of fp16's."""
    rows = table.set_index("quant_policy")
    if 0 not in rows.index or 8 not in rows.index:
        raise InputError("the table needs the rows of quant_policy 0 and 8 (kv_quality(policies=(0, 8, ...)))")
    out = [(f"int8 KV: greedy replies agree with fp16's at {INT8_AGREEMENT_MIN} or more",
            rows.loc[8, "token agreement"] >= INT8_AGREEMENT_MIN, f"{rows.loc[8, 'token agreement']}"),
           (f"int8 KV: perplexity within {INT8_PPL_BOUND}x of fp16's",
            rows.loc[8, "perplexity"] <= INT8_PPL_BOUND * rows.loc[0, "perplexity"],
            f"{rows.loc[0, 'perplexity']} -> {rows.loc[8, 'perplexity']}")]
    if 4 in rows.index:
        out.append((f"int4 KV: greedy replies agree with fp16's at {INT4_AGREEMENT_MIN} or more",
                     rows.loc[4, "token agreement"] >= INT4_AGREEMENT_MIN, f"{rows.loc[4, 'token agreement']}"))
    return out
