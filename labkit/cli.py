"""`labkit` on the command line: doctor, models, and the commands later labs add."""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def _doctor(args: argparse.Namespace) -> int:
    from labkit.doctor import doctor

    report = doctor(check_hubs=not args.offline)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report)
    return 0 if report.ready or not args.strict else 1


def _models(args: argparse.Namespace) -> int:
    from labkit import generate, models, train

    if args.action == "list":
        for m in models.CATALOGUE.values():
            print(f"{m.name:<24} {m.kind:<7} {m.hf_id:<36} {m.disk_gib:>5.1f} GiB  min GPU {m.min_gpu_gib:.0f} GiB")
        for name in generate.available():
            about = generate.about(name) or "vision-language (lab 05)"
            print(f"generated:{name:<14} {about}")
        for name, recipe in train.RECIPES.items():
            print(f"trained:{name:<16} {recipe.about}")
        return 0
    if not args.name:
        print(f"labkit models {args.action} needs a NAME", file=sys.stderr)
        return 2
    if args.action == "train":
        try:
            print(train.train(args.name, out_dir=args.out))
        except train.TrainError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if args.action == "generate":
        print(generate.ensure(args.name))
        return 0
    try:
        print(models.resolve(args.name, download=not args.no_download))
    except models.ModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `labkit` command."""
    p = argparse.ArgumentParser(prog="labkit", description="LMDeploy Lab helpers")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="check this machine for the labs")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--offline", action="store_true", help="skip the hub checks")
    d.add_argument("--strict", action="store_true", help="exit 1 when not ready")
    d.set_defaults(func=_doctor)
    m = sub.add_parser("models", help="list, generate, train or resolve models")
    m.add_argument("action", choices=["list", "generate", "train", "resolve"])
    m.add_argument("name", nargs="?")
    m.add_argument("--out", default=None, help="train: the folder to write (default: under LABKIT_HOME/trained; "
                                                "labkit/data/trained/NAME replaces the shipped weights)")
    m.add_argument("--no-download", action="store_true")
    m.set_defaults(func=_models)
    for name in _EXTENSION_MODULES:  # each defines add_cli(sub)
        importlib.import_module(name).add_cli(sub)
    return p


# Modules whose add_cli(sub) adds sub-commands: `labkit servers`, `labkit webui` (lab 02), `labkit submit`,
# `labkit grade` (instructors).
_EXTENSION_MODULES = ["labkit.serve", "labkit.webui", "labkit.submit", "labkit.grade"]


def run_script(main_fn) -> int:
    """Run a script's main(); labkit's errors (and ValueError) end it with one line that says what to do."""
    try:
        return main_fn()
    except Exception as err:
        if type(err).__module__.split(".")[0] != "labkit" and not isinstance(err, ValueError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `labkit` command."""
    from labkit.errors import LabkitError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LabkitError as err:  # a refusal: one line that says what to do, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
