"""report.html for `labkit grade`: per class a table and plots (inline PNG, matplotlib), per student what
passed, what is missing and what does not add up, in plain words. One file, readable in any browser.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.rubric import Rubric, get
from labkit.scoring import UNCREDIT, WHY

if TYPE_CHECKING:
    from labkit.scoring import Grade

COLOURS = {"passed": "#d4edda", "failed": "#fff3cd", "missing": "#eeeeee", "flagged": "#f8d7da"}
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}.wide{overflow-x:auto}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f4f4f4}.plots img{max-width:48%;margin:0 1% 1em 0;border:1px solid #eee}
h2{border-bottom:2px solid #ddd;padding-bottom:4px}.flag{color:#a00}.warn{color:#8a6d00}li{margin:2px 0}"""
SPEEDS = [("homework-story", "tokens_per_s"), ("homework-story-api", "tokens_per_s"),
          ("baseline", "reply_tokens_per_s")]
MEMORY = [("homework-w4a16-kv-int4", "gpu_memory_gib", "W4A16 + int4 KV server"),
          ("chat-speed", "engine_memory_gib", "lab 01 engine"),
          ("awq-gpu", "table[1].GPU memory GiB", "AWQ engine")]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _gpu(rec: dict) -> str:
    return (rec.get("environment") or {}).get("gpu") or "CPU (no GPU)"


def _trusted(g: Grade) -> dict[str, list[dict]]:
    """Records of labs whose evidence was not flagged (the plots show only what can be believed)."""
    bad_sub = any(f.kind in UNCREDIT for f in g.findings.get("submission", []))
    return {lab: recs for lab, recs in g.records.items()
            if not bad_sub and not any(f.kind in UNCREDIT - {"generated"} for f in g.findings.get(lab, []))}


def plots(grades: list[Grade], rubric: Rubric) -> list[str]:
    """The class plots as <img> tags: completion per lab, tokens/s and memory by GPU, AWQ size ratio, time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    labs = rubric.notebooks or sorted({i.notebook for i in rubric.items})
    share = []
    for lab in labs:
        items = [i for i, it in enumerate(rubric.items) if it.notebook == lab]
        done = [all(g.items[i].status == "passed" for i in items) for g in grades] if items else []
        share.append(100 * sum(done) / len(grades) if done else 0)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(labs, share, color="#4c78a8")
    ax.set_ylabel("% of students, every item passed")
    ax.set_ylim(0, 100)
    ax.set_title("Completion per lab")
    ax.tick_params(axis="x", rotation=30)
    out.append(_png(fig))
    trusted = [(_trusted(g), g.student) for g in grades]
    speed, memory, ratio, minutes = defaultdict(list), defaultdict(list), [], defaultdict(dict)
    for recs, student in trusted:
        flat = [r for rs in recs.values() for r in rs if r.get("kind") == "record"]
        for r in flat:
            for step, path in SPEEDS:
                v = get(r.get("values") or {}, path) if r.get("step") == step else None
                if isinstance(v, (int, float)):
                    speed[f"{_gpu(r)}\n{step}"].append(v)
            for step, path, label in MEMORY:
                v = get(r.get("values") or {}, path) if r.get("step") == step else None
                if isinstance(v, (int, float)):
                    memory[f"{_gpu(r)}\n{label}"].append(v)
            if r.get("step") == "awq":
                a, b = (get(r["values"], f"sizes[{i}].MiB on disk") for i in (0, 1))
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
                    ratio.append((student, b / a))
        for lab, rs in recs.items():
            times = sorted(_dt.datetime.fromisoformat(r["time"]) for r in rs if r.get("time"))
            if len(times) > 1:
                minutes[student][lab] = (times[-1] - times[0]).total_seconds() / 60
    for data, title, unit in ((speed, "Tokens/s by GPU model (one sequence)", "tokens/s"),
                              (memory, "GPU memory by GPU model", "GiB")):
        fig, ax = plt.subplots(figsize=(6, 3))
        if data:
            keys = sorted(data)
            ax.boxplot([data[k] for k in keys], showmeans=True)
            ax.set_xticks(range(1, len(keys) + 1), keys, fontsize=7)
            ax.set_ylabel(unit)
        else:
            ax.text(0.5, 0.5, "no such figures in the unflagged submissions\n(they come from GPU runs)", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
        ax.set_title(title)
        out.append(_png(fig))
    fig, ax = plt.subplots(figsize=(6, 3))
    if ratio:
        ax.bar([s for s, _ in ratio], [r for _, r in ratio], color="#59a14f")
        ax.axhline(1.0, color="#999", lw=1)
        ax.set_ylabel("AWQ size / original size")
        ax.tick_params(axis="x", rotation=30)
    else:
        ax.text(0.5, 0.5, "no unflagged AWQ evidence", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("AWQ size ratio on disk")
    out.append(_png(fig))
    fig, ax = plt.subplots(figsize=(6, 3))
    students = sorted(minutes)
    bottom = [0.0] * len(students)
    longest = max([sum(m.values()) for m in minutes.values()] or [0])
    scale, unit = (1, "minutes") if longest >= 2 else (60, "seconds")
    for lab in labs:
        vals = [minutes[s].get(lab, 0.0) * scale for s in students]
        if any(vals):
            ax.bar(students, vals, bottom=bottom, label=lab)
            bottom = [b + v for b, v in zip(bottom, vals)]
    if students:
        ax.set_ylabel(f"{unit}, first to last record")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", rotation=30)
    ax.set_title("Time spent per lab (unflagged evidence)")
    out.append(_png(fig))
    return out


def _student(g: Grade) -> str:
    e = html.escape
    passed = [r for r in g.items if r.status == "passed"]
    rows = "".join(f"<tr style='background:{COLOURS[r.status]}'><td>{e(r.item.title)}</td><td>{r.score:g} / "
                   f"{r.item.points:g}</td><td>{e(r.status)}</td><td>{e(r.text)}</td></tr>" for r in g.items)
    notes = [(f.kind, f.text) for fs in g.findings.values() for f in fs]
    lines = "".join(f"<li class='{'flag' if k in UNCREDIT else 'warn'}'>{e(WHY.get(k, 'note'))}: {e(t)}</li>"
                    for k, t in notes)
    absent = sorted({r.item.notebook for r in g.items if r.status == "missing" and r.item.notebook not in g.records})
    missing = [r.item.title for r in g.items if r.status == "missing" and r.item.notebook in g.records]
    summary = (f"{len(passed)} of {len(g.items)} items passed, {g.total:g} points. "
               + (f"Labs not handed in: {', '.join(absent)}. " if absent else "")
               + (f"Missing: {', '.join(missing)}. " if missing else "")
               + ("Nothing looks wrong." if not notes else f"{len(notes)} thing(s) to look at below."))
    rerun = "".join(f"<li>{e(t)}</li>" for t in g.rerun)
    return (f"<h3 id='s-{e(g.student)}'>{e(g.student)}: {e(g.verdict)}</h3><p>{e(summary)}</p>"
            f"<table><tr><th>item</th><th>points</th><th>status</th><th>why</th></tr>{rows}</table>"
            + (f"<p><b>Does not add up / to look at:</b></p><ul>{lines}</ul>" if lines else "")
            + (f"<p><b>Re-run on the instructor's machine:</b></p><ul>{rerun}</ul>" if rerun else ""))


def _rubric_table(rubric: Rubric) -> str:
    """What each item reads and gives, as the rubric file says."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(i.id)}</td><td>{e(i.title)}</td><td>{i.points:g}</td><td>{e(i.reads())}"
                   + (" (course model)" if i.course_model and rubric.require_course_model else "") + "</td></tr>"
                   for i in rubric.items)
    return (f"<h2>Rubric</h2><p>{e(str(rubric.path))}: edit points and thresholds there.</p>"
            f"<table><tr><th>item</th><th>title</th><th>points</th><th>reads</th></tr>{rows}</table>")


def write_report(grades: list[Grade], rubric: Rubric, path: Path) -> Path:
    """Write the class report to `path`."""
    e = html.escape
    head = "".join(f"<th title='{e(i.title)}'>{e(i.id).replace('_', '_<wbr>')}<br><small>{i.points:g}</small></th>"
                   for i in rubric.items)
    body = "".join(
        f"<tr><td><a href='#s-{e(g.student)}'>{e(g.student)}</a></td>"
        + f"<td><b>{g.total:g}</b></td><td>{e(g.verdict)}</td><td class='flag'>{e(', '.join(g.flags()))}</td>"
        + "".join(f"<td style='background:{COLOURS[r.status]}' title='{e(r.text)}'>{r.score:g}</td>" for r in g.items)
        + "</tr>"
        for g in grades)
    legend = " ".join(f"<span style='background:{c};padding:2px 6px'>{k}</span>" for k, c in COLOURS.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(rubric.title)}: grades</title>"
            f"<style>{CSS}</style></head><body><h1>{e(rubric.title)}</h1>"
            f"<p>{len(grades)} submissions graded against {e(rubric.path.name)} ({rubric.max_points:g} points) on "
            f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Evidence is tamper-evident, not tamper-proof: see "
            f"the README's 'For instructors'.</p><h2>Class</h2><p>{legend}</p>"
            f"<div class='wide'><table><tr><th>student</th><th>total<br><small>{rubric.max_points:g}</small></th>"
            "<th>verdict</th>"
            f"<th>flags</th>{head}</tr>"
            f"{body}</table></div>"
            f"<div class='plots'>{''.join(plots(grades, rubric))}</div><h2>Students</h2>"
            + "".join(_student(g) for g in grades) + _rubric_table(rubric) + "</body></html>")
    path.write_text(page, encoding="utf-8")
    return path
