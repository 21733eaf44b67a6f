"""The README's two commands: `make lab` opens JupyterLab; `make test` is what CI runs."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import requests

from labkit.serve import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's test command"
    assert "exit $status" in (ROOT / "scripts" / "test.sh").read_text()


def test_lab_command_opens_jupyterlab(tmp_path):
    port = free_port()
    env = dict(os.environ, LAB_PORT=str(port), JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path))
    proc = subprocess.Popen(["make", "-s", "lab"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, lines, deadline = None, [], time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(rf"(http://127\.0\.0\.1:{port}/lab\?token=\w+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "JupyterLab did not print its URL:\n" + "".join(lines[-30:])
        resp, deadline = None, time.monotonic() + 30
        while resp is None:  # the URL can be printed a moment before the server accepts connections
            try:
                resp = requests.get(url, timeout=10)
            except requests.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        assert resp.status_code == 200 and "JupyterLab" in resp.text
        api = requests.get(f"http://127.0.0.1:{port}/api/contents", params={"token": url.split("token=")[1]},
                           timeout=10).json()
        names = {c["name"] for c in api["content"]}
        assert "00_setup.ipynb" in names, names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
