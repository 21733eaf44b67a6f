"""Rubrics for `labkit grade`: TOML files that say, per item, which evidence step of which lab it reads,
which values, what they must satisfy, and how many points it gives (grading/rubric.toml is the course's).

    [[items]]
    id = "story"                       # column name in grades.csv
    title = "Homework: a ~300-character story"
    notebook = "01_chat"               # the lab (labkit.setup's name)
    step = "homework-story"            # the labkit.record(step, ...) it reads; kind = "checks": the lab's checks
    points = 15
    course_model = true                # no credit for a run on a generated model (when the rubric requires it)
    conditions = [ { value = "characters", min = 250, max = 400 }, { value = "finish_reason", equals = "stop" } ]

A value is a path into the record's values: `a.b`, `rows[0].x`, `rows[-1].x`, `rows[ratio=0.4].x` (first row
whose `ratio` is 0.4), `transcript[what^=calls ]` (every row whose `what` starts with "calls ").
`ratio = ["p", "q"]` tests p / q instead. Tests: min, max, equals, one_of, nonempty, count_min.
"""
from __future__ import annotations

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package (requirements.txt)
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from labkit.errors import InputError

OPS = ("min", "max", "equals", "one_of", "nonempty", "count_min")
MISSING = object()


class RubricError(InputError):
    """A rubric that cannot be used; the message names the file, the item and the fix."""


@dataclass
class Condition:
    """One test on one value (or on the ratio of two) of an evidence record."""

    value: str | None
    ratio: tuple[str, str] | None
    tests: dict[str, Any]

    def paths(self) -> list[str]:
        """The value paths this condition reads."""
        return list(self.ratio) if self.ratio else [self.value]

    def evaluate(self, values: dict) -> tuple[bool, str]:
        """(passed, a sentence with the value found and what was needed)."""
        if self.ratio:
            num, den = (get(values, p) for p in self.ratio)
            label = f"{self.ratio[0]} / {self.ratio[1]}"
            if not _number(num) or not _number(den) or den == 0:
                return False, f"{label}: no numbers to divide ({_show(num)} / {_show(den)})"
            got: Any = num / den
        else:
            label, got = self.value, get(values, self.value)
        if got is MISSING:
            return False, f"{label}: not in the record"
        for op, want in self.tests.items():
            ok = _test(op, got, want)
            if not ok:
                return False, f"{label} = {_show(got)}, needs {_need(op, want)}"
        return True, f"{label} = {_show(got)}"


@dataclass
class Item:
    """One line of the grade: a step (or a lab's checks), its conditions and its points."""

    id: str
    title: str
    notebook: str
    step: str | None
    points: float
    kind: str = "record"
    course_model: bool = False
    min_checks: int = 1
    conditions: list[Condition] = field(default_factory=list)

    def reads(self) -> str:
        """What the item reads, in words (for the report and results.json)."""
        if self.kind == "checks":
            return f"every labkit.check in {self.notebook} (at least {self.min_checks}, all passed)"
        paths = sorted({p for c in self.conditions for p in c.paths()})
        return f"record '{self.step}' of {self.notebook}: " + ", ".join(paths)


@dataclass
class Rubric:
    """A parsed rubric file."""

    path: Path
    title: str
    require_course_model: bool
    notebooks: list[str]
    items: list[Item]
    integrity: dict[str, Any]
    rerun: list[dict]

    @property
    def max_points(self) -> float:
        """The points of all items together."""
        return sum(i.points for i in self.items)


def load(path: str | Path) -> Rubric:
    """Read and check a rubric TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RubricError(f"no rubric at {path}: give --rubric grading/rubric.toml (or a copy you edited)") from None
    except tomllib.TOMLDecodeError as err:
        raise RubricError(f"{path} is not valid TOML ({err}): fix that line") from None
    course = raw.get("course", {})
    items, seen = [], set()
    for n, it in enumerate(raw.get("items", []), start=1):
        where = f"{path.name}, item {n} ({it.get('id', 'no id')})"
        for key in ("id", "notebook", "points"):
            if key not in it:
                raise RubricError(f"{where}: needs `{key} = ...`")
        if it["id"] in seen:
            raise RubricError(f"{where}: id {it['id']!r} is used twice; ids name the CSV columns")
        seen.add(it["id"])
        kind = it.get("kind", "record")
        if kind not in ("record", "checks"):
            raise RubricError(f"{where}: kind must be 'record' or 'checks', not {kind!r}")
        if kind == "record" and not it.get("step"):
            raise RubricError(f"{where}: needs `step = ...`, the labkit.record step it reads")
        conds = [_condition(c, where) for c in it.get("conditions", [])]
        items.append(Item(id=it["id"], title=it.get("title", it["id"]), notebook=it["notebook"],
                          step=it.get("step"), points=float(it["points"]), kind=kind,
                          course_model=bool(it.get("course_model", False)),
                          min_checks=int(it.get("min_checks", 1)), conditions=conds))
    if not items:
        raise RubricError(f"{path} has no [[items]]: add at least one (see grading/rubric.toml)")
    return Rubric(path=path, title=course.get("title", path.stem), notebooks=list(course.get("notebooks", [])),
                  require_course_model=bool(course.get("require_course_model", False)), items=items,
                  integrity=raw.get("integrity", {}), rerun=list(raw.get("rerun", {}).get("figures", [])))


def _condition(c: dict, where: str) -> Condition:
    tests = {k: v for k, v in c.items() if k in OPS}
    unknown = set(c) - set(OPS) - {"value", "ratio"}
    if unknown:
        raise RubricError(f"{where}: unknown condition key(s) {sorted(unknown)}; use value/ratio and {', '.join(OPS)}")
    if ("value" in c) == ("ratio" in c):
        raise RubricError(f"{where}: a condition needs either `value = \"path\"` or `ratio = [\"a\", \"b\"]`")
    if not tests:
        raise RubricError(f"{where}: condition on {c.get('value') or c.get('ratio')} has no test ({', '.join(OPS)})")
    ratio = c.get("ratio")
    if ratio is not None and (not isinstance(ratio, list) or len(ratio) != 2):
        raise RubricError(f"{where}: ratio must be two value paths, e.g. ratio = [\"sizes[1].MiB\", \"sizes[0].MiB\"]")
    return Condition(value=c.get("value"), ratio=tuple(ratio) if ratio else None, tests=tests)


def split_path(path: str) -> list[str]:
    """`a.b[0].c[x=0.4]` -> ['a', '[0]', 'b'...]: keys and [selectors], dots inside brackets kept."""
    parts, cur, depth = [], "", 0
    for ch in path:
        if ch == "[" and depth == 0:
            if cur:
                parts.append(cur)
            cur, depth = "[", 1
        elif ch == "]" and depth == 1:
            parts.append(cur + "]")
            cur, depth = "", 0
        elif ch == "." and depth == 0:
            if cur:
                parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def get(values: Any, path: str) -> Any:
    """The value at `path` in a record's values, or MISSING."""
    cur = values
    for part in split_path(path):
        if part.startswith("["):
            cur = _select(cur, part[1:-1])
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return MISSING
        if cur is MISSING:
            return MISSING
    return cur


def _select(rows: Any, sel: str) -> Any:
    if not isinstance(rows, list):
        return MISSING
    if "^=" in sel:
        key, prefix = sel.split("^=", 1)
        return [r for r in rows if isinstance(r, dict) and str(r.get(key, "")).startswith(prefix)]
    if "=" in sel:
        key, want = sel.split("=", 1)
        return next((r for r in rows if isinstance(r, dict) and _same(r.get(key), want)), MISSING)
    try:
        return rows[int(sel)]
    except (ValueError, IndexError):
        return MISSING


def _same(got: Any, want: str) -> bool:
    try:
        return abs(float(got) - float(want)) < 1e-9
    except (TypeError, ValueError):
        return str(got) == want


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _test(op: str, got: Any, want: Any) -> bool:
    if op in ("min", "max"):
        return _number(got) and (got >= want if op == "min" else got <= want)
    if op == "equals":
        return got == want
    if op == "one_of":
        return got in want
    if op == "nonempty":
        return bool(got) == bool(want) and got is not None
    if op == "count_min":
        return isinstance(got, list) and len(got) >= want
    return False


def _need(op: str, want: Any) -> str:
    return {"min": f"at least {want}", "max": f"at most {want}", "equals": f"{want!r}",
            "one_of": f"one of {want}", "nonempty": "some text" if want else "nothing",
            "count_min": f"at least {want} of them"}[op]


def _show(x: Any) -> str:
    if x is MISSING:
        return "missing"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return f"{len(x)} entries"
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."
