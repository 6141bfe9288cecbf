"""The first screen of a run's report.html, as the README shows it.

    python -m scripts.screenshot_report [data/eval/report.html] [docs/report.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

from scripts.browser import MISSING, available, chromium

WINDOW = {"width": 1280, "height": 900}


def screenshot(browser, report: Path, out: Path) -> Path:
    page = browser.new_page(viewport=WINDOW)
    page.goto(report.resolve().as_uri())
    page.screenshot(path=str(out))
    page.close()
    return out


def main(argv: list[str]) -> int:
    report = Path(argv[0] if argv else "data/eval/report.html")
    out = Path(argv[1] if len(argv) > 1 else "docs/report.png")
    if not report.is_file():
        print(f"screenshot_report: {report} does not exist; run `make run` first.", file=sys.stderr)
        return 2
    if not available():
        print(f"screenshot_report: {MISSING}.", file=sys.stderr)
        return 2
    with chromium() as browser:
        print(screenshot(browser, report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
