"""The report in a real browser (Debian's Chromium, driven by Playwright; `make env` installs
both where it can): nothing wider than a 1280-px window, every image loaded, the verdict on the
first screen."""

import pytest

from gradinv.pipeline.stages import EVAL
from scripts.browser import MISSING, available, chromium
from scripts.screenshot_report import WINDOW, screenshot


@pytest.fixture(scope="module")
def browser():
    if not available():
        pytest.skip(MISSING)
    with chromium() as browser:
        yield browser


def test_the_report_fits_1280_px_and_every_image_loads(tiny_project, browser):
    page = browser.new_page(viewport=WINDOW)
    page.goto((tiny_project / EVAL / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    width, window = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= window == 1280
    images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) > 1 and all(done and natural > 0 for _, done, natural in images), images
    verdict = page.locator(".verdict")
    assert verdict.is_visible() and verdict.bounding_box()["y"] + verdict.bounding_box()["height"] < WINDOW["height"]
    page.close()


def test_a_page_wider_than_the_window_would_be_caught(tmp_path, browser):
    wide = tmp_path / "wide.html"
    wide.write_text('<!doctype html><html><body><table><tr><td style="min-width:2000px">x</td></tr></table></body></html>')
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(wide.as_uri())
    assert page.evaluate("document.documentElement.scrollWidth") > 1280
    page.close()


def test_the_screenshot_is_the_reports_first_screen(tiny_project, tmp_path, browser):
    out = screenshot(browser, tiny_project / EVAL / "report.html", tmp_path / "report.png")
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (1280, 900)


def test_the_report_prints_to_pdf_without_clipping_a_table(tiny_project, browser):
    page = browser.new_page(viewport=WINDOW)
    page.goto((tiny_project / EVAL / "report.html").resolve().as_uri())
    page.emulate_media(media="print")
    clipped = page.evaluate("Array.from(document.querySelectorAll('.scroll')).filter(b => b.scrollWidth > b.clientWidth)"
                            ".length")
    pdf = page.pdf(format="A4")
    page.close()
    assert pdf[:5] == b"%PDF-" and (b"/Type /Page" in pdf or b"/Type/Page" in pdf)
    assert clipped == 0  # in print, a table that would scroll on screen is not cut off
