"""What every notebook starts with (`labkit.setup`), the `%%gpu` cell magic, and lab checks.

Cells that need CUDA start with `%%gpu` and carry the cell tag `gpu` (the test suites skip them
where there is no GPU). On a CPU machine a `%%gpu` cell prints one line and Run All goes on.
"""
from __future__ import annotations

import ast

from labkit import config, evidence
from labkit.gpu import NO_GPU_HINT, gpus, has_cuda
from labkit.errors import LabkitError


class LabCheckFailed(LabkitError, AssertionError):
    """A lab's closing check failed; the message says what was expected and what to try."""


def setup(lab: str) -> None:
    """Start a lab: register `%%gpu`, name the lab for evidence, and print where it runs."""
    evidence.set_notebook(lab)
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        register_magics(shell)
    lmd = evidence.version("lmdeploy") or "not installed (run `make lab`)"
    found = gpus()
    if found and has_cuda():
        g = found[0]
        where = f"GPU {g.name}, {g.free_gib:.1f} of {g.total_gib:.1f} GiB free"
    else:
        where = "no CUDA GPU: cells marked %%gpu print a note and are skipped"
    student = evidence.student_id() or "not set (`labkit submit` asks for it)"
    line = f"LMDeploy Lab {lab} | profile {config.profile()} | lmdeploy {lmd} | {where} | student {student}"
    evidence.record_start(line, lab=lab, profile=config.profile())  # shows the line; starts the evidence chain


def run_body(shell, body: str):
    """Run `body` in the notebook's namespace like a cell; return the last expression's value."""
    source = shell.transform_cell(body)
    tree = ast.parse(source)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    ns = shell.user_ns
    exec(compile(tree, "<cell>", "exec"), ns)  # noqa: S102 - the student's own cell
    if last is not None:
        return eval(compile(last, "<cell>", "eval"), ns)  # noqa: S307
    return None


def gpu_cell(line: str, cell: str):
    """`%%gpu`: run the cell only where a CUDA GPU is usable; otherwise print one line."""
    if not has_cuda():
        print(f"skipped: this cell {NO_GPU_HINT}")
        return None
    from IPython import get_ipython

    return run_body(get_ipython(), cell)


def register_magics(shell) -> None:
    """Register labkit's cell magics on an IPython shell."""
    shell.register_magic_function(gpu_cell, magic_kind="cell", magic_name="gpu")


def check(what: str, passed: bool, detail: str = "", fix: str = "") -> None:
    """A lab check: records its result (pass or fail, with the detail), then raises LabCheckFailed if it failed."""
    passed = bool(passed)
    evidence.record_check(what, passed, detail, fix)
    if not passed:
        raise LabCheckFailed(evidence.check_line(what, passed, detail) + (f"\nWhat to try: {fix}" if fix else ""))
