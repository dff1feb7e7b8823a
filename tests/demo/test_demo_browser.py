"""``crop demo`` in a real headless Chromium: upload the shipped sample, ask the README's question, see the answers.

Needs Gradio, Playwright and a system Chromium (``scripts/setup_demo.sh --with-browser`` makes
``.venv-demo``); CI sets ``CROP_REQUIRE_DEMO=1`` there so it cannot be skipped. The screenshot it
takes goes to the test's temp folder (``scripts/demo_screenshot.py`` makes the README's the same way).
"""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest

pytestmark = pytest.mark.demo

_missing = [m for m in ("gradio", "playwright") if importlib.util.find_spec(m) is None]
if not _missing:
    from crop.demo.browser import find_chromium

    if find_chromium() is None:
        _missing.append("chromium")
if _missing:
    if os.environ.get("CROP_REQUIRE_DEMO") == "1":
        raise RuntimeError(f"CROP_REQUIRE_DEMO=1 but {', '.join(_missing)} missing (scripts/setup_demo.sh --with-browser)")
    pytest.skip(f"the browser test needs {', '.join(_missing)} (scripts/setup_demo.sh --with-browser)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url():
    from crop.demo.app import serve
    from crop.demo.core import load_demo_models

    port = _free_port()
    app = serve(load_demo_models(), port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


def test_the_page_answers_the_readme_question_with_overlays(page_url, tmp_path):
    from crop.demo.browser import ask
    from crop.demo.core import compare, load_demo_models
    from crop.io import sample_image_path

    shot = tmp_path / "demo.png"
    seen = ask(page_url, sample_image_path(), "What color is the star?", screenshot=shot,
               methods=["full", "crop-ilp", "crop-plc"], keep_tokens=28)
    expected = compare(load_demo_models(), sample_image_path(), "What color is the star?", ["crop-ilp", "crop-plc"], 28)
    for outcome in expected:  # each method's row shows the answer the library gives
        assert f"{outcome.method}\t{outcome.answer}\t" in seen.table
    assert "after_layer_2: 28" in seen.table and "llm_input: 28" in seen.table
    assert seen.overlays == 3
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_the_page_shows_errors_as_one_line(page_url, tmp_path):
    from crop.demo.browser import ask
    from crop.io import sample_image_path

    seen = ask(page_url, sample_image_path(), "   ", methods=["crop-ilp"])
    assert "Error: the question is empty" in seen.message and seen.overlays == 0
    seen = ask(page_url, sample_image_path(), "What color is the star?", methods=["crop-ilp"], keep_tokens=9999)
    assert "Error: the budget must be between 1 and the image's 256 visual tokens" in seen.message
    assert "Traceback" not in seen.message
