"""Grade a GPU suite run as a submission, and the same run with one number edited (labkit grade, no GPU).

    python scripts/grade_gpu_run.py A/executed-notebooks.zip [B/executed-notebooks.zip ...] --out /tmp/gpu-grades

The suite must have run with LABKIT_STUDENT=alice (its kernels keep IPython's history, so the records name
their cells). A notebook found in several zips is taken from the first. Writes OUT/alice/ (the run as
handed in) and OUT/alice-edited/ (lab 03's AWQ size edited in its record), grades both with
grading/rubric-gpu-suite.toml and prints each verdict: the first should credit every lab it holds, the
second must be flagged.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import make_grading_fixtures as fixtures  # noqa: E402
from labkit.submit import write_zip  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zips", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    nbs: dict[str, dict] = {}
    import tomllib

    wanted = tomllib.loads((REPO / "grading" / "rubric-gpu-suite.toml").read_text())["course"]["notebooks"]
    for path in args.zips:
        for name, nb in fixtures.load_zip(path).items():
            if Path(name).stem in wanted:  # the rubric's labs (lab 07 is not graded)
                nbs.setdefault(name, nb)
    shutil.rmtree(args.out, ignore_errors=True)
    edited = {k: fixtures.edit_record(v, "awq", fixtures._smaller_awq) if k == "03_awq.ipynb" else v
              for k, v in nbs.items()}
    for folder, run in (("alice", nbs), ("alice-edited", edited)):
        data = {k: (json.dumps(v, indent=1, ensure_ascii=False) + "\n").encode() for k, v in sorted(run.items())}
        write_zip(data, "alice", args.out / folder)
        subprocess.run([sys.executable, "-m", "labkit.cli", "grade", str(args.out / folder), "--rubric",
                        str(REPO / "grading" / "rubric-gpu-suite.toml"), "--out", str(args.out / f"grades-{folder}")],
                       check=True, cwd=REPO)
    print("notebooks:", ", ".join(sorted(nbs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
