"""Numbers that contradict each other within a submission, and evidence shared between students.
Used by `labkit grade` (labkit.grade) after each notebook's own records were verified (labkit.integrity).
"""
from __future__ import annotations

import re
from itertools import combinations
from typing import Any

from labkit.integrity import Finding
from labkit.rubric import MISSING, get

SPEED_KEYS = ("tokens_per_s", "reply_tokens_per_s")
# AWQ's kernels bring runtime buffers of their own: on the PyTorch engine a 1.5 MiB model went from 0.283 to 0.41 GiB
# of weights + runtime (GPU suite, 2026-12-01). More GPU memory after AWQ contradicts the run only when the weights
# shrank by more than that on disk.
AWQ_MIN_SAVING_GIB = 0.25


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def contradictions(records: list[dict], integrity: dict) -> list[Finding]:
    """Findings for one notebook's records whose figures cannot all be true."""
    found: list[Finding] = []
    by_step = {r.get("step"): r for r in records if r.get("kind") == "record"}
    checks = [r for r in records if r.get("kind") == "check"]
    for rec in by_step.values():
        v, step = rec.get("values") or {}, rec.get("step")
        if isinstance(v.get("text"), str) and _num(v.get("characters")) and v["characters"] != len(v["text"]):
            found.append(Finding("inconsistent", f"{step}: says {v['characters']} characters, its text has "
                                                 f"{len(v['text'])}", step))
        found += _roofline(rec, integrity)
    awq = by_step.get("awq")
    if awq:
        before, after = (get(awq.get("values") or {}, f"sizes[{i}].MiB on disk") for i in (0, 1))
        if _num(before) and _num(after):
            if after > before:
                found.append(Finding("inconsistent", f"awq: the AWQ model is larger on disk than the original "
                                                     f"({before:.1f} -> {after:.1f} MiB)", "awq"))
            for chk in checks:  # the check printed the sizes it saw: they must be the record's
                detail = str((chk.get("values") or {}).get("detail", ""))
                m = re.search(r"([\d.]+) -> ([\d.]+) MiB", detail)
                if "smaller on disk" in str(chk["values"].get("what")) and m and \
                        (abs(float(m[1]) - before) > 0.051 or abs(float(m[2]) - after) > 0.051):
                    found.append(Finding("inconsistent", f"awq: sizes {before:.1f} -> {after:.1f} MiB, but its "
                                                         f"check saw {m[1]} -> {m[2]} MiB", "awq"))
    gpu = by_step.get("awq-gpu")
    if gpu:
        key = "weights + runtime GiB"
        before, after = (get(gpu.get("values") or {}, f"table[{i}].{key}") for i in (0, 1))
        disk = [get((awq or {}).get("values") or {}, f"sizes[{i}].MiB on disk") for i in (0, 1)]
        saved = (disk[0] - disk[1]) / 1024 if all(_num(d) for d in disk) else None  # GiB the weights shrank
        if _num(before) and _num(after) and after > before and (saved is None or saved >= AWQ_MIN_SAVING_GIB):
            found.append(Finding("inconsistent", f"awq-gpu: the AWQ model needs more GPU memory than the original "
                                                 f"({before} -> {after} GiB {key})", "awq-gpu"))
    seq_time = sorted((r.get("seq", 0), str(r.get("time", ""))) for r in records)
    if any(b[1] < a[1] for a, b in zip(seq_time, seq_time[1:])):
        found.append(Finding("inconsistent", "record times go backwards while their sequence numbers go up"))
    uuids = {(r.get("environment") or {}).get("gpu_uuid") for r in records} - {None}
    if len(uuids) > 1:
        found.append(Finding("inconsistent", f"one kernel session reports {len(uuids)} different GPUs"))
    return found


def _roofline(rec: dict, integrity: dict) -> list[Finding]:
    """tokens/s of one sequence above memory bandwidth / weight bytes (nominal figures from the rubric)."""
    v, env = rec.get("values") or {}, rec.get("environment") or {}
    name = str(env.get("gpu") or "")
    bandwidth = next((bw for key, bw in (integrity.get("gpu_bandwidth_gbps") or {}).items() if key in name), None)
    weights = next((gb for key, gb in (integrity.get("weights_gb") or {}).items()
                    if key == str(v.get("model", "")).rstrip("/").rsplit("/", 1)[-1]), None)
    if not bandwidth or not weights:
        return []
    roof = bandwidth / weights * float(integrity.get("roofline_margin", 1.25))
    return [Finding("inconsistent", f"{rec.get('step')}: {k} = {v[k]:,.0f} on {name} is beyond the memory-bandwidth "
                                    f"roofline ({bandwidth} GB/s / {weights} GB = {bandwidth / weights:,.0f} tok/s)",
                    rec.get("step"))
            for k in SPEED_KEYS if _num(v.get(k)) and v[k] > roof]


def fingerprints(records: list[dict], paths: list[str]) -> dict[str, Any]:
    """The figures named `step.path` (from the rubric) that these records hold."""
    out = {}
    by_step = {r.get("step"): r for r in records if r.get("kind") == "record"}
    for full in paths:
        step, _, path = full.partition(".")
        value = get((by_step.get(step) or {}).get("values") or {}, path) if step in by_step else MISSING
        if value is not MISSING and value is not None and value != "":
            out[full] = value
    return out


def shared(students: dict[str, list[dict]], integrity: dict) -> dict[str, list[Finding]]:
    """Per student, the evidence they share with another student (sessions, record times, GPU, figures)."""
    out: dict[str, list[Finding]] = {s: [] for s in students}
    gpu_kind = "shared" if integrity.get("shared_gpu_uuid", "uncredit") == "uncredit" else "warn"
    paths = list(integrity.get("fingerprints", []))
    need = int(integrity.get("fingerprint_min", 2))
    facts = {}
    for s, recs in students.items():
        facts[s] = {"sessions": {r.get("session") for r in recs} - {None},
                    "times": {(r.get("step"), r.get("time")) for r in recs if r.get("time")},
                    "gpus": {(r.get("environment") or {}).get("gpu_uuid") for r in recs} - {None},
                    "figures": fingerprints(recs, paths)}
    for a, b in combinations(sorted(students), 2):
        fa, fb = facts[a], facts[b]
        said = []
        if fa["sessions"] & fb["sessions"]:
            said.append(("shared", "the same kernel session (one run handed in twice)"))
        elif fa["times"] & fb["times"]:
            said.append(("shared", f"{len(fa['times'] & fb['times'])} records with the same step and time to the "
                                   "microsecond"))
        same = sorted(k for k in fa["figures"].keys() & fb["figures"].keys() if fa["figures"][k] == fb["figures"][k])
        if len(same) >= need:
            said.append(("shared", f"identical measured figures ({', '.join(same)})"))
        if fa["gpus"] & fb["gpus"]:
            said.append((gpu_kind, "the same GPU (NVML UUID)"))
        for kind, what in said:
            out[a].append(Finding(kind, f"shares {what} with {b}"))
            out[b].append(Finding(kind, f"shares {what} with {a}"))
    return out
