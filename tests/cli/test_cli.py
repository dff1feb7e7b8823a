"""The ``crop answer`` command: the JSON contract and one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crop.cli import main
from tests.conftest import random_image

TINY = ["--model", "tiny-random-llava"]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    random_image(21).save(path)
    return str(path)


def test_answer_json_contract_ilp_budget_64(image_path):
    """The issue's acceptance command, through the real console entry point."""
    proc = subprocess.run(
        [sys.executable, "-m", "crop", "answer", image_path, "What is it?", *TINY, "--localizer", "box:2,2,5,5",
         "--method", "ilp", "--keep-tokens", "64", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ["answer", "box", "grid", "method", "layer", "visual_tokens_in", "visual_tokens_kept",
                "kv_cache_lengths", "kv_cache_bytes", "timings"]:
        assert key in out
    assert out["box"] == [2, 2, 5, 5] and out["grid"] == 8 and out["method"] == "crop-ilp" and out["layer"] == 2
    assert out["visual_tokens_in"] == 576
    assert out["visual_tokens_kept"] == {"llm_input": 576, "after_layer_2": 64}
    lengths = out["kv_cache_lengths"]
    assert len(lengths) == 4 and lengths[0] == lengths[1] and lengths[2] == lengths[3] == lengths[0] - 576 + 64
    assert set(out["timings"]) >= {"localizer_s", "prefill_s", "decode_s"}
    assert all(v >= 0 for v in out["timings"].values())
    assert "random weights" in out["note"]
    # bytes = 4 layers x lengths x (keys + values) x kv_heads(2) x head_dim(16) x 4 bytes (fp32)
    assert out["kv_cache_bytes"] == sum(lengths) * 2 * 2 * 16 * 4


@pytest.mark.parametrize("method,kept_key,kept", [("plc", "llm_input", 64), ("none", "llm_input", 576)])
def test_answer_json_other_methods(image_path, capsys, method, kept_key, kept):
    args = ["answer", image_path, "What is it?", *TINY, "--localizer", "box:2,2,5,5", "--method", method, "--json"]
    if method == "plc":
        args += ["--keep-tokens", "64"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens_kept"][kept_key] == kept
    assert out["layer"] is None


def test_answer_human_report(image_path, capsys):
    assert main(["answer", image_path, "What is it?", *TINY, "--localizer", "full"]) == 0
    captured = capsys.readouterr()
    assert "answer:" in captured.out and "visual tokens: 576 in" in captured.out
    assert "gibberish" in captured.err


def _bad_inputs(tmp_path, image_path):
    missing = str(tmp_path / "missing.png")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(image_path, "rb").read()[:400])
    return [
        ([missing, "q?"], "not found"),
        ([str(text_file), "q?"], "not an image"),
        ([str(truncated), "q?"], "corrupt"),
        ([str(tmp_path), "q?"], "not a file"),
        ([image_path, "   "], "question is empty"),
        ([image_path, "q?", "--localizer", "box:0,0,8,8"], "not a valid box"),
        ([image_path, "q?", "--localizer", "box:5,5,2,2"], "not a valid box"),
        ([image_path, "q?", "--localizer", "box:1,2,3"], "four integers"),
        ([image_path, "q?", "--keep-tokens", "0"], "--keep-tokens"),
        ([image_path, "q?", "--keep-tokens", "-5"], "--keep-tokens"),
        ([image_path, "q?", "--layer", "4"], "outside the model's depth"),
        ([image_path, "q?", "--layer", "0"], "layer must be"),
        ([image_path, "q?", "--method", "magic"], "unknown method"),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path, image_path, capsys):
    for args, message in _bad_inputs(tmp_path, image_path):
        code = main(["answer", *args, *TINY])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, err)
        errors = [line for line in err if line.startswith("crop answer: error:")]
        assert len(errors) == 1 and message in errors[0], (args, err)
        assert not any("Traceback" in line for line in err)


def test_unknown_model_exits_2(image_path, capsys):
    for model in ["no-such-model", "tiny-random-gpt"]:
        assert main(["answer", image_path, "q?", "--model", model]) == 2
        assert "unknown model" in capsys.readouterr().err


def test_bad_input_through_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crop", "answer", str(tmp_path / "nope.jpg"), "q?", *TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["answer", "--help"])
    text = capsys.readouterr().out
    for word in ["--keep-tokens", "--localizer", "box:x0,y0,x1,y1", "--layer", "--json", "examples"]:
        assert word in text


def test_option_reaches_any_config_field_and_inapplicable_flags_are_refused(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (9, 90, 200)).save(img)
    base = ["answer", str(img), "What is it?", "--model", "tiny-random-llava", "--localizer", "full", "--json",
            "--max-new-tokens", "1"]
    assert main([*base, "--method", "dart", "--keep-tokens", "40", "--option", "budget=exact"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens_kept"]["after_layer_2"] == 40  # official would keep 44
    assert main([*base, "--method", "pdrop", "--option", "layers=1,2", "--option", "ratio=0.25"]) == 0
    out = json.loads(capsys.readouterr().out)["visual_tokens_kept"]
    assert out["after_layer_1"] == 144 and out["after_layer_2"] == 36  # floor(576 * 0.25 ** s)
    for argv, message in [(["--method", "dart", "--option", "ratio=0.5"], "has no option ratio"),
                          (["--method", "dart", "--option", "budget"], "KEY=VALUE"),
                          (["--method", "ilp", "--pool", "2"], "--pool does not apply to crop-ilp"),
                          (["--method", "plc", "--layer", "3"], "--layer does not apply to crop-plc")]:
        assert main([*base, *argv]) == 2
        assert message in capsys.readouterr().err


def test_sample_flag_answers_the_shipped_image(capsys):
    """`crop answer --sample QUESTION` works from an installed wheel: the image ships inside the package."""
    from pathlib import Path

    from crop.io import sample_image_path

    shipped = sample_image_path()
    assert shipped.read_bytes() == (Path(__file__).resolve().parents[2] / "examples" / "sample.png").read_bytes()
    assert main(["answer", "--sample", "What color is the star?", *TINY, "--localizer", "full", "--json",
                 "--max-new-tokens", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens_in"] == 576


def test_report_prints_the_box_used_and_says_when_it_differs():
    from crop.cli.answer import _report
    from crop.pipeline import CropResult

    def result(**kw):
        base = dict(answer="red", box=[0, 2, 3, 5], grid=8, method="crop-ilp", layer=2, keep_tokens=None,
                    visual_tokens_in=576, visual_tokens_kept={"llm_input": 576}, kv_cache_lengths=[1],
                    kv_cache_bytes=0, timings={"localizer_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "total_s": 0.0})
        return CropResult(**{**base, **kw})

    mapped = _report(result(extra={"model_view_box": [0, 2, 2, 5]})).splitlines()[1]
    assert mapped.startswith("region: [0, 2, 2, 5] on a 8x8 grid of the model's view")
    assert "the localizer's box [0, 2, 3, 5]" in mapped
    same = _report(result()).splitlines()[1]
    assert same == "region: [0, 2, 3, 5] on a 8x8 grid"
    fallback = _report(result(box=[0, 0, 7, 7], localizer_fallback=True)).splitlines()[1]
    assert fallback.startswith("region: [0, 0, 7, 7]") and "full image used" in fallback


@pytest.mark.parametrize("size", [(10000, 10000), (20000, 20000)])
def test_decompression_bomb_is_one_line_exit_2_without_warnings(tmp_path, size):
    """Over 2x Pillow's limit used to be a traceback, 1x..2x raw warning lines."""
    from tests.test_io import _png_header

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(*size))
    proc = subprocess.run([sys.executable, "-m", "crop", "answer", str(bomb), "q?"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crop answer: error: image too large"), proc.stderr
    assert "--max-image-pixels" in lines[0]


def test_building_the_parser_does_not_import_torch():
    """`crop --help` stays quick: no torch or transformers until a subcommand runs."""
    code = ("import sys; from crop.cli import build_parser; p = build_parser(); p.format_help(); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_lazy_train_parser_is_the_real_one(capsys):
    """`train` is listed with a static help line until it runs; that line is the real parser's."""
    import crop.cli as cli

    parser = cli.build_parser()
    args = parser.parse_args(["train", "cost", "--no-write"])
    assert args.func.__name__ == "run_cost" and args.no_write
    action = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in action._choices_actions}
    assert helps["train"] == cli.LAZY_SUBCOMMANDS["train"]
    with pytest.raises(SystemExit):
        main(["train", "localizer", "--help"])
    assert "--base" in capsys.readouterr().out
