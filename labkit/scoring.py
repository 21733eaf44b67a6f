"""What a student's work earns: a rubric item's points with the sentence that says why (`score_item`), and
a student's `Grade` (items, findings, verdict). The finding kinds that take credit away (`UNCREDIT`) and how
the report words them (`WHY`). labkit.grade, labkit.grade_report and labkit.rerun use it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from labkit.integrity import Finding
from labkit.rubric import Item, Rubric

UNCREDIT = {"cleared", "tampered", "chain", "student", "raised", "generated", "inconsistent", "shared"}
WHY = {"cleared": "outputs cleared", "tampered": "evidence does not match the notebook",
       "chain": "evidence chain broken", "student": "another student's evidence", "raised": "the notebook raised",
       "generated": "run on a generated model", "inconsistent": "figures contradict each other",
       "shared": "evidence shared with another student"}


@dataclass
class Submission:
    """One student's notebooks (lab name -> notebook dict) and where they came from."""

    student: str
    source: Path
    notebooks: dict[str, dict]
    findings: list[Finding] = field(default_factory=list)


@dataclass
class ItemResult:
    """One rubric item for one student."""

    item: Item
    score: float
    status: str  # passed, failed, missing, flagged
    text: str


@dataclass
class Grade:
    """One student's grade: items, findings (per lab, and for the whole submission), verdict."""

    student: str
    items: list[ItemResult]
    findings: dict[str, list[Finding]]
    records: dict[str, list[dict]]
    rerun: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Points earned."""
        return sum(r.score for r in self.items)

    def flags(self) -> list[str]:
        """The kinds of findings that took credit away, sorted."""
        return sorted({f.kind for fs in self.findings.values() for f in fs if f.kind in UNCREDIT})

    @property
    def verdict(self) -> str:
        """complete (every item passed), partial, or flagged (something does not add up)."""
        if self.flags():
            return "flagged"
        return "complete" if all(r.status == "passed" for r in self.items) else "partial"


def score_item(item: Item, findings: dict[str, list[Finding]], records: dict[str, list[dict]],
               rubric: Rubric) -> ItemResult:
    """Points for one item, with a sentence that says why."""
    lab = item.notebook
    if lab not in records:
        return ItemResult(item, 0.0, "missing", f"{lab} was not handed in")
    whole = sorted({WHY[f.kind] for f in findings.get("submission", []) if f.kind in UNCREDIT})
    if whole:
        return ItemResult(item, 0.0, "flagged", f"not credited: {'; '.join(whole)} (see below)")
    blocking = [f for f in findings.get(lab, []) if f.kind in UNCREDIT and (f.kind != "generated" or item.course_model)]
    if blocking:
        return ItemResult(item, 0.0, "flagged", "not credited: " + "; ".join(f.text for f in blocking[:3]))
    recs = records[lab]
    if item.kind == "checks":
        checks = [r for r in recs if r.get("kind") == "check"]
        failed = [r["values"]["what"] for r in checks if not r["values"].get("passed")]
        if failed:
            return ItemResult(item, 0.0, "failed", f"check failed: {failed[0]}")
        if len(checks) < item.min_checks:
            return ItemResult(item, 0.0, "missing", f"{len(checks)} of at least {item.min_checks} checks ran")
        return ItemResult(item, item.points, "passed", f"all {len(checks)} checks passed")
    rec = next((r for r in reversed(recs) if r.get("kind") == "record" and r.get("step") == item.step), None)
    if rec is None:
        return ItemResult(item, 0.0, "missing", f"no '{item.step}' evidence in {lab} (that cell did not run)")
    said = [c.evaluate(rec.get("values") or {}) for c in item.conditions]
    bad = [t for ok, t in said if not ok]
    if bad:
        return ItemResult(item, 0.0, "failed", "; ".join(bad))
    return ItemResult(item, item.points, "passed", "; ".join(t for _, t in said) or "recorded")
