"""Headless Chromium (Debian's package) driven by Playwright, on the real ComfyUI frontend."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Iterator

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Chromium is not installed: run scripts/install_chromium (apt-get, as root or through sudo)")
    return path


@contextlib.contextmanager
def launch_page(url: str, width: int = 1600, height: int = 1000) -> Iterator:
    """A page on `url` once ComfyUI's app and graph exist; console errors collect in page.errors."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
            page.wait_for_timeout(1000)  # let the first (default) graph finish loading
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
