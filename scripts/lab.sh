#!/usr/bin/env bash
# Set up (scripts/setup.sh) and open JupyterLab on notebooks/. It prints the URL to open.
#   LAB_PORT (default 8888), LAB_IP (default 127.0.0.1; 0.0.0.0 to reach it from another machine)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)
echo "Starting JupyterLab on notebooks/: open the URL below and begin with 00_setup.ipynb (Ctrl-C stops it)."
exec .venv/bin/jupyter lab "${root[@]}" --notebook-dir=notebooks --no-browser \
  --ip="${LAB_IP:-127.0.0.1}" --port="${LAB_PORT:-8888}" --ServerApp.open_browser=False "$@"
