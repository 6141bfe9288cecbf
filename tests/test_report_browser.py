"""The report in a real browser (Debian's Chromium, driven by Playwright; `make env` installs
both where it can): nothing wider than a 1280-px window, every image loaded, the verdict on the
first screen."""

import shutil
from pathlib import Path

import pytest

from gradinv.pipeline.stages import EVAL

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root on a machine with no network: no sandbox, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make env installs it)")
    if not Path(CHROMIUM).is_file():
        pytest.skip("no Chromium at /usr/bin/chromium: `make env` installs Debian's chromium where it runs as root "
                    "with apt; elsewhere install it to run this test")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_report_fits_1280_px_and_every_image_loads(tiny_project, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((tiny_project / EVAL / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    width, window = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= window == 1280
    images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) > 1 and all(done and natural > 0 for _, done, natural in images), images
    verdict = page.locator(".verdict")
    assert verdict.is_visible() and verdict.bounding_box()["y"] + verdict.bounding_box()["height"] < 900
    page.close()


def test_a_page_wider_than_the_window_would_be_caught(tmp_path, browser):
    wide = tmp_path / "wide.html"
    wide.write_text('<!doctype html><html><body><table><tr><td style="min-width:2000px">x</td></tr></table></body></html>')
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(wide.as_uri())
    assert page.evaluate("document.documentElement.scrollWidth") > 1280
    page.close()
