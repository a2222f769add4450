"""One real-browser session: `streamlit run app.py` headless, opened in headless Chromium.

The server gets the tests' HF environment (conftest.py), so the page falls back to the real
DeiT-Tiny weights from ../shared. Skipped only when /usr/bin/chromium is absent.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.registry import all_methods
from test_app import comparison_rows_shown
from test_patterns import pattern_sweep  # noqa: F401  (the session's --patterns sweep)

METHODS = all_methods()

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
STAGE_IMAGES = '[data-testid="stMain"] [data-testid="stImage"] img'
EXCEPTION = '[data-testid="stException"]'
LOAD_TIMEOUT_MS = 240_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The app served by `streamlit run` on a free port; terminated afterwards whatever happens."""
    port = free_port()
    env = dict(os.environ)  # conftest.py has set HF_HUB_CACHE / HF_HUB_OFFLINE
    log = open(ROOT / ".pytest_cache" / "streamlit-browser-test.log", "w") if (ROOT / ".pytest_cache").is_dir() else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start (exit code {process.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not subprocess.DEVNULL:
            log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def wait_for_pictures(page, count: int, timeout_ms: int = LOAD_TIMEOUT_MS) -> None:
    page.wait_for_function(
        f"document.querySelectorAll('{EXCEPTION}').length > 0 || "
        f"document.querySelectorAll('{STAGE_IMAGES}').length >= {count}",
        timeout=timeout_ms,
    )
    assert page.locator(EXCEPTION).count() == 0, page.locator(EXCEPTION).first.inner_text()
    # let the script run finish: no "running" indicator, no spinner
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


def open_comparison_rows(page) -> None:
    """Switch on every comparison row's "draw this row" toggle, one rerun at a time."""
    toggles = page.locator('[data-testid="stMain"] [data-testid="stCheckbox"]', has_text="draw this row")
    count = toggles.count()
    assert count == comparison_rows_shown()
    for index in range(count):
        toggles.nth(index).locator("label").click()
        stage_sliders = page.locator('[data-testid="stMain"] [data-testid="stSlider"]', has_text="Stage (layer) to compare")
        stage_sliders.nth(index).wait_for(timeout=LOAD_TIMEOUT_MS)  # the opened row has drawn its stage slider
        page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=LOAD_TIMEOUT_MS)


def test_main_job_in_chromium(server, browser):
    """The page opens on a sample photo and shows EViT's masked tokens and attention per stage; the
    comparison rows draw when opened."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server)
    wait_for_pictures(page, 1 + 3 + 3)
    assert page.locator(STAGE_IMAGES).count() == 1 + 3 + 3, "the comparison rows start closed"
    open_comparison_rows(page)
    wait_for_pictures(page, 1 + 3 + 3 + comparison_rows_shown())
    assert page.locator(EXCEPTION).count() == 0
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    for layer, tokens in ((4, 140), (7, 100), (10, 72)):
        assert page.get_by_text(f"layer {layer}: masked tokens, {tokens} tokens out").count() == 1
        assert page.get_by_text(f"layer {layer}: class attention").count() == 1
    assert page.locator(STAGE_IMAGES).count() == 1 + 3 + 3 + comparison_rows_shown()
    # pictures below the fold may load lazily: bring each into view and wait until it has decoded
    for image in page.locator(STAGE_IMAGES).all():
        image.scroll_into_view_if_needed()
    page.wait_for_function(
        f"[...document.querySelectorAll('{STAGE_IMAGES}')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=LOAD_TIMEOUT_MS,
    )
    sizes = page.eval_on_selector_all(STAGE_IMAGES, "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert all(w > 0 and h > 0 for w, h in sizes), "every picture loaded"
    assert sizes[1][0] == 448, "stage pictures are drawn at twice the 224 px crop"
    page.close()


def test_every_method_in_chromium(server, browser):
    """Every method that runs off the shelf renders in a real browser with no exception: three stage
    pictures each (methods reducing in more than six blocks show the sidebar's layers 4, 7, 10 by
    default), a class-attention map beside those whose stages record one, and the comparison rows."""
    runnable = [name for name, method in METHODS.items() if method.unavailable_reason({}) is None]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server + "/?" + "&".join(f"method={name}" for name in runnable))
    stage_pictures = 3 * len(runnable)
    wait_for_pictures(page, 1 + stage_pictures, timeout_ms=2 * LOAD_TIMEOUT_MS)
    open_comparison_rows(page)
    wait_for_pictures(page, 1 + comparison_rows_shown() + stage_pictures, timeout_ms=2 * LOAD_TIMEOUT_MS)
    captions = page.locator('[data-testid="stMain"] [data-testid="stImageCaption"]').all_inner_texts()
    stages = [c for c in captions if re.match(r"layer \d+: ", c) and "class attention" not in c]
    assert len(stages) == stage_pictures, stages
    attention = [c for c in captions if re.match(r"layer \d+: class attention", c)]
    assert len(attention) % 3 == 0 and len(attention) >= 3 * sum("cls_attention" in METHODS[n].needs for n in runnable)
    rows = [c for c in captions if c.startswith("(a) input")]
    assert len(rows) == comparison_rows_shown()
    assert page.locator(STAGE_IMAGES).count() == 1 + len(stages) + len(attention) + len(rows)
    tabs = page.get_by_role("tab").all_inner_texts()
    assert [t.strip() for t in tabs] == [METHODS[name].label for name in runnable]
    assert page.locator(EXCEPTION).count() == 0
    page.close()


def test_compare_page_in_chromium(server, browser, pattern_sweep):  # noqa: F811
    """The Compare page draws its charts from a `sweep --patterns` results folder typed as a path."""
    out, _, methods = pattern_sweep
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server + "/Compare")
    field = page.get_by_label("…or the path of a results.json (or of the sweep's --out folder)")
    field.fill(str(out))
    field.press("Enter")
    charts = '[data-testid="stPlotlyChart"]'
    page.wait_for_function(
        f"document.querySelectorAll('{EXCEPTION}').length > 0 || document.querySelectorAll('{charts}').length >= {len(methods) + 4}",
        timeout=LOAD_TIMEOUT_MS)
    assert page.locator(EXCEPTION).count() == 0, page.locator(EXCEPTION).first.inner_text()
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=LOAD_TIMEOUT_MS)
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    assert page.locator(f"{charts} .js-plotly-plot").count() >= len(methods) + 4, "every chart drawn by plotly.js"
    page.close()
