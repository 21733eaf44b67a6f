#!/usr/bin/env bash
# Create .venv if there is none and install the pinned stack (requirements.txt) and labkit
# (editable) into it. Skips the install when nothing changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
# The browser test (tests/test_browser.py) drives Debian's chromium. scripts/test.sh asks for it
# (LABKIT_WITH_BROWSER=1); as root with apt-get it is installed here when missing (CI: a fresh machine).
if [ "${LABKIT_WITH_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium for the browser test (apt-get) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || echo "could not install chromium: tests/test_browser.py will fail (apt-get install -y chromium)"
  else
    echo "no /usr/bin/chromium: tests/test_browser.py will fail; install it (sudo apt-get install -y chromium)"
  fi
fi
stamp=.venv/.labkit-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "installing the pinned stack into .venv (first time: a few minutes, ~8 GB with torch) ..."
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "$want" > "$stamp"
echo "installed: lmdeploy $(.venv/bin/python -c 'from importlib.metadata import version; print(version("lmdeploy"))')"
