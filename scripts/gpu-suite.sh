#!/usr/bin/env bash
# The GPU suite: every notebook under nbval with `gpu` cells executed, plus labkit's tests,
# on generated models (LABKIT_MODEL overrides). Writes summary.md / summary.json and the
# executed notebooks (executed-notebooks.zip) to $LABKIT_REPORT_DIR (default: $OUT on the
# device runner, else artifacts/gpu-suite).
#
# Two ways to get the packages:
#  - a GPU machine with network: scripts/setup.sh builds .venv as for students;
#  - the offline runner (torch preinstalled): `make wheelhouse` here, carry .wheelhouse/,
#    and this script installs it with --target so the runner's torch stays in charge.
set -uo pipefail
cd "$(dirname "$0")/.."
# By default every notebook and every test marked `gpu`; CPU-only unit tests run in CI (make test).
# `--part 1` / `--part 2` / `--part 3` split it in pieces of under 10 minutes each (for a runner that allows
# 10 minutes a command); or name test files / notebooks (and pytest options) yourself.
case "${1:-}" in
  "") set -- notebooks tests -m "gpu or notebook" ;;
  --part)
    case "${2:-}" in
      1) set -- notebooks/0[0-3]_*.ipynb ;;
      2) set -- notebooks/0[4-9]_*.ipynb tests -m "gpu or notebook" \
           --ignore=tests/test_trained_gpu.py --ignore=tests/test_speed_gpu.py ;;
      3) set -- tests/test_trained_gpu.py tests/test_speed_gpu.py -s ;;  # the trained model's numbers, speed
      *) echo "--part takes 1, 2 or 3, not '${2:-}'" >&2; exit 2 ;;
    esac ;;
esac
export LABKIT_REPORT_DIR="${LABKIT_REPORT_DIR:-${OUT:-artifacts/gpu-suite}}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$LABKIT_REPORT_DIR"
if [ ! -d .venv ] && python3 -c "import lmdeploy, nbval" 2>/dev/null; then
  PY=python3   # the packages are there already (e.g. PYTHONPATH set by hand)
elif [ -d .wheelhouse ] && ! python3 -c "import lmdeploy" 2>/dev/null; then
  site=/tmp/labkit-site
  start=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .wheelhouse/*.whl || exit 1
  for extra in .wheelhouse-*; do
    [ -d "$extra" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$site" "$extra"/*.whl
  done
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  PY=python3
  echo "wheelhouse installed to $site in $(( $(date +%s) - start )) s"
else
  scripts/setup.sh || exit 1
  PY=.venv/bin/python
  export PATH="$PWD/.venv/bin:$PATH"
fi
$PY -m labkit.cli doctor --offline
# SIGINT at the limit lets pytest still print and write its summary (the runner allows 10 minutes a command).
timeout -s INT "${SUITE_TIMEOUT:-570}" $PY -m pytest --durations=40 --nbval-lax --nbval-current-env --nbval-cell-timeout=300 \
  -p no:cacheprovider -rA "$@" 2>&1 | tee "$LABKIT_REPORT_DIR/pytest.log"
status=${PIPESTATUS[0]}
echo "lmdeploy processes left: $(pgrep -fc 'lmdeploy' || true)"
pgrep -fa lmdeploy | cut -c1-200 || true
exit $status
