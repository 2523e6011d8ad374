"""The LoRA picker in a real browser (headless Chromium, as test_browser.py): filled from the folder, a LoRA and
its scale chosen, a generation that says it used them; and a PNG read back puts its LoRAs back in the picker."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest

from tests.test_browser import ARTIFACTS, browser  # noqa: F401 (fixture)
from tests.test_lora import DEMO_LORAS, FIXTURES
from zimage.appprocess import AppProcess, http

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("browser-loras")
    shutil.copy(DEMO_LORAS / "negative.safetensors", folder)
    shutil.copy(FIXTURES / "negative-kohya.safetensors", folder)
    with AppProcess(tmp_path_factory.mktemp("lora-browser"), cache_dir, "--lora-dir", str(folder)) as server:
        yield server


def test_pick_a_lora_generate_and_read_it_back(browser, app, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.goto(app.url, wait_until="load", timeout=60_000)
    page.get_by_text("ready").first.wait_for(timeout=60_000)
    page.locator("#prompt textarea").fill("a red circle on a blue background")
    page.get_by_text("LoRA", exact=True).first.click()  # open the accordion
    page.locator("#lora-1 input").click()
    page.get_by_role("option", name=re.compile(r"^negative · rank")).click()
    scale = page.locator("#lora-scale-1 input[type=number]")
    scale.fill("0.5")
    scale.press("Enter")
    sent = page.locator("#loras input, #loras textarea").first
    page.wait_for_function("el => el.value === 'negative:0.5'", arg=sent.element_handle(), timeout=30_000)
    page.locator("#quality input").click()
    page.get_by_role("option", name="Draft").click()
    page.locator("#generate").click()
    page.locator("#result img").first.wait_for(state="visible", timeout=180_000)
    page.locator("#info").get_by_text("LoRA negative 0.5").wait_for(timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-lora.png"), full_page=True)

    # A PNG made with two LoRAs, read back: the picker gets both, with their scales.
    body = json.dumps({"prompt": "a black star <lora:negative-kohya:0.25>", "size": "256x256", "steps": 2, "seed": 9,
                       "loras": [{"name": "negative", "scale": 0.8}]}).encode()
    status, _, payload = http("POST", app.url + "/v1/images/generations", body, {"Content-Type": "application/json"})
    assert status == 200, payload
    png = tmp_path / "with-loras.png"
    png.write_bytes(base64.b64decode(json.loads(payload)["data"][0]["b64_json"]))
    page.get_by_role("tab", name="Read PNG parameters").click()
    page.locator("input[type=file]").set_input_files(str(png))
    params = page.get_by_label("parameters")
    page.wait_for_function("el => el.value.includes('Lora hashes')", arg=params.element_handle(), timeout=30_000)
    assert "<lora:negative:0.8> <lora:negative-kohya:0.25>" in params.input_value()
    page.get_by_role("button", name="Send to Generate").click()
    page.wait_for_function("el => el.value === 'negative:0.8, negative-kohya:0.25'", arg=sent.element_handle(),
                           timeout=30_000)
    assert page.locator("#prompt textarea").input_value() == "a black star"
    assert page.locator("#lora-1 input").input_value().startswith("negative")
    assert page.locator("#lora-scale-2 input[type=number]").input_value() == "0.25"
    page.screenshot(path=str(ARTIFACTS / "browser-lora-read-back.png"), full_page=True)
    page.close()
