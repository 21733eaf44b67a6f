"""Quality of a quantized model (lab 03), measured so that a bad quantization fails:

- on any machine: the AWQ weights dequantized with lmdeploy's own W4A16 formula into a copy of the model
  (every quantized linear weight must be overwritten, with as many groups as the config says), then
  perplexity of both models and next-token agreement on held-out text;
- on a GPU: lmdeploy's `pipeline.get_ppl`, and the lab-03 row of memory and speed.

Held-out text: for a model labkit trained, conversations of the same generator with another seed (the
model's own kind of text, never seen in training or calibration); for other models labkit/data/heldout.txt.
`broken_copy(awq_dir, how)` makes the deliberately broken quantizations the checks must reject.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from labkit import config
from labkit.backends import needs_remote_code
from labkit.gpu import GiB
from labkit.quant_calib import QuantError

__all__ = ["AWQ_PPL_BOUND", "AGREEMENT_MIN", "TRAINED_PPL_MAX", "BREAKS", "heldout_text", "default_text",
           "dequantized_model", "next_token_agreement", "quality", "quality_checks", "broken_copy",
           "broken_quality", "perplexity", "profile_engine"]

AWQ_PPL_BOUND = 1.10     # AWQ perplexity at most 10% above the original's (trained model, held-out text)
AGREEMENT_MIN = 0.90     # AWQ's top next token equals the original's at 90% of positions or more
TRAINED_PPL_MAX = 10.0   # a model that learned its text (the shipped one: 4.7); a random one scores about its vocabulary size (4,000+)
BREAKS = ("scales x3", "dropped tensor", "wrong group size")
HELDOUT_CONVERSATIONS = 300


def heldout_text(arch: str = "qwen2") -> Path:
    """Held-out generated conversations (another seed than training), rendered as `arch`'s models read them."""
    from labkit import corpus, train

    suffix = "" if arch == "qwen2" else f"-{arch}"
    path = config.home() / "heldout" / f"chat-c{corpus.CORPUS_VERSION}-s{train.HELDOUT_SEED}{suffix}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        texts = train.render(corpus.conversations(HELDOUT_CONVERSATIONS, train.HELDOUT_SEED), arch=arch)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(texts), encoding="utf-8")
        tmp.replace(path)
    return path


def default_text(model_dir: str | Path) -> Path:
    """The held-out text for a model: its generator's held-out conversations if labkit trained it."""
    from labkit.train import arch_of, is_trained

    return heldout_text(arch_of(model_dir)) if is_trained(model_dir) else config.data_file("heldout.txt")


def _windows(tokenizer, text_path: Path, seqlen: int, windows: int | None) -> list[list[int]]:
    ids = tokenizer(Path(text_path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    n = len(ids) // seqlen
    if n < 1:
        raise QuantError(f"{Path(text_path).name} has {len(ids)} tokens, fewer than one window of {seqlen}: "
                         f"lower seqlen")
    n = n if windows is None else min(n, windows)
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]


def dequantized_model(awq_dir: str | Path, original_dir: str | Path, dtype: str = "float32"):
    """A transformers model whose weights are the AWQ model's, dequantized with lmdeploy's own W4A16 formula (CPU).

    Every linear layer of the transformer blocks must come from the AWQ files (QuantError otherwise): a
    missing tensor would silently keep the original's weight and look like a perfect quantization."""
    import torch
    from lmdeploy.pytorch.backends.default.awq_modules import dequantize_gemm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    awq_dir = Path(awq_dir)
    qcfg = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    remote = needs_remote_code(original_dir)
    model = AutoModelForCausalLM.from_pretrained(str(original_dir), dtype=getattr(torch, dtype),
                                                 trust_remote_code=remote).eval()
    state: dict[str, Any] = {}
    for f in sorted(awq_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    weights: dict[str, Any] = {}
    for name, t in state.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            if p + ".qzeros" not in state or p + ".scales" not in state:
                raise QuantError(f"{awq_dir.name} has {name} but not its qzeros / scales: the AWQ files are "
                                 f"incomplete; quantize again")
            scales, in_features = state[p + ".scales"], t.shape[0]
            if in_features % qcfg["group_size"] or scales.shape[0] != in_features // qcfg["group_size"]:
                raise QuantError(f"{p} has {scales.shape[0]} scale groups over {in_features} input channels, but "
                                 f"config.json says group_size {qcfg['group_size']}: the quantization config does "
                                 f"not match the weights; quantize again")
            w = dequantize_gemm(t, state[p + ".qzeros"], scales, qcfg["bits"], qcfg["group_size"])
            weights[p + ".weight"] = w.t().contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            weights[name] = t  # norms (AWQ folded its smoothing scales into them), embeddings, biases
    target = model.state_dict()
    foreign = [k for k in weights if k not in target]
    if foreign:
        raise QuantError(f"the AWQ weights do not match {Path(original_dir).name}'s layout ({foreign[:3]}...): "
                         f"was {awq_dir.name} made from this model?")
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(target) - set(weights) - tied)
    if missing:
        raise QuantError(f"{awq_dir.name} lacks {len(missing)} tensor(s) of the model ({', '.join(missing[:3])}...): "
                         f"the quantization is incomplete, so its quality cannot be measured; quantize again")
    if tied:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in weights.items()}, strict=True)
    return model


def next_token_agreement(original: str | Path, quantized: str | Path, text: str | Path | None = None,
                         seqlen: int = 256, windows: int = 2) -> dict:
    """Top-1 agreement, KL(original || AWQ) and both perplexities on held-out text (runs on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from labkit.kvcache import weights_bytes
    from labkit.models import resolve

    original = resolve(str(original))
    remote = needs_remote_code(original)
    dtype = "float32" if weights_bytes(original) < GiB else "bfloat16"
    tok = AutoTokenizer.from_pretrained(str(original), trust_remote_code=remote)
    text_path = Path(text or default_text(original))
    ids = torch.tensor(_windows(tok, text_path, seqlen, windows))
    start = time.perf_counter()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(original), dtype=getattr(torch, dtype),
                                                   trust_remote_code=remote).eval()
        a = ref(ids).logits.float().log_softmax(-1)
        del ref
        b = dequantized_model(quantized, original, dtype)(ids).logits.float().log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float()
    nxt = ids[:, 1:].unsqueeze(-1)
    ppl = [math.exp(float(-x[:, :-1].gather(-1, nxt).mean())) for x in (a, b)]
    return {"tokens": int(ids.numel()), "text": text_path.name, "top-1 agreement": float(agree.mean()),
            "KL mean (nats)": float(kl.mean()), "KL max (nats)": float(kl.max()), "chance agreement": 1 / a.shape[-1],
            "perplexity original": round(ppl[0], 4), "perplexity quantized": round(ppl[1], 4),
            "perplexity ratio": round(ppl[1] / ppl[0], 4),
            "entropy of original (nats)": float(-(a.exp() * a).sum(-1).mean()),
            "seconds": round(time.perf_counter() - start, 1), "dtype": dtype}


def quality(original: str | Path, quantized: str | Path, **kw: Any) -> dict:
    """next_token_agreement, or {'error': why} when the AWQ folder cannot even be read as this model."""
    try:
        return next_token_agreement(original, quantized, **kw)
    except (QuantError, RuntimeError, KeyError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}


def quality_checks(q: dict, trained: bool = True) -> list[tuple[str, bool, str]]:
    """Lab 03's quality checks on a `quality()` result: (what, passed, detail) each; any can fail."""
    if "error" in q:
        return [("the AWQ weights load as this model, every quantized linear included", False, q["error"])]
    ratio = q["perplexity ratio"]
    out = [(f"AWQ perplexity within {AWQ_PPL_BOUND - 1:.0%} of the original's", ratio <= AWQ_PPL_BOUND,
            f"{q['perplexity original']} -> {q['perplexity quantized']} (x{ratio})"),
           (f"AWQ picks the original's next token at {AGREEMENT_MIN:.0%} of positions or more",
            q["top-1 agreement"] >= AGREEMENT_MIN, f"{q['top-1 agreement']:.1%} of {q['tokens']} tokens")]
    if trained:
        out.insert(0, (f"the original is a trained model: perplexity below {TRAINED_PPL_MAX}",
                       q["perplexity original"] < TRAINED_PPL_MAX,
                       f"{q['perplexity original']} on {q['text']} (a random model scores about its vocabulary)"))
    return out


def broken_copy(awq_dir: str | Path, how: str, out: str | Path) -> Path:
    """A deliberately broken copy of an AWQ folder: 'scales x3', 'dropped tensor' or 'wrong group size'."""
    import torch
    from safetensors.torch import load_file, save_file

    if how not in BREAKS:
        raise QuantError(f"unknown break {how!r}: choose one of {', '.join(BREAKS)}")
    awq_dir, out = Path(awq_dir), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(awq_dir, out)
    files = sorted(out.glob("*.safetensors"))
    if how == "wrong group size":
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"]["group_size"] //= 2
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        return out
    for f in files:
        state = load_file(str(f))
        if how == "scales x3":
            state = {k: (v * 3 if k.endswith(".scales") else v) for k, v in state.items()}
        else:  # one MLP projection of the last layer gone, its qweight, qzeros and scales
            # the last layer's down projection: Qwen2 / Llama name it mlp.down_proj, InternLM2 feed_forward.w2
            victim = sorted(k for k in state if k.endswith(("mlp.down_proj.qweight", "feed_forward.w2.qweight")))
            if not victim:
                raise QuantError(f"{awq_dir.name} has no down projection (mlp.down_proj / feed_forward.w2) to drop")
            victim = victim[-1][: -len(".qweight")]
            state = {k: v for k, v in state.items() if not k.startswith(victim + ".")}
        save_file({k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, str(f),
                  metadata={"format": "pt"})
    return out


def broken_quality(original: str | Path, awq_dir: str | Path, work: str | Path, **kw: Any):
    """Each deliberately broken copy run through the same checks (a table): every one must fail."""
    import pandas as pd

    rows = []
    trained = (Path(original) / "labkit-trained.json").is_file()
    for how in BREAKS:
        q = quality(original, broken_copy(awq_dir, how, Path(work) / how.replace(" ", "-")), **kw)
        checks = quality_checks(q, trained=trained)
        failed = [what for what, ok, _ in checks if not ok]
        rows.append({"broken copy": how, "perplexity": q.get("perplexity quantized"),
                     "agreement": q.get("top-1 agreement"), "error": q.get("error"),
                     "checks failed": len(failed), "first failure": failed[0] if failed else None})
    return pd.DataFrame(rows)


def perplexity(engine, text: str | Path | None = None, seqlen: int = 512, windows: int | None = 8) -> float:
    """Perplexity of an engine's model on held-out text, via lmdeploy's `pipeline.get_ppl` (GPU)."""
    from transformers import AutoTokenizer

    model_dir = Path(engine.model_dir)
    source = Path(getattr(engine, "source_dir", None) or model_dir)
    remote = needs_remote_code(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=remote)
    chunks = _windows(tok, Path(text or default_text(_original_of(source))), seqlen, windows)
    from labkit import deadline

    losses = deadline.call(lambda: engine.pipe.get_ppl(chunks), None, f"perplexity on engine {engine.name!r}",
                           engine._stuck())  # mean cross-entropy per window (nats/token)
    return float(math.exp(sum(losses) / len(losses)))


def _original_of(model_dir: Path) -> Path:
    """The model an AWQ folder was made from (labkit's record of it), else the folder itself."""
    meta = model_dir / "labkit-awq.json"
    if meta.is_file():
        return Path(json.loads(meta.read_text())["source_model"])
    return model_dir


def _tok_s(table, batch: int) -> float | None:
    """Output tokens/s at `batch` from a labkit.bench.measure table."""
    rows = table[table["batch"] == batch]
    return float(rows["output tok/s"].iloc[0]) if len(rows) else None


def profile_engine(engine, batch_sizes=(1, 32), new_tokens: int = 256, repeats: int = 3, prompt_tokens: int = 128,
                   ppl_seqlen: int = 512, ppl_windows: int | None = 8) -> dict:
    """One row for the lab-03 table: GPU memory (split into KV cache and the rest), decode speed, perplexity."""
    from labkit import bench
    from labkit.kvcache import engine_capacity

    row: dict[str, Any] = {"model": engine.model_dir.name, "engine": engine.backend,
                           "GPU memory GiB": round(engine.memory_gib, 3)}
    try:
        cap = engine_capacity(engine)
        row["KV cache GiB"] = round(cap["kv_bytes"] / GiB, 3)
        row["weights + runtime GiB"] = round(engine.memory_gib - cap["kv_bytes"] / GiB, 3)
    except ValueError as err:  # TurboMind does not report its blocks
        print(f"note: {err}")
    speed = bench.measure(engine, batch_sizes=tuple(batch_sizes), prompt_tokens=prompt_tokens,
                          new_tokens=new_tokens, warmup=1, repeats=repeats)
    for b in batch_sizes:
        row[f"tok/s batch {b}"] = _tok_s(speed, b)
    row["perplexity"] = round(perplexity(engine, seqlen=ppl_seqlen, windows=ppl_windows), 2)
    return row
