#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run labkit's unit tests and every notebook under nbval.
# Cells tagged `gpu` and tests marked `gpu` are skipped (and counted as skipped) without CUDA.
# pytest's exit code is ours: "no tests ran" (5) fails too.
set -uo pipefail
cd "$(dirname "$0")/.."
LABKIT_WITH_BROWSER=1 scripts/setup.sh || exit 1
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest tests notebooks --nbval-lax --nbval-current-env \
  --nbval-cell-timeout="${CELL_TIMEOUT:-600}" -p no:cacheprovider "$@"
status=$?
[ $status -eq 5 ] && echo "pytest collected no tests: that is a failure here"
exit $status
