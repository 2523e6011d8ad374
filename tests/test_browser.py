"""A real browser: headless Chromium (Debian's) drives the UI through one generation and saves a screenshot.

CI installs chromium (.ci/run) and sets ZIMAGE_REQUIRE_BROWSER=1, so a missing browser fails there instead
of skipping."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from zimage.appprocess import ROOT, AppProcess, http

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("ZIMAGE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"chromium not found at {CHROMIUM} (install Debian's chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Flags as this sandbox needs them: no sandbox as root, no GPU, no background network chatter.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("browser"), cache_dir) as server:
        yield server


def start_generation(browser, app, prompt: str, quality: str):
    """A new page, ready, with `prompt` at `quality`, Generate clicked."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app.url, wait_until="load", timeout=60_000)
    page.get_by_text("ready").first.wait_for(timeout=60_000)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#quality input").click()
    page.get_by_role("option", name=quality).click()
    page.locator("#generate").click()
    return page


def test_generate_in_the_browser(browser, app):
    page = start_generation(browser, app, "a red circle on a blue background", "Draft")

    image = page.locator("#result img").first
    image.wait_for(state="visible", timeout=180_000)
    page.locator("#info").get_by_text("768×768").wait_for(timeout=60_000)
    assert "6 steps" in page.locator("#info").inner_text()
    natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [768, 768]
    # The whole picture is on screen: the result opens on its preview, not a grid cell cut off at the bottom.
    whole = """() => { const img = document.querySelector('#result img').getBoundingClientRect();
                       const box = document.querySelector('#result').getBoundingClientRect();
                       return img.height > 100 && img.bottom <= box.bottom + 1 && img.right <= box.right + 1; }"""
    page.wait_for_function(whole, timeout=30_000)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)
    page.close()


def test_png_read_back_tab_fills_the_form(browser, app, tmp_path):
    body = json.dumps({"prompt": "蓝色背景上的红色圆形", "quality": "Draft", "aspect": "16:9", "seed": 4242,
                       "steps": 2}).encode()
    status, _, payload = http("POST", app.url + "/v1/images/generations", body, {"Content-Type": "application/json"})
    assert status == 200
    png = tmp_path / "made-here.png"
    png.write_bytes(base64.b64decode(json.loads(payload)["data"][0]["b64_json"]))

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app.url, wait_until="load", timeout=60_000)
    page.get_by_role("tab", name="Read PNG parameters").click()
    page.locator("input[type=file]").set_input_files(str(png))
    params = page.get_by_label("parameters")
    page.wait_for_function("el => el.value.includes('Seed: 4242')", arg=params.element_handle(), timeout=30_000)
    assert "Steps: 2" in params.input_value() and "Size: 1024x576" in params.input_value()
    page.get_by_role("button", name="Send to Generate").click()
    prompt = page.locator("#prompt textarea")
    page.wait_for_function("el => el.value.length > 0", arg=prompt.element_handle(), timeout=30_000)
    assert prompt.input_value() == "蓝色背景上的红色圆形"
    assert page.get_by_label("Seed", exact=True).input_value() == "4242"
    assert not page.get_by_label("Random seed").is_checked()
    assert "16:9" in page.locator("#aspect input").input_value()
    page.screenshot(path=str(ARTIFACTS / "browser-read-back.png"), full_page=True)
    page.close()


def test_cancel_in_the_browser_says_cancelled(browser, app):
    """Cancel stops the run, the page says so (no stale image or info line), and the log records it."""
    page = start_generation(browser, app, "a yellow star at the top on a purple background", "Ultra")
    time.sleep(3)  # Ultra takes ~25 s on the CPU: cancel while it runs
    page.locator("#cancel").click()
    page.locator("#info").get_by_text("Cancelled.").wait_for(timeout=60_000)
    assert page.locator("#result img").count() == 0
    page.screenshot(path=str(ARTIFACTS / "browser-cancel.png"), full_page=True)
    page.close()
    deadline = time.monotonic() + 60
    while "cancelled Ultra" not in app.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "cancelled Ultra" in app.log()
