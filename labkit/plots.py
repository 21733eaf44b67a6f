"""Plots the labs share (matplotlib): memory budgets, benchmark bars, sweeps."""
from __future__ import annotations


def budget_bars(budget, ax=None) -> None:
    """Stacked bars of weights / KV cache / runtime / free per KV policy (lab 00, 04)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 2.8))
    parts = [("weights GiB", "tab:blue"), ("kv cache GiB", "tab:orange"), ("runtime GiB", "tab:gray"),
             ("left free GiB", "tab:green")]
    left = [0.0] * len(budget)
    labels = [f"{p}\n{t:,} tokens" for p, t in zip(budget["kv policy"], budget["tokens that fit"])]
    for col, color in parts:
        vals = budget[col].tolist()
        ax.barh(labels, vals, left=left, color=color, label=col.replace(" GiB", ""))
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("GiB")
    ax.set_title("GPU memory budget (cache_max_entry_count applies to what weights leave free)")
    ax.legend(loc="lower right", fontsize=8)
    ax.figure.tight_layout()
    plt.show()


def speed_bars(table, value: str = "output tok/s", ax=None) -> None:
    """Grouped bars of `value` per batch size, one colour per engine, log scale (lab 01's speed comparison)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    engines = list(dict.fromkeys(table["engine"]))
    batches = sorted(set(table["batch"]))
    width = 0.8 / len(engines)
    for i, name in enumerate(engines):
        rows = table[table["engine"] == name].set_index("batch")
        xs = [b + (i - (len(engines) - 1) / 2) * width for b in range(len(batches))]
        vals = [float(rows[value].get(b, float("nan"))) for b in batches]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel(value)
    ax.set_title(f"{value} (higher is better)")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    plt.show()


def size_bars(sizes, ax=None) -> None:
    """Bars of each model's size on disk, MiB (lab 03: `quant.compare_sizes`)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    bars = ax.bar(sizes["model"], sizes["MiB on disk"], color=["tab:blue", "tab:orange", "tab:green"][:len(sizes)])
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in sizes["MiB on disk"]], fontsize=8)
    ax.set(ylabel="MiB", title="size on disk")
    ax.figure.tight_layout()
    plt.show()


def kv_sweep(runs) -> None:
    """Lab 04's sweep: the engine's GPU memory against cache_max_entry_count, and tokens per GiB of KV cache,
    per KV policy (`kvsweep.sweep`)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    for kv, part in runs.groupby("kv"):
        left.plot(part["ratio"], part["GPU memory GiB"], "o", label=kv)
    left.set(xlabel="cache_max_entry_count", ylabel="GPU memory of the engine, GiB", title="memory follows the ratio")
    left.legend()
    runs.groupby("kv")["tokens per KV GiB"].mean().plot.bar(ax=right, rot=0, title="tokens per GiB of KV cache")
    fig.tight_layout()
    plt.show()


def scale_bars(table) -> None:
    """Lab 07: requests/s and latency p50 / p90 for one server and for two behind each routing strategy."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    labels = [s.replace(", proxy ", "\n") for s in table["setup"]]
    bars = a.bar(labels, table["requests/s"], color="tab:blue")
    a.bar_label(bars, labels=[f"{v:,.1f}" for v in table["requests/s"]], fontsize=8)
    a.set(ylabel="requests/s", title="throughput")
    x = range(len(labels))
    b.bar([i - 0.2 for i in x], table["latency p50 ms"], 0.4, label="latency p50")
    b.bar([i + 0.2 for i in x], table["latency p90 ms"], 0.4, label="latency p90")
    b.set_xticks(list(x), labels)
    b.set(ylabel="ms", title="request latency")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    plt.show()


def metrics_timeline(samples, marks: dict | None = None) -> None:
    """Lab 07: /metrics over time per server: running and waiting requests, KV cache used, generated tokens/s;
    `marks` = {label: seconds} draws vertical lines (a kill, the start of each run)."""
    import matplotlib.pyplot as plt

    cols = [("running", "running requests"), ("waiting", "waiting requests"), ("KV cache used", "KV cache used (0-1)"),
            ("generated tokens/s", "generated tokens/s")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, (col, title) in zip(axes, cols):
        for server, part in samples.groupby("server"):
            ax.plot(part["t s"], part[col], ".-", label=server)
        for label, t in (marks or {}).items():
            ax.axvline(t, color="gray", ls="--", lw=0.8)
            ax.text(t, ax.get_ylim()[1], label, fontsize=7, rotation=90, va="top")
        ax.set(xlabel="s", title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plt.show()


def kill_timeline(records, kill_s: float, dropped_s: float | None) -> None:
    """Lab 07: each request's latency against when it started, failed ones in red, the kill and the proxy's drop."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ok, bad = records[records["ok"]], records[~records["ok"]]
    ax.scatter(ok["start s"], ok["latency ms"], s=12, label="answered")
    ax.scatter(bad["start s"], bad["latency ms"], s=18, color="tab:red", marker="x", label="failed")
    retried = records[records["retries"] > 0]
    ax.scatter(retried["start s"], retried["latency ms"], s=40, facecolors="none", edgecolors="tab:orange",
               label="retried")
    ax.axvline(kill_s, color="tab:red", ls="--", lw=1)
    ax.text(kill_s, ax.get_ylim()[1], " server killed", color="tab:red", fontsize=8, va="top")
    if dropped_s is not None:
        ax.axvline(kill_s + dropped_s, color="tab:green", ls="--", lw=1)
        ax.text(kill_s + dropped_s, ax.get_ylim()[1] * 0.8, " proxy dropped it", color="tab:green", fontsize=8)
    ax.set(xlabel="request started at (s)", ylabel="latency ms", title="what the clients saw")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


def predicted_vs_measured(table) -> None:
    """Lab 07: the planner's requests/s and latency next to the load test's, per number of servers."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    x = [f"{int(s)} server(s)" for s in table["servers"]]
    idx = range(len(x))
    for ax, (p, m, title) in zip((a, b), (("predicted requests/s", "requests/s", "requests/s"),
                                          ("predicted latency p50 ms", "latency p50 ms", "latency p50 ms"))):
        ax.bar([i - 0.2 for i in idx], table[p], 0.4, label="planner")
        ax.bar([i + 0.2 for i in idx], table[m], 0.4, label="measured")
        ax.set_xticks(list(idx), x)
        ax.set(title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()
