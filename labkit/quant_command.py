"""The course's `lmdeploy lite auto_awq` command next to lmdeploy 0.18's, checked with lmdeploy's own parser."""
from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

COURSE_COMMAND = ("lmdeploy lite auto_awq {model} --calib-dataset ptb --calib-samples 128 --calib-seqlen 2048 "
                  "--w-bits 4 --w-group-size 128 --batch-size 1 --search-scale False --work-dir {out}")


# ----------------------------------------------------------------------------- the course's command vs today's

def course_command(model: str | Path = "<model>", out: str | Path = "<out>") -> str:
    """The command the course gave (lmdeploy 0.3-0.5)."""
    return COURSE_COMMAND.format(model=model, out=out)


def current_command(model: str | Path = "<model>", out: str | Path = "<out>", w_bits: int = 4,
                    w_group_size: int = 128, calib_samples: int = 128, calib_seqlen: int = 2048,
                    batch_size: int = 1, search_scale: bool = False, calib_dataset: str = "wikitext2",
                    device: str = "cuda") -> str:
    """The same quantization as an lmdeploy 0.18 command line."""
    cmd = (f"lmdeploy lite auto_awq {model} --calib-dataset {calib_dataset} --calib-samples {calib_samples} "
           f"--calib-seqlen {calib_seqlen} --w-bits {w_bits} --w-group-size {w_group_size} "
           f"--batch-size {batch_size}")
    if search_scale:
        cmd += " --search-scale"
    if device != "cuda":
        cmd += f" --device {device} --dtype float16"
    return cmd + f" --work-dir {out}"


_PARSER: dict = {}


def _cli_parser():
    """lmdeploy's own argument parser with its `lite auto_awq` sub-command (built once)."""
    if "p" not in _PARSER:
        from lmdeploy.cli.cli import CLI
        from lmdeploy.cli.lite import SubCliLite

        if "auto_awq" not in SubCliLite.subparsers.choices:
            SubCliLite.add_parser_auto_awq()
        _PARSER["p"] = CLI.parser
        _PARSER["awq"] = SubCliLite.subparsers.choices["auto_awq"]
    return _PARSER["p"]


def check_command(command: str) -> tuple[bool, str]:
    """(accepted, what lmdeploy 0.18's own CLI parser says) for an `lmdeploy lite auto_awq ...` line; runs nothing."""
    argv = shlex.split(command)
    if argv and argv[0] == "lmdeploy":
        argv = argv[1:]
    parser = _cli_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
        return False, lines[-1] if lines else "rejected"
    return True, "accepted"


def _dataset_choices() -> str:
    _cli_parser()
    action = next(a for a in _PARSER["awq"]._actions if "--calib-dataset" in a.option_strings)
    return ", ".join(action.choices)


def cli_flags():
    """The flags of `lmdeploy lite auto_awq` as lmdeploy 0.18's parser defines them (a table)."""
    import argparse

    import pandas as pd

    _cli_parser()
    rows = []
    for action in _PARSER["awq"]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kind = "switch (no value)" if isinstance(action, argparse._StoreTrueAction) else \
            (action.type.__name__ if callable(action.type) and hasattr(action.type, "__name__") else "str")
        rows.append({"flag": max(action.option_strings, key=len), "kind": kind, "default": action.default,
                     "choices": ", ".join(action.choices) if action.choices else ""})
    return pd.DataFrame(rows)


def command_changes(model: str | Path = "<model>", out: str | Path = "<out>"):
    """The course's command next to lmdeploy 0.18's, each difference checked with lmdeploy's own parser."""
    import pandas as pd

    now = current_command(model, out)
    fixed_scale = course_command(model, out).replace(" --search-scale False", "")
    fixed_ptb = course_command(model, out).replace("--calib-dataset ptb", "--calib-dataset wikitext2")
    rows = [
        {"what": "the course's command", "command": course_command(model, out)},
        {"what": "only --calib-dataset ptb changed to wikitext2", "command": fixed_ptb},
        {"what": "only --search-scale False dropped", "command": fixed_scale},
        {"what": "lmdeploy 0.18 (same quantization)", "command": now},
    ]
    for r in rows:
        ok, msg = check_command(r["command"])
        r["lmdeploy 0.18 says"] = msg
    why = {
        0: "fails at the first problem argparse meets",
        1: "--search-scale is a switch since it became store_true: 'False' is left over as an extra argument",
        2: f"ptb was removed from lmdeploy's calibration sets in 0.12: the choices are {_dataset_choices()} "
           f"(all downloaded from a hub)",
        3: "the default is already 'no scale search'; add --search-scale to turn it on",
    }
    for i, r in enumerate(rows):
        r["why"] = why[i]
    return pd.DataFrame(rows)
