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
    per KV policy (`kvcache.sweep`)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    for kv, part in runs.groupby("kv"):
        left.plot(part["ratio"], part["GPU memory GiB"], "o", label=kv)
    left.set(xlabel="cache_max_entry_count", ylabel="GPU memory of the engine, GiB", title="memory follows the ratio")
    left.legend()
    runs.groupby("kv")["tokens per KV GiB"].mean().plot.bar(ax=right, rot=0, title="tokens per GiB of KV cache")
    fig.tight_layout()
    plt.show()
