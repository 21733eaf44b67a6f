"""Lab 07: the proxy group's lifecycle (the REAL `lmdeploy serve proxy`, on CPU, in front of stand-in api_servers:
small real HTTP processes that register with it as lmdeploy's api_server does), every command line parsed by
lmdeploy's own argparse, the planner's arithmetic (by hand and against labkit.kvcache), metrics parsing with
prometheus_client, structured-output validation with jsonschema. GPU: one real api_server killed mid-test.
"""
from __future__ import annotations

import math
import shlex
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from helpers import TINY
from labkit import kvcache, loadtest, metrics, plan, proxy, scale, serve, structured

STANDIN = [sys.executable, str(Path(__file__).with_name("standin_api.py")), "{port}", "{name}", "{host}"]


# ----------------------------------------------------------------------------- lmdeploy's own argparse

@pytest.fixture(scope="module")
def lmdeploy_parser():
    """lmdeploy 0.18's CLI parser, built as `lmdeploy` builds it (no engine is imported)."""
    from labkit.commands import parser

    return parser()


def _parse(parser, argv: list[str]):
    assert argv[0] == "lmdeploy"
    return parser.parse_args(argv[1:])


def test_proxy_argv_parses(lmdeploy_parser):
    for strategy in proxy.ROUTING_STRATEGIES:
        args = _parse(lmdeploy_parser, proxy.proxy_args("127.0.0.1", 8123, strategy))
        assert (args.server_name, args.server_port, args.routing_strategy) == ("127.0.0.1", 8123, strategy)
        assert args.disable_cache_status is True


def test_api_server_argv_with_proxy_tp_dp_and_prefix_cache_parses(lmdeploy_parser, tiny_dir):
    argv = serve.api_server_args(tiny_dir, host="127.0.0.1", port=23400, backend="pytorch", model_name="m",
                                 cache_ratio=0.05, tp=2, extra_args=["--proxy-url", "http://127.0.0.1:8000",
                                                                     "--enable-prefix-caching", "--dp", "2"])
    args = _parse(lmdeploy_parser, argv)
    assert (args.tp, args.dp, args.proxy_url, args.enable_prefix_caching) == (2, 2, "http://127.0.0.1:8000", True)
    assert args.cache_max_entry_count == 0.05 and args.server_port == 23400


def test_cluster_commands_parse(lmdeploy_parser):
    lines = plan.ray_commands("/models/big", tp=16, replicas=2) + plan.ray_commands("/models/x", tp=2, replicas=6)
    lm = [shlex.split(line.split("#")[0]) for line in lines if "lmdeploy" in line]
    assert len(lm) >= 6
    for argv in lm:
        argv = [a for a in argv if not a.startswith("CUDA_VISIBLE_DEVICES=")]
        args = _parse(lmdeploy_parser, argv)
        if getattr(args, "distributed_executor_backend", None) == "ray":
            assert args.tp == 16 and args.backend == "pytorch"
        if getattr(args, "nnodes", 1) > 1:
            assert args.node_rank in (0, 1) and args.dist_init_addr == "HEAD_IP:29500"
        if hasattr(args, "proxy_url") and args.proxy_url:
            assert args.server_name != "0.0.0.0", "a node registers under its --server-name: never 0.0.0.0"
    assert any(line.startswith("ray start --head") for line in lines)


def test_bad_argv_is_rejected_by_lmdeploy(lmdeploy_parser):
    """The parse check can fail: a strategy lmdeploy does not know."""
    with pytest.raises(SystemExit):
        lmdeploy_parser.parse_args(["serve", "proxy", "--routing-strategy", "round_robin"])
    with pytest.raises(proxy.ProxyError, match="routing strategy must be one of"):
        proxy.proxy_args("127.0.0.1", 1, "round_robin")


def test_gpu_assignment():
    assert proxy.gpu_assignment(2, n_gpus=2) == ["0", "1"]
    assert proxy.gpu_assignment(2, n_gpus=4, tp=2) == ["0,1", "2,3"]
    assert proxy.gpu_assignment(2, n_gpus=1) == [None, None]   # one GPU: they share it
    assert proxy.gpu_assignment(3, n_gpus=2) == [None] * 3     # not enough GPUs for one each


# ----------------------------------------------------------------------------- the group with the real proxy

def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def group(tiny_dir):
    g = proxy.Group(TINY, servers=2, strategies=["min_expected_latency", "random"], command=STANDIN,
                    name=f"t{int(time.time() * 1000) % 100000}", heartbeat=1, show=False)
    yield g
    g.stop(quiet=True)


def test_group_routes_through_the_real_proxy_and_around_a_killed_server(group):
    ports = [s.port for s in group.servers] + [p.server.port for p in group.proxies.values()]
    pids = group.pids()
    assert len(group.nodes()) == 2 and len(group.nodes("random")) == 2  # registered itself / added by labkit
    client = group.proxy().client()
    seen = {client.chat.completions.create(model=group.proxy().model_name, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
            for _ in range(8)}
    assert {w.split()[1] for w in seen} == {str(s.port) for s in group.servers}, f"routed to one server only: {seen}"
    assert sum(group.proxy().dispatched().values()) == 8
    # kill one in the middle of a load test: cut-off streams are errors, retries go to the survivor
    result = scale.kill_test(group, at=0.3, concurrency=4, requests=60, max_tokens=8, retries=3)
    summary, recs = result["summary"], result["records"]
    assert result["dropped after s"] is not None and result["dropped after s"] < 10
    assert group.nodes()["server"].tolist() == [group.servers[0].name]
    after = recs[recs["phase"] == scale.PHASES[2]]
    assert len(after) == 0 or after["ok"].all(), "requests sent after the proxy dropped the node failed"
    assert summary["ok"] >= 1 and summary["ok"] + summary["failed"] == 60
    assert not group.servers[1].alive
    # nothing left: processes, ports, registry
    group.stop(quiet=True)
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running: {left}"
    assert not [p for p in ports if _listening(p)], "a port still listens"
    assert not [e for e in serve.servers() if e["name"].startswith(group.name)]


def test_a_killed_kernel_takes_the_whole_group_with_it(tiny_dir, tmp_path):
    """A notebook kernel SIGKILLed while its group runs: the watchdogs take the proxies and servers down."""
    import json
    import subprocess

    script = tmp_path / "kernel.py"
    script.write_text(
        "import json, sys, time\n"
        "from labkit import proxy\n"
        f"g = proxy.Group({TINY!r}, servers=2, command={STANDIN!r}, name='kk', show=False)\n"
        "print(json.dumps({'pids': sorted(g.pids()), 'ports': [s.port for s in g.servers]}), flush=True)\n"
        "time.sleep(600)\n")
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(kernel.stdout.readline())
        assert len(info["pids"]) >= 4 and all(psutil.pid_exists(p) for p in info["pids"])
    finally:
        kernel.kill()
        kernel.wait()
    deadline = time.monotonic() + 20
    alive = info["pids"]
    while time.monotonic() < deadline:
        alive = [p for p in info["pids"] if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, f"left running after the kernel was killed: {alive}"
    assert not [p for p in info["ports"] if _listening(p)]


def test_ctrl_c_while_the_servers_load_stops_everything(tiny_dir, tmp_path):
    """SIGINT (Ctrl-C in a notebook) while the group's servers are still loading: the start ends within seconds
    and nothing of the group is left, neither the proxies nor the servers."""
    import signal
    import subprocess

    script = tmp_path / "kernel.py"
    slow = STANDIN + ["--start-delay", "60"]
    script.write_text(
        "from labkit import proxy\n"
        f"proxy.Group({TINY!r}, servers=2, strategies=['random', 'min_expected_latency'], command={slow!r}, "
        "name='cc', show=False)\n")
    kernel = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    me = psutil.Process(kernel.pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum("standin_api" in " ".join(c.cmdline()) for c in
                                              me.children(recursive=True)) < 2:
        time.sleep(0.2)
    family = me.children(recursive=True)
    assert sum("standin_api" in " ".join(c.cmdline()) for c in family) >= 2, "the servers never started"
    start = time.monotonic()
    kernel.send_signal(signal.SIGINT)
    try:
        kernel.wait(timeout=30)
    finally:
        kernel.kill()
    took = time.monotonic() - start
    err = kernel.stderr.read()
    assert "KeyboardInterrupt" in err, err[-500:]
    assert took < 20, f"Ctrl-C took {took:.1f} s to stop the start"
    time.sleep(1.0)
    left = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running after Ctrl-C: {left}"


def test_compare_gives_every_strategy_a_row_and_samples_metrics(group):
    table, samples = scale.compare(group, concurrency=4, requests=12, max_tokens=4, interval=0.1)
    assert list(table["setup"]) == ["1 server, direct", "2 servers, proxy min_expected_latency", "2 servers, proxy random"]
    assert (table["failed"] == 0).all() and (table["ok"] == 12).all()
    assert set(samples["server"]) == {s.name for s in group.servers}
    assert samples["generated tokens"].max() > 0


def test_a_second_group_with_the_same_name_replaces_the_first(tiny_dir):
    name = f"r{int(time.time() * 1000) % 100000}"
    first = proxy.Group(TINY, servers=1, command=STANDIN, name=name, show=False)
    pids = first.pids()
    second = proxy.Group(TINY, servers=1, command=STANDIN, name=name, show=False)
    try:
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert second.servers[0].alive
    finally:
        second.stop(quiet=True)


def test_a_server_that_fails_to_start_takes_the_group_down(tiny_dir):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(serve.ServerError, match="exited while loading"):
        proxy.Group(TINY, servers=2, command=[sys.executable, "-c", "import sys; sys.exit(3)"],
                    name=f"f{int(time.time() * 1000) % 100000}", show=False)
    time.sleep(0.5)
    now = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert now <= before, f"left running after a failed start: {now - before}"


@pytest.mark.parametrize("kwargs, match", [
    (dict(servers=0), "servers must be"), (dict(strategies=["fastest"]), "routing strategy"),
    (dict(strategies=[]), "each routing strategy once"), (dict(extra_args=["--proxy-url", "x"]), "without --proxy-url"),
    (dict(server_args=[[]]), "one list of options per server"),
    (dict(tp=2, n_gpus=1), "tp=2 needs 2 GPUs per server"),
    (dict(cache_ratio=1.5), r"\(0, 1\]"), (dict(backend="tensorrt"), "unknown backend"), (dict(heartbeat=0), "heartbeat"),
])
def test_bad_group_options_fail_before_any_process(tiny_dir, kwargs, match):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises((proxy.ProxyError, ValueError, RuntimeError), match=match):
        proxy.Group(TINY, command=STANDIN, show=False, **{"servers": 2, **kwargs})
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_a_bad_rerun_keeps_the_running_group(tiny_dir):
    """Re-running the cell with a bad option fails at once and leaves the group that runs alone."""
    name = f"b{int(time.time() * 1000) % 100000}"
    good = proxy.Group(TINY, servers=1, command=STANDIN, name=name, show=False)
    try:
        with pytest.raises(proxy.ProxyError):
            proxy.Group(TINY, servers=0, command=STANDIN, name=name, show=False)
        with pytest.raises(ValueError):
            proxy.Group(TINY, servers=1, cache_ratio=2.0, command=STANDIN, name=name, show=False)
        assert good.servers[0].alive and good.proxy().alive
    finally:
        good.stop(quiet=True)


# ----------------------------------------------------------------------------- metrics and structured output

LMDEPLOY_METRICS = """# HELP lmdeploy:cached_tokens_total Total prefix-cached input tokens served.
# TYPE lmdeploy:cached_tokens_total counter
lmdeploy:cached_tokens_total{engine="0",model_name="m"} 300.0
# TYPE lmdeploy:request_prompt_tokens histogram
lmdeploy:request_prompt_tokens_bucket{engine="0",le="+Inf",model_name="m"} 4.0
lmdeploy:request_prompt_tokens_count{engine="0",model_name="m"} 4.0
lmdeploy:request_prompt_tokens_sum{engine="0",model_name="m"} 400.0
# TYPE lmdeploy:num_requests_running gauge
lmdeploy:num_requests_running{engine="0",model_name="m"} 3.0
lmdeploy:num_requests_running{engine="1",model_name="m"} 2.0
"""


def test_metrics_parse_sums_engines_and_computes_the_hit_rate():
    after = metrics.parse(LMDEPLOY_METRICS)
    assert after[metrics.RUNNING] == 5.0
    before = {metrics.CACHED_TOKENS: 100.0, metrics.PROMPT_TOKENS_SUM: 200.0}
    assert metrics.prefix_hit_rate(before, after) == pytest.approx(200 / 200)
    assert metrics.prefix_hit_rate(after, after) is None  # nothing finished in between
    with pytest.raises(metrics.MetricsError, match="not Prometheus text"):
        metrics.parse("lmdeploy:x{engine= 1 2")
    with pytest.raises(metrics.MetricsError, match="could not read"):
        metrics.fetch(f"http://127.0.0.1:{serve.free_port()}")


def test_structured_validation_accepts_the_form_and_rejects_the_rest():
    assert structured.validate('{"name": "Ada Lovelace", "age": 27}', structured.PERSON) == {"name": "Ada Lovelace",
                                                                                              "age": 27}
    for bad, match in (('{"name": "Ada"}', "'age' is a required property"), ('{"name": "Ada", "age": "27"}', "at age"),
                       ('{"name": "Ada", "age": 27, "x": 1}', "Additional properties"), ("Ada is 27", "not JSON")):
        with pytest.raises(structured.StructuredOutputError, match=match):
            structured.validate(bad, structured.PERSON)
    with pytest.raises(structured.StructuredOutputError, match="not a valid JSON schema"):
        structured.response_format({"type": "objekt"})
    assert structured.response_format(structured.PERSON)["json_schema"]["schema"] is structured.PERSON


def test_the_grammar_check_takes_whole_and_cut_documents_and_rejects_the_rest():
    """What constrained decoding guarantees, checked with the grammar lmdeploy builds (xgrammar): a finished reply
    is a whole document, one cut at max_tokens (a random model's newlines, as measured on the GPU) the beginning of
    one; anything else, and the lab's check on a table of replies, fails."""
    import pandas as pd

    follows = structured.follows_grammar
    assert follows('{"name": "Ada Lovelace", "age": 27}') == "complete"
    assert follows('{"name": \n \n \n \n\n\n') == follows('{"name": \n  "b of tea. Ask me", "age"') == "prefix"
    for bad in ('{"name": 27', '{"name": "Ada", "age": "27"}', '{"name": "Ada", "age": 27, "x": 1}', "27 + 27 = 23.",
                '{"name": "Ada", "age": 1234}'):
        assert follows(bad) is None, bad

    def table(*replies):  # (constrained, reply, finish) as trials() records them
        rows = []
        for constrained, reply, finish in replies:
            try:
                structured.validate(reply, structured.PERSON)
                valid = True
            except structured.StructuredOutputError:
                valid = False
            rows.append({"constrained": constrained, "reply": reply, "finish": finish, "valid": valid,
                         "grammar": follows(reply)})
        return pd.DataFrame(rows)

    cut = (True, '{"name": \n \n \n', "length")
    whole = (True, '{"name": "Ada", "age": 27}', "stop")
    free = (False, "27 + 27 = 23.", "stop")
    assert structured.holds(structured.summary(table(cut, cut, whole, free)))
    assert structured.holds(structured.summary(table(cut, cut, free)))  # nothing finished: still what it guarantees
    broken = structured.summary(table(cut, whole, (True, "27 + 27 = 23.", "stop")))  # a reply the grammar forbids
    assert not structured.holds(broken) and broken["constrained following the grammar"] == 2
    assert not structured.holds(structured.summary(table(free)))  # no constrained reply at all


def test_lmdeploy_accepts_the_response_format():
    """lmdeploy's own check (xgrammar compiles it) takes the lab's schema and refuses a broken one."""
    from lmdeploy._guided_decoding import ensure_response_format_compilable

    ensure_response_format_compilable(structured.response_format(structured.PERSON))
    with pytest.raises(ValueError):
        ensure_response_format_compilable({"type": "regex_schema", "regex_schema": "(unclosed"})


# ----------------------------------------------------------------------------- the planner's arithmetic

def test_paper_model_parameters_match_the_published_sizes():
    assert plan.Model.named("internlm2_5-7b-chat").params / 1e9 == pytest.approx(7.74, abs=0.05)
    assert plan.Model.named("Qwen2.5-72B-Instruct").params / 1e9 == pytest.approx(72.7, abs=0.5)


def test_kv_per_replica_matches_kvcache_and_by_hand(tiny_dir):
    model, gpu = plan.Model.from_dir(tiny_dir), plan.GPU.named("H200")
    kv = plan.kv_per_replica(model, gpu, tp=1, cache_ratio=0.5)
    free = gpu.memory_gib * 2**30 - model.weights_bytes
    got = kvcache.predict(tiny_dir, 0.5, free_bytes=int(free - kvcache.CUDA_CONTEXT_BYTES), gpu_name="H200")
    assert kv["tokens per replica"] == pytest.approx(got["tokens"], rel=0.001)  # blocks round down in lmdeploy
    # by hand: internlm2.5-7b on H200, tp 2: 14.41 GiB of weights, 7.21 per GPU, 128 KiB of KV per token over 2 GPUs
    m7 = plan.Model.named("internlm2_5-7b-chat")
    kv2 = plan.kv_per_replica(m7, gpu, tp=2, cache_ratio=0.8)
    per_gpu_free = 140.4 * 2**30 - m7.weights_bytes / 2 - 800 * 2**20 - (8192 + 2048) * 92544 * 2
    assert kv2["KV GiB per GPU"] == pytest.approx(0.8 * per_gpu_free / 2**30, rel=1e-9)
    assert kv2["tokens per replica"] == int(0.8 * per_gpu_free // (131072 / 2))
    with pytest.raises(plan.PlanError, match="does not fit"):
        plan.kv_per_replica(plan.Model.named("Qwen2.5-72B-Instruct"), plan.GPU.named("A100-40GB"), tp=1)


def test_littles_law_by_hand():
    cal = plan.Calibration(c0=0.01, c1=0.001, prefill_s_per_token=0.0001)
    load = plan.Load(rps=10, prompt_tokens=100, reply_tokens=50, latency_s=5)
    # B = lam (p + r c0) / (1 - lam r c1) = 10 (0.01 + 0.5) / (1 - 0.5) = 10.2
    assert plan.batch_for(10, load, cal) == pytest.approx(10.2)
    assert plan.latency_at(10.2, load, cal) == pytest.approx(0.01 + 50 * (0.01 + 0.0102))
    assert plan.batch_for(20, load, cal) == math.inf  # 20 x 50 x 0.001 = 1: the server cannot keep up
    # closed loop: 8 clients, 2 servers sharing one GPU with no host time: GPU steps serialise
    gpu_only = plan.Calibration(0.01, 0.001, 0.0001, host_s=0.0)
    one = plan.closed_loop(gpu_only, load, 8, servers=1)
    two = plan.closed_loop(gpu_only, load, 8, servers=2, share_gpu=True)
    assert one["predicted TPOT ms"] == pytest.approx(18.0) and two["predicted TPOT ms"] == pytest.approx(28.0)
    # latency = TTFT + (reply - 1) x step: unmeasured TTFT is the prefill, 100 x 0.1 ms
    assert one["predicted latency p50 ms"] == pytest.approx(1000 * (0.01 + 49 * 0.018))
    host = plan.Calibration(0.01, 0.001, 0.0001, host_s=0.01)  # all of c0 is host time: it overlaps
    assert plan.closed_loop(host, load, 8, servers=2, share_gpu=True)["predicted TPOT ms"] == pytest.approx(14.0)
    # a measured closed-loop TTFT line: 20 ms + 2 ms x batch, at batch 8
    queued = plan.Calibration(0.01, 0.001, 0.0001, ttft_c0=0.02, ttft_c1=0.002)
    got = plan.closed_loop(queued, load, 8, servers=1)
    assert got["predicted TTFT ms"] == pytest.approx(36.0)
    assert got["predicted latency p50 ms"] == pytest.approx(1000 * (0.036 + 49 * 0.018))


def test_plan_picks_the_fewest_gpus_and_more_load_needs_more():
    light = plan.plan("internlm2_5-7b-chat", "H200", plan.Load(5, 500, 200, 10))
    heavy = plan.plan("internlm2_5-7b-chat", "H200", plan.Load(200, 500, 200, 10))
    assert light["GPUs"] == 1 and heavy["GPUs"] > light["GPUs"]
    assert list(heavy["options"]["GPUs"]) == sorted(heavy["options"]["GPUs"])
    with pytest.raises(plan.PlanError, match="no tp"):
        plan.plan("internlm2_5-7b-chat", "A10", plan.Load(1e6, 500, 200, 0.01), max_replicas=4)
    with pytest.raises(plan.PlanError):
        plan.Load(0, 1, 1, 1)
    with pytest.raises(plan.PlanError, match="unknown GPU"):
        plan.GPU.named("Z80")


def test_calibration_fit_recovers_a_line():
    rows = [{"concurrency": c, "TPOT p50 ms": 5 + 0.5 * c, "ITL p50 ms": 0.1, "TTFT p50 ms": 20.0 + 2 * c}
            for c in (1, 8, 32)]
    model, h200 = plan.Model.named("internlm2_5-1_8b-chat"), plan.GPU.named("H200")
    cal = plan.Calibration.fit(rows, model, h200, prompt_tokens=40)
    assert cal.c0 == pytest.approx(0.005) and cal.c1 == pytest.approx(0.0005)  # TPOT = 5 ms + 0.5 ms x batch
    assert cal.ttft_c0 == pytest.approx(0.020) and cal.ttft_c1 == pytest.approx(0.002)  # TTFT = 20 ms + 2 ms x batch
    assert cal.prefill_s_per_token == pytest.approx(0.022 / 40)  # the lowest level's TTFT, per prompt token
    itl = plan.Calibration.fit(rows, model, h200, prompt_tokens=40, step="ITL p50 ms")
    assert itl.c0 == pytest.approx(0.0001) and itl.c1 == 0.0
    with pytest.raises(plan.PlanError, match="two or more concurrency levels"):
        plan.Calibration.fit(rows[:1], model, h200, prompt_tokens=40)
    with pytest.raises(plan.PlanError, match="no 'TPOT p50 ms'.*scale.calibrate"):  # lab 02's basic columns
        plan.Calibration.fit([{k: v for k, v in r.items() if k != "TPOT p50 ms"} for r in rows], model, h200, 40)
    with pytest.raises(plan.PlanError, match="step must be one of"):
        plan.Calibration.fit(rows, model, h200, prompt_tokens=40, step="latency p50 ms")


def test_planner_check_predicts_with_the_reply_tokens_each_run_measured(tiny_dir):
    """Replies that end early (EOS) are shorter than max_tokens: the prediction uses what each run measured."""
    import pandas as pd

    sweep = [{"concurrency": c, "TPOT p50 ms": 5.0, "TTFT p50 ms": 20.0 + 2 * c} for c in (1, 8)]
    base = {"strategy": "-", "servers": 1, "concurrency": 8, "latency p50 ms": 100.0}
    runs = pd.DataFrame([{**base, "setup": "own column", "tokens per request": 16.0},
                         {**base, "setup": "from rates", "output tokens/s": 200.0, "requests/s": 10.0},
                         {**base, "setup": "neither"}])
    got, _ = scale.planner_check(sweep, runs, tiny_dir, reply_tokens=64, gpu=plan.GPU.named("H200"))
    assert got["reply tokens"].tolist() == [16, 20, 64]
    # TTFT(8) = 36 ms, then (tokens - 1) steps of 5 ms
    assert got["predicted latency p50 ms"].tolist() == pytest.approx([36 + 15 * 5, 36 + 19 * 5, 36 + 63 * 5])


BURSTY = STANDIN + ["--burst", "4", "--token-delay", "0.004", "--prefill", "0.03"]


def test_planner_predicts_a_bursty_server_and_the_chunk_gap_fit_misses(tiny_dir):
    """Issue 16: a server that streams like TurboMind (4 tokens back to back, then a wait of 4 token times) and
    queues prefills. Fitted on TPOT and a closed-loop TTFT line, the planner predicts the 1-server latency within
    lab 07's 1.5x; the old fit of the same measurements (chunk gaps, ~0 inside a burst, and the concurrency-1
    TTFT) misses it."""
    g = proxy.Group(TINY, servers=2, strategies=["min_expected_latency"], command=BURSTY, heartbeat=1, show=False,
                    name=f"p{int(time.time() * 1000) % 100000}")
    try:
        load = dict(concurrency=8, requests=24, max_tokens=32)
        results, _ = scale.compare(g, interval=0.2, **load)
        sweep = scale.calibrate(g.servers[0], **load)
        basic = loadtest.run(g.servers[0], concurrency=2, requests=2, max_tokens=4)
    finally:
        g.stop(quiet=True)
    assert "ITL p50 ms" in basic and "TPOT p50 ms" not in basic  # lab 02's table keeps its columns
    assert (results["failed"] == 0).all() and (results["tokens per request"] == 32).all()
    # 32 tokens in 8 bursts 16 ms apart: 7 x 16 ms over 31 tokens after the first = 3.6 ms (slower on a busy CPU)
    assert sweep["TPOT p50 ms"].between(3.5, 6.0).all(), sweep["TPOT p50 ms"].tolist()
    assert (sweep["ITL p50 ms"] < sweep["TPOT p50 ms"] / 3).all(), "the stand-in did not stream in bursts"
    h200 = plan.GPU.named("H200")
    planned, cal = scale.planner_check(sweep, results, tiny_dir, reply_tokens=32, share_gpu=False, gpu=h200)
    ratio = dict(zip(planned["servers"], planned["latency measured/predicted"]))
    assert cal.source == "measured (TPOT p50 ms)" and cal.ttft_c1 > 0, cal  # prefills queue at concurrency 8
    assert 1 / 1.5 <= ratio[1] <= 1.5, planned.to_dict("records")  # the notebook's bounds
    assert 1 / 3.0 <= ratio[2] <= 3.0, planned.to_dict("records")
    # the planner before issue 16, on the same measurements: step = chunk gaps, TTFT = the concurrency-1 prefill
    old = replace(plan.Calibration.fit(sweep, plan.Model.from_dir(tiny_dir), h200, 32, step="ITL p50 ms"), ttft_c0=None)
    pred = plan.closed_loop(old, plan.Load(1.0, 32, 32, 3600), 8, servers=1)
    old_ratio = float(results["latency p50 ms"].iloc[0]) / pred["predicted latency p50 ms"]
    assert old_ratio > 1.5, f"the old fit (chunk gaps, TTFT at concurrency 1) should miss, got {old_ratio:.2f}"


FAST = STANDIN + ["--token-delay", "0"]  # streams as fast as it can: what is slower through the proxy is the relay


def _relay_adds(table, requests: int) -> None:
    """What must hold when a proxy relays the stream: every request ok, and TPOT through it above direct by more
    than run-to-run noise (15 %: controls differed by up to 5 %)."""
    direct, via = table.set_index("setup").loc[["direct", "through the proxy"]].to_dict("records")
    assert (table["failed"] == 0).all() and (table["ok"] == requests).all(), table["first error"].tolist()
    assert via["TPOT p50 ms"] > 1.15 * direct["TPOT p50 ms"], \
        f"no relay cost: TPOT {via['TPOT p50 ms']} ms through the 'proxy', {direct['TPOT p50 ms']} ms direct"


def test_relay_cost_direct_vs_through_the_proxy(tiny_dir):
    """The proxy's relay measured: one stand-in streaming 256 tokens per request as fast as it can, 8 clients,
    direct and through a real `lmdeploy serve proxy` with only it as node. The check fails on a control whose
    'proxy' is the server itself, and relay_cost refuses a proxy with two nodes."""
    g = proxy.Group(TINY, servers=2, command=FAST, heartbeat=1, show=False,
                    name=f"rc{int(time.time() * 1000) % 100000}")
    load = dict(concurrency=8, requests=32, max_tokens=256, rounds=3)
    try:
        with pytest.raises(proxy.ProxyError, match="not to .* alone"):
            scale.relay_cost(g.servers[0], g.proxy(), **load)
        with pytest.raises(proxy.ProxyError, match="must be a labkit.proxy.Proxy"):
            scale.relay_cost(g.servers[0], g.servers[0], **load)
        table = scale.relay_cost(g.servers[0], **load)  # its own proxy, one node
        control = scale.relay_rows(g.servers[0], g.servers[0], **load)  # the "proxy" is the server itself
    finally:
        g.stop(quiet=True)
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print("\n" + table.to_string(index=False) + "\ncontrol (the 'proxy' is the server itself):\n"
              + control.to_string(index=False))
    _relay_adds(table, 32)
    via = table.iloc[1]
    assert via["proxy CPU us per token"] > 0 and via["added ms per token"] > 0
    with pytest.raises(AssertionError, match="no relay cost"):
        _relay_adds(control, 32)


def test_loadtest_retry_bounds():
    with pytest.raises(loadtest.LoadTestError, match="retries"):
        loadtest.run("http://127.0.0.1:9", retries=99, model="m")


# ----------------------------------------------------------------------------- GPU: real api_servers

@pytest.mark.gpu
def test_gpu_what_slows_two_servers_on_one_gpu():
    """Lab 07 measured two servers behind the proxy slower per token than one direct (TurboMind, tiny model). Two
    suspects, measured apart on the suite's engine: the proxy's relay (one server direct vs through a proxy with it
    as only node) and sharing the GPU (one server alone vs two loaded at once, each direct). Prints both."""
    import threading

    import pandas as pd

    from helpers import TRAINED
    from labkit.models import resolve

    load = dict(concurrency=8, requests=32, max_tokens=32)
    with proxy.Group(resolve(TRAINED), servers=2, strategies=["random"], cache_ratio=0.05, show=False,
                     name="gpu-share") as g:
        for srv in g.servers:  # warm at the measured concurrency
            loadtest.run(srv, 8, 8, 16)
        relay = scale.relay_cost(g.servers[0], rounds=2, **load)
        alone = loadtest.run(g.servers[0], load["concurrency"], load["requests"], load["max_tokens"], extended=True)
        both: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda i=i: both.__setitem__(i, loadtest.run(
            g.servers[i], load["concurrency"], load["requests"], load["max_tokens"], extended=True))) for i in (0, 1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    cols = ["ok", "failed", "output tokens/s", "TTFT p50 ms", "TPOT p50 ms", "latency p50 ms"]
    share = pd.DataFrame([{"setup": "1 server alone", **{c: alone[c] for c in cols}}]
                         + [{"setup": f"server {i} while both are loaded", **{c: both[i][c] for c in cols}}
                            for i in (0, 1)])
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print("\n" + relay.to_string(index=False) + "\n" + share.to_string(index=False))
    assert (relay["failed"] == 0).all() and (share["failed"] == 0).all()


@pytest.mark.gpu
def test_real_api_server_killed_mid_test_and_nothing_left():
    """Two real api_servers behind the real proxy on one GPU: one is SIGKILLed during a load test, the proxy
    drops it, the survivor answers, and the group's processes and GPU memory are gone after stop."""
    from labkit.gpu import memory_used

    base = memory_used()
    g = proxy.Group(TINY, servers=2, cache_ratio=0.05, name="gpu-kill", heartbeat=2, show=False)
    pids = g.pids()
    try:
        result = scale.kill_test(g, at=1.0, concurrency=8, requests=160, max_tokens=32, retries=3)
        assert result["dropped after s"] is not None and result["dropped after s"] < 15
        assert result["summary"]["ok"] > 0
        after = result["records"][result["records"]["phase"] == scale.PHASES[2]]
        assert after["ok"].all(), after[~after["ok"]]["error"].tolist()[:3]
        row = loadtest.run(g.proxy(), concurrency=4, requests=8, max_tokens=8, require_finish=True)
        assert row["failed"] == 0, row["first error"]
    finally:
        g.stop(quiet=True)
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left
    assert memory_used() <= base + 512 * 2**20
