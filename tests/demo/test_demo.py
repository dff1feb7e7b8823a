"""``crop demo``'s request logic (no Gradio needed): validation, the reference run, overlays, the table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crop.demo.core import compare, load_demo_models, summary_table
from crop.errors import CropInputError


@pytest.fixture(scope="module")
def models():
    return load_demo_models("tiny-random-llava", "box:1,1,4,4")


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    from tests.conftest import random_image

    path = tmp_path_factory.mktemp("demo") / "in.png"
    random_image(1).save(path)
    return path


def test_full_runs_first_and_every_method_gets_an_overlay(models, upload):
    out = compare(models, upload, "What is it?", ["crop-ilp", "crop-plc", "fastv"], 64, max_new_tokens=2)
    assert [o.method for o in out] == ["full", "crop-ilp", "crop-plc", "fastv"]
    assert all(o.error is None and o.overlay is not None for o in out)
    assert out[0].tokens == {"llm_input": 576} and out[2].tokens == {"llm_input": 64}
    assert out[1].tokens["after_layer_2"] == 64
    table = summary_table(out)
    assert table.count("\n") == 5 and "(1.00x)" in table and "KiB" in table


def test_only_region_methods_call_the_localizer(models, upload):
    from dataclasses import replace

    calls = []

    class Counting:
        grid = models.localizer.grid

        def localize(self, images, questions):
            calls.append(len(images))
            return models.localizer.localize(images, questions)

    counted = replace(models, localizer=Counting())
    compare(counted, upload, "What is it?", ["fastv", "dart", "random"], 64, max_new_tokens=1)
    assert calls == []
    compare(counted, upload, "What is it?", ["crop-ilp", "crop-plc"], 64, max_new_tokens=1)
    assert calls == [1, 1]


def test_a_method_that_cannot_meet_the_budget_is_reported_not_raised(models, upload):
    out = compare(models, upload, "What is it?", ["crop-plc"], 4, max_new_tokens=1)
    assert out[1].error and "PLC cannot meet" in out[1].error
    assert "could not run" in summary_table(out)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"upload": None}, "no image"),
    ({"question": "   "}, "the question is empty"),
    ({"methods": []}, "at least one method"),
    ({"methods": ["magic"]}, "unknown method 'magic'"),
    ({"keep_tokens": 0}, "between 1 and the image's 576"),
    ({"keep_tokens": 5000}, "between 1 and the image's 576"),
    ({"keep_tokens": 2.5}, "whole number"),
])
def test_bad_requests_get_the_cli_s_one_line_errors(models, upload, kwargs, message):
    args = {"upload": upload, "question": "What is it?", "methods": ["crop-ilp"], "keep_tokens": 64, **kwargs}
    with pytest.raises(CropInputError, match=message):
        compare(models, args["upload"], args["question"], args["methods"], args["keep_tokens"], max_new_tokens=1)


def test_uploads_are_checked_before_decoding(models, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 3 * 1024 * 1024)  # not an image at all: refused on size alone
    with pytest.raises(CropInputError, match="over the 2 MB limit"):
        compare(models, big, "What is it?", ["full"], 64, max_upload_mb=2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(CropInputError, match="corrupt|cannot"):
        compare(models, corrupt, "What is it?", ["full"], 64)


def test_the_core_and_the_cli_do_not_import_gradio():
    code = ("import sys, crop, crop.cli, crop.demo.core; from crop.cli import build_parser; build_parser(); "
            "sys.exit(1 if 'gradio' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_crop_demo_without_gradio_says_how_to_install_it(capsys):
    import importlib.util

    from crop.cli import main

    if importlib.util.find_spec("gradio") is not None:
        pytest.skip("gradio is installed here")
    assert main(["demo"]) == 2
    assert "pip install 'crop-vlm[demo]'" in capsys.readouterr().err
    assert main(["demo", "--port", "0"]) == 2


def test_the_trained_plc_runs_on_the_embedded_pair_and_is_reported_elsewhere(models, upload):
    """The shipped compressor belongs to the embedded answerer; on another model the page says why, in its row."""
    embedded = load_demo_models()
    (full, trained) = compare(embedded, upload, "What color is the star?", ["crop-plc-trained"], 28, max_new_tokens=2)
    assert trained.error is None and trained.tokens == {"llm_input": 28} and trained.overlay is not None
    (_, other) = compare(models, upload, "What is it?", ["crop-plc-trained"], 64, max_new_tokens=1)
    assert other.error is not None and "belongs to the answerer" in other.error
