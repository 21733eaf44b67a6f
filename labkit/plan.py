"""A capacity planner (lab 07): from a model, a GPU and a target load, how many api_servers (and which tp)
to run behind `lmdeploy serve proxy`, and how much KV cache each holds.

The arithmetic, per replica of `tp` GPUs:
- memory: weights W/tp per GPU; the KV cache is `cache_ratio` of what is left after the weights, a CUDA
  context and the engine's runtime buffers (lab 04's calculator, labkit.kvcache); a token's KV bytes
  split over the tp GPUs, so a replica holds tp x (KV bytes per GPU) / (KV bytes per token) tokens.
- time: a decode step reads the weights and the running sequences' KV cache once (memory bound):
  step(B) = c0 + c1 x B, with c0 = host overhead + W / (tp x bandwidth x efficiency) and
  c1 = (prompt + reply / 2) x KV bytes per token / (tp x bandwidth x efficiency); a prompt's prefill is
  compute bound: 2 x parameters x prompt tokens / (tp x FLOP/s x utilisation).
  `Calibration.fit` replaces c0, c1 and the prefill time by what the lab measured on one server: the step is
  the time per output token (TPOT: (latency - TTFT) / (tokens - 1) of each request, median), not the gap
  between streamed chunks (a server that sends several tokens per burst makes most gaps ~0), and a closed
  loop's TTFT (queueing behind the other requests' prefills included) is fitted against concurrency too.
- load: with requests arriving at `rps` over n replicas, Little's law gives the running batch per replica,
  B = (rps / n) x latency(B), latency(B) = prefill + reply x step(B); solved exactly:
  B = lam (prefill + reply c0) / (1 - lam reply c1). The planner takes the fewest GPUs whose B is finite,
  fits the KV cache and max_batch_size, and keeps the latency under the bound.
Limits (said in the lab): no queueing delay at the tail (latencies are means, not p99); prefill and
decode do not interfere; tensor-parallel communication is free (it is not: NVLink ~5-10 %, across nodes
over Ethernet much more); servers sharing one GPU share its bandwidth (`share_gpu`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from labkit import kvcache
from labkit.errors import InputError

GiB = 1024**3
# name: (memory GiB as NVML reports it, HBM bandwidth GB/s, dense bf16 TFLOP/s): vendor data sheets.
GPUS = {
    "A10": (22.5, 600, 125), "RTX 4090": (24.0, 1008, 165), "L40S": (45.0, 864, 362),
    "A100-40GB": (40.0, 1555, 312), "A100-80GB": (80.0, 2039, 312), "H100": (79.6, 3350, 989),
    "H200": (140.4, 4800, 989),
}
# Public config.json values of models too large for these machines (for the arithmetic on paper).
PAPER_MODELS = {
    "internlm2_5-1_8b-chat": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                  num_attention_heads=16, num_key_value_heads=8, vocab_size=92544),
    "internlm2_5-7b-chat": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=92544),
    "Qwen2.5-72B-Instruct": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=152064),
}
TP_CHOICES = (1, 2, 4, 8)


class PlanError(InputError):
    """The planner cannot answer for these inputs; the message says which input to change."""


@dataclass(frozen=True)
class GPU:
    """What the planner needs of a GPU."""

    name: str
    memory_gib: float
    bandwidth_gbs: float
    tflops: float

    @classmethod
    def named(cls, name: str) -> "GPU":
        """A GPU from the planner's table (A10, RTX 4090, L40S, A100-40GB, A100-80GB, H100, H200)."""
        key = next((k for k in GPUS if k.lower() == name.lower()), None)
        if key is None:
            raise PlanError(f"unknown GPU {name!r}: pick one of {', '.join(GPUS)}, or build "
                            f"GPU(name, memory_gib, bandwidth_gbs, tflops) from its data sheet")
        return cls(key, *GPUS[key])

    @classmethod
    def here(cls) -> "GPU":
        """This machine's GPU 0: memory from NVML, bandwidth and FLOP/s from the table by its name."""
        from labkit.gpu import gpus

        found = gpus()
        if not found:
            raise PlanError("no GPU here: name one, e.g. GPU.named('H200')")
        g = found[0]
        key = next((k for k in sorted(GPUS, key=len, reverse=True) if k.split("-")[0].lower() in g.name.lower()),
                   None)
        if key is None:
            raise PlanError(f"the planner's table does not know {g.name!r}: build GPU(name, memory_gib, "
                            f"bandwidth_gbs, tflops) from its data sheet")
        return cls(g.name, g.total_gib, *GPUS[key][1:])


@dataclass(frozen=True)
class Model:
    """What the planner needs of a model: weight bytes, parameters, KV shape, heads (for tp)."""

    name: str
    weights_bytes: int
    params: int
    shape: kvcache.ModelShape
    heads: int

    @classmethod
    def from_config(cls, name: str, cfg: dict, weights_bytes: int | None = None, dtype_bytes: int = 2) -> "Model":
        """From config.json values; weights = parameters x dtype bytes unless the files' size is given."""
        h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or h // heads
        attn = h * heads * hd * 2 + h * kv * hd * 2             # q, o and k, v projections
        mlp = 3 * h * cfg["intermediate_size"]                   # gate, up, down
        embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
        params = layers * (attn + mlp) + embed
        shape = kvcache.ModelShape(layers, kv, hd, dtype_bytes, cfg["vocab_size"])
        return cls(name, int(weights_bytes or params * dtype_bytes), params, shape, heads)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Model":
        """From a model folder: config.json for the shape, the weight files for the bytes."""
        cfg = kvcache.text_config(model_dir)
        return cls.from_config(Path(model_dir).name, cfg, kvcache.weights_bytes(model_dir) or None)

    @classmethod
    def named(cls, name: str) -> "Model":
        """A model of PAPER_MODELS (public config values), for sizes these machines cannot run."""
        if name not in PAPER_MODELS:
            raise PlanError(f"unknown paper model {name!r}: one of {', '.join(PAPER_MODELS)}, or Model.from_dir(path)")
        return cls.from_config(name, PAPER_MODELS[name])


@dataclass(frozen=True)
class Load:
    """The target: requests per second, tokens in and out per request, the mean latency allowed (s)."""

    rps: float
    prompt_tokens: int
    reply_tokens: int
    latency_s: float

    def __post_init__(self):
        if not self.rps > 0 or self.prompt_tokens < 1 or self.reply_tokens < 1 or not self.latency_s > 0:
            raise PlanError(f"a load needs rps > 0, prompt_tokens and reply_tokens >= 1 and latency_s > 0, not {self}")


@dataclass(frozen=True)
class Calibration:
    """Step time c0 + c1 x batch (s) and prefill time (s per prompt token) of one server, measured or assumed;
    a measured one also has TTFT = ttft_c0 + ttft_c1 x batch (s) of a closed loop, queueing included."""

    c0: float
    c1: float
    prefill_s_per_token: float
    source: str = "roofline"
    host_s: float = 0.0  # the part of c0 that is not GPU time (Python, scheduling): servers sharing a GPU overlap it
    ttft_c0: float | None = None  # None: TTFT = prompt tokens x prefill_s_per_token (no queueing)
    ttft_c1: float = 0.0

    @classmethod
    def fit(cls, rows, model: "Model", gpu: GPU, prompt_tokens: int, tp: int = 1, efficiency: float = 0.7,
            step: str = "TPOT p50 ms") -> "Calibration":
        """From single-server load-test rows (concurrency, `step` column, TTFT p50 ms) at two or more concurrency
        levels: least-squares lines through the step time and TTFT against concurrency; prefill per prompt token
        from the lowest level's TTFT. `step`: "TPOT p50 ms" (time per output token, what latency is made of) or
        "ITL p50 ms" (gaps between streamed chunks: too short when a server sends tokens in bursts)."""
        recs = _records(rows)
        if step not in STEP_COLUMNS:
            raise PlanError(f"step must be one of {', '.join(STEP_COLUMNS)}, not {step!r}")
        if recs and all(r.get(step) is None for r in recs):
            raise PlanError(f"the load-test rows have no {step!r}: measure them with labkit.scale.calibrate(server) "
                            f"(or loadtest.run(..., extended=True))")
        pts = sorted((float(r["concurrency"]), float(r[step]) / 1000, float(r["TTFT p50 ms"]) / 1000)
                     for r in recs if r.get(step) is not None and r.get("TTFT p50 ms") is not None)
        if len({p[0] for p in pts}) < 2:
            raise PlanError(f"Calibration.fit needs load-test rows at two or more concurrency levels (with {step} "
                            "and TTFT), e.g. labkit.scale.calibrate(server, concurrency=16)")
        c0, c1 = _line([(p[0], p[1]) for p in pts])
        t0, t1 = _line([(p[0], p[2]) for p in pts])
        gpu_floor = model.weights_bytes / (tp * gpu.bandwidth_gbs * 1e9 * efficiency)
        return cls(c0, c1, pts[0][2] / max(prompt_tokens, 1), f"measured ({step})", host_s=max(c0 - gpu_floor, 0.0),
                   ttft_c0=t0, ttft_c1=t1)

    def ttft(self, batch: float, prompt_tokens: int) -> float:
        """Seconds to the first token with `batch` requests running (closed loop); the prefill alone if unmeasured."""
        if self.ttft_c0 is None:
            return prompt_tokens * self.prefill_s_per_token
        return self.ttft_c0 + self.ttft_c1 * batch


STEP_COLUMNS = ("TPOT p50 ms", "ITL p50 ms")


def _line(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope (slope >= 0, intercept > 0) through (x, y) points at 2+ distinct x."""
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = max(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 0.0)
    return max(my - slope * mx, 1e-6), slope


def _records(rows) -> list[dict]:
    return rows.to_dict(orient="records") if hasattr(rows, "to_dict") else [dict(r) for r in rows]


def roofline(model: Model, gpu: GPU, load: Load, tp: int = 1, efficiency: float = 0.7, mfu: float = 0.4,
             host_s: float = 0.004) -> Calibration:
    """Step and prefill times from bandwidth and FLOP/s alone (no measurement): the lower bound, made real
    by `efficiency` (share of peak bandwidth reached), `mfu` (of peak FLOP/s) and a host overhead per step."""
    bw = tp * gpu.bandwidth_gbs * 1e9 * efficiency
    ctx = load.prompt_tokens + load.reply_tokens / 2
    c0 = host_s + model.weights_bytes / bw
    c1 = ctx * kvcache.bytes_per_token(model.shape) / bw
    prefill = 2 * model.params / (tp * gpu.tflops * 1e12 * mfu)
    return Calibration(c0, c1, prefill, "roofline", host_s=host_s)


def kv_per_replica(model: Model, gpu: GPU, tp: int = 1, cache_ratio: float = 0.8, quant_policy: int = 0) -> dict:
    """KV cache of one replica of tp GPUs: bytes per GPU, tokens it holds (lab 04's arithmetic)."""
    kvcache.check_ratio(cache_ratio)
    per_gpu_weights = model.weights_bytes / tp
    free = gpu.memory_gib * GiB - per_gpu_weights - kvcache.CUDA_CONTEXT_BYTES
    free -= kvcache.runtime_reserve(model.shape.vocab, kvcache.MAX_PREFILL_TOKENS, kvcache.default_max_batch_size(gpu.name))
    if free <= 0:
        raise PlanError(f"{model.name} does not fit on {tp} x {gpu.name}: {per_gpu_weights / GiB:.1f} GiB of weights "
                        f"per GPU of {gpu.memory_gib:.0f} GiB; use a larger tp, a quantized model (lab 03) or a bigger GPU")
    kv_gpu = free * cache_ratio
    per_token = kvcache.bytes_per_token(model.shape, quant_policy) / min(tp, model.shape.kv_heads)  # KV heads split
    return {"weights GiB per GPU": per_gpu_weights / GiB, "KV GiB per GPU": kv_gpu / GiB,
            "KV GiB per replica": tp * kv_gpu / GiB, "tokens per replica": int(kv_gpu // per_token)}


def batch_for(lam: float, load: Load, cal: Calibration) -> float:
    """Running requests per replica at `lam` requests/s (Little's law, solved); inf if it cannot keep up."""
    denom = 1 - lam * load.reply_tokens * cal.c1
    if denom <= 0:
        return math.inf
    return lam * (load.prompt_tokens * cal.prefill_s_per_token + load.reply_tokens * cal.c0) / denom


def latency_at(batch: float, load: Load, cal: Calibration) -> float:
    """Mean seconds per request when `batch` requests run together: prefill + reply x step(batch)."""
    return load.prompt_tokens * cal.prefill_s_per_token + load.reply_tokens * (cal.c0 + cal.c1 * batch)


def options(model: Model, gpu: GPU, load: Load, cache_ratio: float = 0.8, quant_policy: int = 0,
            calibration: Calibration | None = None, tps: tuple[int, ...] = TP_CHOICES, max_batch: int | None = None,
            max_replicas: int = 1024, gpus_per_node: int = 8):
    """Every tp the model allows, with the fewest replicas that meet the load: a table, best (fewest GPUs) first."""
    import pandas as pd

    max_batch = max_batch or kvcache.default_max_batch_size(gpu.name)
    rows = []
    for tp in tps:
        if model.heads % tp or model.shape.kv_heads % tp and tp % model.shape.kv_heads:
            continue  # lmdeploy splits heads evenly over the tp GPUs
        try:
            kv = kv_per_replica(model, gpu, tp, cache_ratio, quant_policy)
        except PlanError:
            continue
        cal = calibration if calibration is not None and tp == 1 else \
            _scaled(calibration, tp) if calibration is not None else roofline(model, gpu, load, tp)
        fit_tokens = kv["tokens per replica"] // (load.prompt_tokens + load.reply_tokens)
        for n in range(1, max_replicas + 1):
            b = batch_for(load.rps / n, load, cal)
            lat = latency_at(b, load, cal) if math.isfinite(b) else math.inf
            if math.isfinite(b) and b <= min(max_batch, fit_tokens) and lat <= load.latency_s:
                rows.append({"tp": tp, "replicas": n, "GPUs": n * tp, "nodes": math.ceil(n * tp / gpus_per_node),
                             "batch per replica": round(b, 1), "mean latency s": round(lat, 2),
                             "requests that fit in KV": int(fit_tokens), **{k: round(v, 2) for k, v in kv.items()
                                                                             if k != "tokens per replica"},
                             "KV tokens per replica": kv["tokens per replica"], "step ms at batch":
                             round(1000 * (cal.c0 + cal.c1 * b), 2), "calibration": cal.source})
                break
    if not rows:
        raise PlanError(f"no tp in {tps} with up to {max_replicas} replicas meets {load}: raise latency_s, lower "
                        f"rps, or plan for a larger GPU")
    return pd.DataFrame(rows).sort_values(["GPUs", "tp"]).reset_index(drop=True)


def _scaled(cal: Calibration, tp: int) -> Calibration:
    """A tp=1 measurement carried to tp GPUs: GPU time divides by tp, host time does not (optimistic)."""
    gpu0 = cal.c0 - cal.host_s
    return replace(cal, c0=cal.host_s + gpu0 / tp, c1=cal.c1 / tp, prefill_s_per_token=cal.prefill_s_per_token / tp,
                   source=cal.source + f" / tp {tp}")


def plan(model: Model | str | Path, gpu: GPU | str, load: Load, **kw: Any) -> dict:
    """The recommendation: the first row of `options` (fewest GPUs), with the table of all."""
    model = model if isinstance(model, Model) else (Model.named(str(model)) if str(model) in PAPER_MODELS
                                                     else Model.from_dir(model))
    gpu = gpu if isinstance(gpu, GPU) else GPU.named(gpu)
    table = options(model, gpu, load, **kw)
    best = table.iloc[0].to_dict()
    return {"model": model.name, "gpu": gpu.name, "load": load, **best, "options": table}


def closed_loop(cal: Calibration, load: Load, concurrency: int, servers: int = 1, share_gpu: bool = False) -> dict:
    """What a closed-loop load test (`concurrency` clients, each sending the next request when the last one ends)
    should measure over `servers` replicas; share_gpu: all on one GPU (GPU time serialises, host time overlaps).

    Per request: latency = TTFT(batch) + (reply - 1) x step(batch), batch = concurrency / servers: the first
    token comes with the prefill, each further one costs a step (what a request measures as its TPOT)."""
    batch = concurrency / servers
    alone = cal.c0 + cal.c1 * batch
    step = alone
    if share_gpu and servers > 1:
        step = max(step, servers * (cal.c0 - cal.host_s + cal.c1 * batch))
    ttft = cal.ttft(batch, load.prompt_tokens) * step / alone  # a shared GPU slows the others' steps it waits for
    latency = ttft + max(load.reply_tokens - 1, 0) * step
    rps = concurrency / latency
    return {"servers": servers, "concurrency": concurrency, "predicted requests/s": round(rps, 2),
            "predicted output tokens/s": round(rps * load.reply_tokens, 1),
            "predicted latency p50 ms": round(1000 * latency, 1), "predicted TTFT ms": round(1000 * ttft, 1),
            "predicted TPOT ms": round(1000 * step, 2)}


def check(predicted: dict, measured: dict) -> dict:
    """Predicted next to measured (requests/s, latency p50), and the ratio measured / predicted."""
    out = {"servers": predicted["servers"]}
    for p, m in (("predicted requests/s", "requests/s"), ("predicted latency p50 ms", "latency p50 ms")):
        out[p], out[m] = predicted[p], measured.get(m)
        out[f"{m.split(' ')[0]} measured/predicted"] = round(measured[m] / predicted[p], 2) if measured.get(m) else None
    return out


def ray_commands(model_path: str, tp: int, replicas: int = 1, gpus_per_node: int = 8, head: str = "HEAD_IP",
                 proxy_port: int = 8000, port: int = 23333, strategy: str = "min_expected_latency") -> list[str]:
    """The shell commands for a plan on a cluster: a Ray cluster and the proxy on the head node, then each replica
    (tp GPUs; over several nodes through Ray's PyTorch executor when tp > gpus_per_node). Each api_server
    registers with the proxy as http://<--server-name>:<port>, so --server-name is the node's own address
    (NODEk_IP), never 0.0.0.0."""
    from labkit.proxy import proxy_args

    nodes = math.ceil(tp * replicas / gpus_per_node)
    cmds = [" ".join(proxy_args("0.0.0.0", proxy_port, strategy)) + "   # on the head node"]
    if tp > gpus_per_node:
        per = math.ceil(tp / gpus_per_node)
        cmds += [f"ray start --head --port 6379   # on {head}", "ray start --address " + head + ":6379   # on each "
                 f"of the other {nodes - 1} node(s)"]
        for r in range(replicas):
            cmds.append(f"lmdeploy serve api_server {model_path} --backend pytorch --tp {tp} "
                        f"--distributed-executor-backend ray --server-name NODE{r * per}_IP --server-port {port} "
                        f"--proxy-url http://{head}:{proxy_port}   # replica {r}: on the first of its {per} nodes")
        cmds += [f"lmdeploy serve api_server {model_path} --backend turbomind --tp {tp} --nnodes {per} --node-rank {k} "
                 f"--dist-init-addr {head}:29500 --server-name NODE{k}_IP --server-port {port}   # or TurboMind: node {k} "
                 f"of replica 0" for k in range(per)]
    else:
        per_node = gpus_per_node // tp
        for r in range(replicas):
            gpus = ",".join(str((r % per_node) * tp + k) for k in range(tp))
            cmds.append(f"CUDA_VISIBLE_DEVICES={gpus} lmdeploy serve api_server {model_path} --tp {tp} "
                        f"--server-name NODE{r // per_node}_IP --server-port {port + r % per_node} "
                        f"--proxy-url http://{head}:{proxy_port}"
                        f"   # replica {r}: node {r // per_node}")
    return cmds


def summary(result: dict) -> str:
    """One line: what to run for this plan."""
    return (f"{result['model']} on {result['gpu']} for {result['load'].rps:g} req/s: {int(result['replicas'])} "
            f"replica(s) x tp {int(result['tp'])} = {int(result['GPUs'])} GPU(s) on {int(result['nodes'])} node(s), "
            f"{result['KV GiB per replica']:.1f} GiB of KV cache each, mean latency {result['mean latency s']:.2f} s")


__all__ = ["GPU", "Model", "Load", "Calibration", "PlanError", "plan", "options", "kv_per_replica", "closed_loop",
           "check", "roofline", "ray_commands", "batch_for", "latency_at", "summary"]
