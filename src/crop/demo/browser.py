"""Drive the ``crop demo`` page in a real headless Chromium (Playwright on the system's browser).

Used by the browser test and by ``scripts/demo_screenshot.py`` (the README's screenshot), so
the picture in the README is what the test saw. No browser is downloaded: Playwright is pointed
at an installed Chromium (Debian's ``chromium`` package by default).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The path of an installed Chromium, or ``None``."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    """What the page showed after one question."""

    table: str  # the results table's text
    message: str  # the status / error line
    overlays: int  # overlay images in the gallery


def ask(url: str, image: str | Path, question: str, screenshot: str | Path | None = None,
        methods: list[str] | None = None, keep_tokens: int | None = None, timeout_s: float = 180.0,
        chromium: str | None = None) -> PageResult:
    """Open the page, upload ``image``, ask ``question``, wait for the answers; optionally save a screenshot.

    Args:
        url: the page (e.g. ``http://127.0.0.1:7860``).
        image: file to upload through the page's file input.
        question: typed into the question box.
        screenshot: where to save a full-page PNG after the answers appear.
        methods: if given, exactly these boxes are ticked (else the page's defaults).
        keep_tokens: if given, typed into the budget box.
        timeout_s: how long to wait for the answers.
        chromium: the browser executable (default :func:`find_chromium`).
    """
    from playwright.sync_api import sync_playwright

    executable = chromium or find_chromium()
    if executable is None:
        raise RuntimeError("no Chromium found (install Debian's chromium package)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="networkidle")
            page.locator("#crop-image input[type=file]").set_input_files(str(image))
            page.locator("#crop-image img").first.wait_for(timeout=timeout_s * 1000)  # the upload's preview
            box = page.locator("#crop-question textarea")
            box.fill(question)
            if keep_tokens is not None:
                page.locator("#crop-keep input").fill(str(keep_tokens))
            if methods is not None:
                for checkbox in page.locator("#crop-methods input[type=checkbox]").all():
                    name = checkbox.evaluate("el => el.closest('label').innerText.trim()")
                    if (name in methods) != checkbox.is_checked():
                        checkbox.click()
            page.locator("#crop-run").click()
            page.wait_for_function(  # the status line: our note on success, "Error:" otherwise
                "() => { const m = document.querySelector('#crop-message');"
                " return m && (m.innerText.includes('Answerer ') || m.innerText.includes('Error:')); }",
                timeout=timeout_s * 1000)
            page.wait_for_timeout(500)  # let the gallery's images render
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return PageResult(page.locator("#crop-table").inner_text(), page.locator("#crop-message").inner_text(),
                              page.locator("#crop-gallery img").count())
        finally:
            browser.close()
