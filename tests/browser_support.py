"""Headless Chromium for the console tests: Debian's `chromium` through Playwright with its executable
path (no browser download). `chromium_missing()` says why it cannot run here, or None."""
from __future__ import annotations

import importlib.util
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def chromium_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "pip install playwright (the test extra)"
    if not Path(CHROMIUM).is_file():
        return "no /usr/bin/chromium: launch/install.sh --test installs it"
    return None
