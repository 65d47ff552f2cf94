"""Headless Chromium for the browser tests: the system's /usr/bin/chromium driven by Playwright.

Never skipped: a missing browser is a broken test setup, and CI (.ci/run) installs it. Sound plays without a click
(``--autoplay-policy=no-user-gesture-required``), so the viewers' Web Audio clocks really run.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
BASE_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--autoplay-policy=no-user-gesture-required")


@contextlib.contextmanager
def chromium(*extra_args: str) -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} not found: install Chromium (apt-get install chromium) or run .ci/run"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=[*BASE_ARGS, *extra_args])
        try:
            yield instance
        finally:
            instance.close()
