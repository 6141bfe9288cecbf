#!/usr/bin/env bash
# Debian's Chromium for the report's browser test (tests/test_report_browser.py). Best effort:
# without root or apt the test is skipped and says why; nothing else needs a browser.
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the report's browser test"
    if apt-get update -qq >/dev/null 2>&1 && \
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
        exit 0
    fi
fi
echo "note: Chromium is not installed (needs root and apt); the report's browser test will be skipped"
