"""Debian's Chromium driven by Playwright, for the report's browser test and its screenshot
(`make env` installs both where it can; Playwright's own browser download is never used)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root on a machine with no network: no sandbox, no background connections.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
MISSING = (f"no Chromium at {CHROMIUM}: `make env` installs Debian's chromium where it runs as root with apt; "
           "elsewhere install it (or playwright) to render reports")


def available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).is_file()


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium browser (Playwright's Browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
