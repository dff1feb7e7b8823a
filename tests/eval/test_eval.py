"""A short ``crop eval`` run on a tiny random LLaVA (accuracy is meaningless; the accounting is not)."""

from __future__ import annotations

import json

import pytest

from crop.cli import main
from crop.eval.matching import scale_budget


def test_scale_budget():
    assert scale_budget(64, 576) == 64
    assert [scale_budget(k, 256) for k in (64, 128, 192)] == [28, 57, 85]


def test_eval_smoke_writes_results_table_and_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", "tiny-random-llava", "--localizer", "oracle", "--n", "4", "--batch-size", "2",
                 "--keep-tokens", "64,192", "--methods", "full,crop-ilp,crop-plc", "--max-new-tokens", "2",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("| method |")
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert results["versions"]["transformers"] and results["benchmark"]["n"] == 4
    assert results["localization"]["all"]["mean_iou"] == 1.0  # the oracle is the ground truth
    runs = {(r["method"], r["keep_tokens"]): r for r in results["runs"]}
    assert set(runs) == {("full", None), ("crop-ilp", 64), ("crop-ilp", 192), ("crop-plc", 64), ("crop-plc", 192)}
    assert runs[("crop-ilp", 64)]["visual_tokens_kept"] == {"after_layer_2": 64, "llm_input": 576}
    assert runs[("crop-plc", 192)]["visual_tokens_kept"] == {"llm_input": 192}
    for run in results["runs"]:
        preds = run["predictions"]
        assert len(preds) == 4
        assert run["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 4)
        assert set(run["accuracy_per_family"]) == {p["family"] for p in preds}
        assert run["gflops"]["total"] == pytest.approx(sum(run["gflops"][k] for k in ("llm_prefill", "selection",
                                                                                      "localizer")))
        assert "prefill_speedup" not in run and all("timings" not in p for p in preds)  # speed is crop bench's
    # fewer tokens, fewer FLOPs; the oracle localizer costs nothing
    assert runs[("crop-ilp", 64)]["gflops"]["llm_prefill"] < runs[("full", None)]["gflops"]["llm_prefill"]
    assert runs[("crop-ilp", 64)]["gflops"]["localizer"] == 0
    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000


def test_eval_matched_equivalent_solves_budgets_and_flags_infeasible(tmp_path):
    out = tmp_path / "eval"
    # tiny-random-llava: 4 LM layers, 576 tokens; pruning at K = 2 costs at least 288 equivalent tokens
    assert main(["eval", "--model", "tiny-random-llava", "--localizer", "oracle", "--n", "2", "--batch-size", "2",
                 "--keep-tokens", "64,384", "--methods", "crop-ilp,crop-plc", "--max-new-tokens", "1",
                 "--match", "equivalent", "--out", str(out)]) == 0
    runs = {(r["method"], r["keep_tokens_576"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert "cheapest budget" in runs[("crop-ilp", 64)]["infeasible"] and not runs[("crop-ilp", 64)]["predictions"]
    assert runs[("crop-ilp", 384)]["keep_tokens"] == 192  # (2 * 576 + 2 * 192) / 4 = 384
    assert runs[("crop-ilp", 384)]["equivalent_tokens"] == pytest.approx(384)
    assert runs[("crop-plc", 64)]["equivalent_tokens"] == pytest.approx(64)
    assert "infeasible" in (out / "results.md").read_text()


def test_eval_rejects_unknown_method(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-random-llava", "--methods", "full,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_answer_overlay_png(tmp_path, capsys):
    from PIL import Image

    from tests.conftest import random_image

    img = tmp_path / "in.png"
    random_image(3).save(img)
    png = tmp_path / "overlay.png"
    assert main(["answer", str(img), "What is it?", "--model", "tiny-random-llava", "--localizer", "box:0,0,1,1",
                 "--keep-tokens", "36", "--overlay", str(png)]) == 0
    picture = Image.open(png).convert("RGB")
    assert picture.size == (448, 448)
    # the 6x6 kept tokens (top-left 2x2 cells) stay bright, the rest is dimmed
    inside = sum(picture.getpixel((x, y))[0] for x in range(20, 90, 7) for y in range(20, 90, 7))
    outside = sum(picture.getpixel((x, y))[0] for x in range(300, 370, 7) for y in range(300, 370, 7))
    assert inside > 1.5 * outside


def test_answer_overlay_draws_the_cropped_view_llava_sees(tmp_path):
    """A wide image is centre-cropped by LLaVA-1.5: the overlay shows that square and the box where it lands."""
    from PIL import Image

    img = tmp_path / "wide.png"
    Image.new("RGB", (672, 336), (60, 60, 200)).save(img)  # the crop keeps x in [168, 504)
    png = tmp_path / "overlay.png"
    assert main(["answer", str(img), "What is it?", "--model", "tiny-random-llava", "--localizer", "box:2,0,3,1",
                 "--keep-tokens", "36", "--overlay", str(png)]) == 0
    picture = Image.open(png).convert("RGB")
    red = lambda xy: picture.getpixel(xy)[0] > 200 and picture.getpixel(xy)[1] < 80  # noqa: E731
    # on the view the box is [0, 0, 3, 1]: its left edge is the picture's left edge, not x = 2/8 of it
    assert red((1, 40)) and red((223, 40)) and not red((112, 40))


def test_eval_label_reports_a_budget_a_method_cannot_run(tmp_path):
    out = tmp_path / "eval"
    # PyramidDrop's first stage (layer 1 of tiny-random-llava's 4) alone costs 144 equivalent tokens of 576
    assert main(["eval", "--model", "tiny-random-llava", "--localizer", "oracle", "--n", "2", "--batch-size", "2",
                 "--keep-tokens", "64", "--methods", "pdrop,crop-plc", "--max-new-tokens", "1", "--out", str(out)]) == 0
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert "cannot meet keep_tokens=64" in runs["pdrop"]["infeasible"] and runs["crop-plc"]["predictions"]
