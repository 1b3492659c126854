"""The web page of `cnnlab serve` in a real headless Chromium: upload an image, read the bars.

Uses Debian's /usr/bin/chromium through Playwright; never downloads a browser."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import pytest
from serving import running_server

from cnnlab import Classifier

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KEY = "page-key"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator["sync_api.Browser"]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(fmnist_run: Path) -> Iterator[str]:
    with running_server(fmnist_run) as url:
        yield url


@pytest.fixture()
def page(browser: "sync_api.Browser") -> Iterator["sync_api.Page"]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def upload(page: "sync_api.Page", path: Path) -> str:
    """Pick a file in the page's file input; return the state the results end in (done or error)."""
    page.set_input_files("#file", str(path))
    page.wait_for_selector('#results[data-state="done"], #results[data-state="error"]', state="attached")
    return page.get_attribute("#results", "data-state")


def test_an_uploaded_image_shows_the_classifiers_top_classes(page, server, fmnist_run, fmnist_test_images):
    path = fmnist_test_images[0][3]
    expected = Classifier.load(fmnist_run).predict(path, top_k=5)[0]
    page.goto(server)
    page.wait_for_selector("#model:has-text('fastnet')")
    assert upload(page, path) == "done", page.text_content("#error")

    rows = page.locator("#results .row")
    assert rows.count() == 5
    assert rows.first.get_attribute("data-label") == expected[0].label
    assert page.text_content("#results .row .label") == expected[0].label
    for i, prediction in enumerate(expected):
        row = rows.nth(i)
        probability = float(row.get_attribute("data-probability"))
        assert probability == pytest.approx(prediction.probability, abs=1e-5)
        percent = row.locator(".pct").text_content()
        assert re.fullmatch(r"\d{1,3}\.\d%", percent) and percent == f"{100 * probability:.1f}%"
        width = row.locator(".fill").evaluate("el => el.style.width")  # the browser writes 1.0% as 1%
        assert width.endswith("%") and float(width[:-1]) == pytest.approx(float(percent[:-1]))
    assert rows.first.locator(".fill").bounding_box()["width"] > 0
    page.wait_for_function("() => document.querySelector('#preview').naturalWidth > 0")
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 28


def test_the_servers_error_message_is_shown(page, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    page.goto(server)
    assert upload(page, notes) == "error"
    assert "not an image in a supported format" in page.text_content("#error")
    assert page.locator("#results .row").count() == 0


def test_the_api_key_is_entered_once_and_remembered(page, fmnist_run, fmnist_test_images):
    with running_server(fmnist_run, "--api-key", KEY) as url:
        page.goto(url)
        page.wait_for_selector("#key-box", state="visible")
        assert "API key" in page.text_content("#error")
        page.fill("#api-key", KEY)
        page.click("#save-key")
        page.wait_for_selector("#model:has-text('fastnet')")
        assert upload(page, fmnist_test_images[0][0]) == "done", page.text_content("#error")

        page.reload()  # the key comes back from localStorage
        page.wait_for_selector("#model:has-text('fastnet')")
        assert page.locator("#key-box").is_hidden()


def test_the_api_docs_render_with_the_network_cut_off(browser, server):
    """Swagger UI comes from the server itself: with every request elsewhere refused, as on a machine
    without internet, /docs still renders every route."""
    context = browser.new_context()
    elsewhere: list[str] = []

    def only_the_server(route: "sync_api.Route") -> None:
        if route.request.url.startswith(server):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", only_the_server)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{server.rstrip('/')}/docs")
        page.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/v2/models/{name}/infer']")
        assert "cnnlab" in page.text_content(".swagger-ui .info .title")
        assert page.locator(".swagger-ui .opblock").count() >= 10  # /v1, /v2, /metrics, /healthz
        assert elsewhere == []
    finally:
        context.close()
