"""The Edit tab in a real browser (headless Chromium, as test_browser.py): a generated result goes to the Edit
tab with "Send to Edit", and an edit of it (image-to-image, nothing painted) comes back at the input's size."""

from __future__ import annotations

import pytest

from zimage.appprocess import AppProcess
from tests.test_browser import ARTIFACTS, browser, start_generation  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory, cache_dir):
    with AppProcess(tmp_path_factory.mktemp("edit-browser"), cache_dir) as server:
        yield server


def test_send_a_result_to_edit_and_edit_it(browser, app):  # noqa: F811
    page = start_generation(browser, app, "a red circle on a blue background", "Draft")
    page.locator("#result img").first.wait_for(state="visible", timeout=180_000)
    page.locator("#info").get_by_text("768×768").wait_for(timeout=60_000)
    page.locator("#send-to-edit").click()
    prompt = page.locator("#edit-prompt textarea")
    page.wait_for_function("el => el.value.length > 0", arg=prompt.element_handle(), timeout=30_000)
    assert prompt.input_value() == "a red circle on a blue background"
    prompt.fill("a yellow circle on a blue background")
    page.locator("button#edit").click()
    page.locator("#edit-result img").first.wait_for(state="visible", timeout=180_000)
    page.locator("#edit-info").get_by_text("768×768").wait_for(timeout=60_000)
    assert "image-to-image · strength 0.6" in page.locator("#edit-info").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-edit.png"), full_page=True)
    page.close()
