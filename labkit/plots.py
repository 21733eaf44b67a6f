"""Plots the labs share (matplotlib): memory budgets, benchmark bars, sweeps."""
from __future__ import annotations


def budget_bars(budget, ax=None):
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
    return ax
