"""The notebooks in a real browser: JupyterLab on 127.0.0.1, Debian's chromium driven by Playwright, as a student
clicks. Lab 06: Run All, type a prompt, Send, a streamed reply, move a slider, Send again, Compare. Lab 00: Run All,
the doctor's table renders. Screenshots go to artifacts/browser/. Chromium missing is a failure, not a skip:
scripts/setup.sh installs it (as root), and CI runs that first."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ART = Path(os.environ.get("LABKIT_BROWSER_ARTIFACTS", ROOT / "artifacts" / "browser"))
CHROMIUM = os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Run All is over when every code cell has run, or when none runs and an error stopped it.
ALL_DONE = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
  if (prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t))) return true;
  const errored = [...document.querySelectorAll('.jp-OutputArea-output')].some(e => /Traceback/.test(e.textContent));
  return errored && !prompts.some(t => t === '[*]:');
}"""
# Records whether a reply was seen mid-stream (the cursor "▌" in the chat) and how often the chat changed.
WATCH_CHAT = """() => {
  const chat = document.querySelector('.lk-chat');
  window.__lk = {pending: 0, changes: 0};
  new MutationObserver(() => {
    window.__lk.changes += 1;
    if (chat.querySelector('.lk-pending')) window.__lk.pending += 1;
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def require_browser() -> None:
    """Fail (never skip) when the browser or Playwright is missing: the set-up installs both."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium is missing at {CHROMIUM}: run scripts/setup.sh as root (it installs it with apt-get), "
                    f"or `apt-get install -y chromium`")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is missing: pip install -r requirements.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """JupyterLab settings for a quiet, fully rendered notebook: no news pop-up, every cell in the DOM."""
    for plugin, values in {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
                           "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none",
                                                                      "autoStartDefaultKernel": True}}.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free 127.0.0.1 port with a known token, over a copy of the notebooks; stopped afterwards."""
    require_browser()
    for old in ART.glob("*.png"):  # this run's screenshots only
        old.unlink()
    root = tmp_path_factory.mktemp("lab")
    for name in ("00_setup.ipynb", "06_playground.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, root / name)
    _settings(root / ".settings")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "JUPYTER_CONFIG_DIR": str(root / ".config"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = open(root / "jupyter.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                             "--LabApp.news_url=", "--LabApp.extension_manager=readonly", "--allow-root"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start: {(root / 'jupyter.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"url": url, "token": token, "root": root}
    finally:
        proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        ART.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "jupyter.log", ART / "jupyter.log")


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_notebook(browser, lab, name: str):
    """A fresh page (own workspace) with notebook `name` open and its kernel idle."""
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page.on("dialog", lambda d: d.accept())
    page.set_default_timeout(60_000)
    page.goto(f"{lab['url']}/lab/workspaces/{name.split('.')[0]}/tree/{name}?reset&token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    dialog = page.locator(".jp-Dialog button", has_text=re.compile(r"^Select$"))
    try:  # JupyterLab asks for a kernel when it cannot start the notebook's own at once
        dialog.click(timeout=3000)
    except Exception:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    return page


def run_all(page, timeout_s: float = 150) -> None:
    """Run -> Run All Cells, then wait until every code cell has run (no [*], no [ ])."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(ALL_DONE, timeout=timeout_s * 1000, polling=500)
    except PlaywrightTimeout:
        shot(page, "run-all-timeout.png")
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        pytest.fail(f"Run All did not finish in {timeout_s:.0f} s; cell prompts: {prompts} "
                    f"(screenshot: {ART / 'run-all-timeout.png'})")
    assert_no_error(page)


def assert_no_error(page) -> None:
    """No traceback in any output, and the playground's status line (if any) shows no error."""
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    bad = [o for o in outputs if "Traceback" in o or "FAILED:" in o]
    assert not bad, f"an error shows in the notebook: {bad[0][:1500]}"
    status = page.locator(".lk-status")
    if status.count():
        assert "#b00" not in status.first.inner_html() and "rgb(187, 0, 0)" not in status.first.inner_html(), \
            f"the playground shows an error: {status.first.inner_text()}"


def wait_js(page, js: str, what: str, timeout_s: float = 120) -> None:
    """Wait until `js` is true; on a timeout, a screenshot and the playground's status line say what happened."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(js, timeout=timeout_s * 1000, polling=200)
    except PlaywrightTimeout:
        shot(page, "timeout.png")
        status = page.locator(".lk-status").all_inner_texts()
        pytest.fail(f"{what} did not happen in {timeout_s:.0f} s; the playground says {status} "
                    f"(screenshot: {ART / 'timeout.png'})")


def shot(page, name: str) -> None:
    ART.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ART / name), full_page=False)


def send_and_wait(page, text: str, timeout_s: float = 120) -> str:
    """Type `text` in the prompt box, click Send, wait for the streamed reply; the stats line under it."""
    before = page.locator(".lk-chat .lk-assistant").count()
    page.evaluate(WATCH_CHAT)
    page.locator(".lk-prompt textarea").fill(text)
    page.locator(".lk-prompt textarea").press("Tab")  # the widget syncs its value on change
    page.locator("button.lk-send").click()
    wait_js(page, f"() => document.querySelectorAll('.lk-chat .lk-assistant').length > {before}",
            f"a reply to {text!r}", timeout_s)
    watched = page.evaluate("() => window.__lk")
    assert watched["pending"] >= 1, f"the reply did not stream (no partial reply seen): {watched}"
    assert text in page.locator(".lk-chat").inner_text()
    return page.locator(".lk-stats").inner_text()


def reply_tokens(stats: str) -> int:
    m = re.search(r"\+ (\d+) reply tokens", stats)
    assert m, f"no reply token count in the stats line: {stats!r}"
    return int(m.group(1))


def test_playground_in_the_browser(browser, lab):
    """Lab 06 as a student uses it: Run All, chat, a slider, chat again, Compare; screenshots of each step."""
    start = time.monotonic()
    page = open_notebook(browser, lab, "06_playground.ipynb")
    run_all(page)
    assert_no_error(page)
    page.locator(".lk-playground").scroll_into_view_if_needed()
    slot_a = page.locator(".lk-slot-A").inner_text().strip()
    assert re.match(r"loaded \S+ on ", slot_a), slot_a
    assert "tokens that fit" in page.locator(".lk-plan-A").inner_text()
    shot(page, "06-1-after-run-all.png")

    stats = send_and_wait(page, "Tell me about the moon.")
    first = reply_tokens(stats)
    assert "tok/s" in stats and "first token" in stats and "finish_reason=" in stats
    shot(page, "06-2-first-reply.png")

    handle = page.locator(".lk-max-new-tokens .noUi-handle")  # the max_new_tokens slider, moved by keyboard
    handle.focus()
    for _ in range(12):
        handle.press("ArrowRight")
    readout = int(page.locator(".lk-max-new-tokens .widget-readout").inner_text())
    assert readout > 8, f"the slider did not move: max_new_tokens {readout}"
    stats = send_and_wait(page, "And about the sun?")
    second = reply_tokens(stats)
    assert second <= readout, f"the reply has {second} tokens, over the slider's {readout}"
    assert second > first or "finish_reason=stop" in stats, (first, second, stats)
    assert_no_error(page)
    shot(page, "06-3-slider-moved-second-reply.png")

    page.locator(".widget-tab .lm-TabBar-tab", has_text="Compare").click()
    page.locator("button.lk-load-B").click()
    wait_js(page, "() => /^loaded \\S+ on /.test(document.querySelector('.lk-slot-B').textContent.trim())", "loading B")
    page.locator("button.lk-compare").click()
    wait_js(page, "() => ['A', 'B'].every(k => /tok\\/s/.test(document.querySelector('.lk-compare-' + k).textContent))",
            "the compare of A and B")
    page.wait_for_selector(".lk-chart[src]")
    assert_no_error(page)
    page.locator(".lk-chart").scroll_into_view_if_needed()
    shot(page, "06-4-compare.png")
    took = time.monotonic() - start
    print(f"\nlab 06 in the browser: {took:.1f} s (first reply {first} tokens, second {second}, slider {readout})")
    page.close()


def test_setup_notebook_shows_the_doctor_table(browser, lab):
    """Lab 00: Run All, and the doctor's table renders with its rows and verdict."""
    page = open_notebook(browser, lab, "00_setup.ipynb")
    run_all(page)
    assert_no_error(page)
    table = page.locator(".jp-OutputArea-output table", has=page.locator("th", has_text="fix")).first
    table.scroll_into_view_if_needed()
    rows = table.locator("tr").count()
    text = table.inner_text()
    assert rows >= 6 and "gpu" in text and "lmdeploy" in text, f"the doctor's table has {rows} rows: {text[:500]}"
    shot(page, "00-doctor-table.png")
    page.close()
