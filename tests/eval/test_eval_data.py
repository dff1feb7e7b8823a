"""Your own data: the JSONL reader, the VQA metrics, scripts/convert_vqa.py, and `crop eval --data` end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from crop.cli import main
from crop.eval.data import exact_match, normalize_vqa_answer, read_vqa_jsonl, vqa_score
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parents[2]


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert_vqa", ROOT / "scripts" / "convert_vqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _dataset(tmp_path: Path, boxes: bool = True) -> Path:
    """Three samples: a relative and an absolute image path, string and list answers, grid and pixel boxes."""
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        random_image(10 + i, (336, 336)).save(tmp_path / "imgs" / f"{i}.png")
    records = [
        {"id": "a", "image": "imgs/0.png", "question": "What color is the star?", "answers": "red",
         "box_grid": [0, 0, 3, 3], "family": "color"},
        {"image": str(tmp_path / "imgs" / "1.png"), "question": "How many circles?", "answers": ["2", "two", "3"],
         "box_px": [0, 0, 84, 84], "family": "count"},
        {"id": "c", "image": "imgs/2.png", "question": "What is written?", "answers": ["stop"] * 3 + ["go"] * 7,
         **({"box_grid": [4, 4, 7, 7]} if boxes else {})},
    ]
    return _write(tmp_path / "data.jsonl", records)


# -- the VQA metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("The Two Dogs.", "2 dogs"),
    ("  Yes!\n", "yes"),
    ("a red car", "red car"),
    ("dont", "don't"),
    ("don't", "don't"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("left-hand", "left hand"),
    ("stop - go", "stop go"),
    ("NONE", "0"),
    ("(ten)", "10"),
])
def test_vqa_normalisation_follows_the_official_rules(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_exact_match_against_any_reference():
    assert exact_match("Two.", ["3", "2"]) and exact_match("the stop", "Stop")
    assert not exact_match("stops", ["stop"])


@pytest.mark.parametrize("hits,score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_score_is_the_official_leave_one_out_average(hits, score):
    answers = ["yes"] * hits + ["no"] * (10 - hits)
    assert vqa_score("Yes", answers) == pytest.approx(score)


def test_vqa_score_with_one_reference_is_the_exact_match():
    assert vqa_score("two", "2") == 1.0 and vqa_score("3", ["2"]) == 0.0
    with pytest.raises(ValueError):
        vqa_score("x", [])


# -- the JSONL reader -----------------------------------------------------------------------------


def test_reader_fields_paths_and_boxes(tmp_path):
    samples = read_vqa_jsonl(_dataset(tmp_path))
    a, b, c = samples
    assert [s.id for s in samples] == ["a", "line2", "c"]
    assert a.answers == ["red"] and a.answer == "red" and a.family == "color" and a.box_grid == [0, 0, 3, 3]
    assert Path(a.path).is_absolute() and a.image.size == (336, 336) and a.image.mode == "RGB"
    assert b.box_px == [0, 0, 84, 84] and b.box_grid == [0, 0, 1, 1]  # 84 px of 336 = two cells of 42
    assert c.family == "vqa" and len(c.answers) == 10


def test_reader_takes_crop_synth_output(tmp_path):
    from crop.data.synth import generate, write_split

    jsonl = write_split(tmp_path, "test", 2, seed=3)
    samples = read_vqa_jsonl(jsonl)
    for s, ref in zip(samples, generate(2, 3, "test"), strict=True):
        assert (s.id, s.question, s.answers, s.family, s.box_grid) == (ref.id, ref.question, [ref.answer], ref.family,
                                                                       ref.box_grid)
        assert list(s.image.getdata()) == list(ref.image.convert("RGB").getdata())


@pytest.mark.parametrize("record,message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"question": "q?", "answers": "x"}, "missing field 'image'"),
    ({"image": "imgs/0.png", "answers": "x"}, "missing field 'question'"),
    ({"image": "imgs/0.png", "question": "  ", "answers": "x"}, "empty question"),
    ({"image": "imgs/0.png", "question": "q?"}, "no 'answers'"),
    ({"image": "imgs/0.png", "question": "q?", "answers": []}, "non-empty string or list"),
    ({"image": "imgs/0.png", "question": "q?", "answers": ["ok", ""]}, "every answer must be a non-empty string"),
    ({"image": "imgs/nope.png", "question": "q?", "answers": "x"}, "No such file"),
    ({"image": "data.jsonl", "question": "q?", "answers": "x"}, "cannot identify image file"),
    ({"image": "imgs/0.png", "question": "q?", "answers": "x", "box_grid": [0, 0, 8, 8]}, "box"),
    ({"image": "imgs/0.png", "question": "q?", "answers": "x", "box_grid": [0, 0, 1]}, "four integers"),
    ({"image": "imgs/0.png", "question": "q?", "answers": "x", "box_px": [10, 10, 5, 5]}, "pixel box .* is empty"),
    ({"image": "imgs/0.png", "question": "q?", "answers": "x", "family": "all"}, "reserved"),
])
def test_reader_errors_name_file_and_line(tmp_path, record, message):
    (tmp_path / "imgs").mkdir()
    random_image(1, (64, 64)).save(tmp_path / "imgs" / "0.png")
    good = {"image": "imgs/0.png", "question": "q?", "answers": "x"}
    path = _write(tmp_path / "data.jsonl", [good, "", record])
    with pytest.raises(ValueError, match=message) as err:
        read_vqa_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ") and "\n" not in str(err.value)


def test_reader_refuses_duplicate_ids_empty_and_missing_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    random_image(1, (64, 64)).save(tmp_path / "imgs" / "0.png")
    rec = {"id": "x", "image": "imgs/0.png", "question": "q?", "answers": "x"}
    with pytest.raises(ValueError, match="data.jsonl:2: duplicate id 'x'"):
        read_vqa_jsonl(_write(tmp_path / "data.jsonl", [rec, rec]))
    with pytest.raises(ValueError, match="holds no records"):
        read_vqa_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="data file not found"):
        read_vqa_jsonl(tmp_path / "missing.jsonl")


# -- scripts/convert_vqa.py -----------------------------------------------------------------------


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        random_image(i, (48, 32)).save(folder / f"{name}.jpg")
    return folder


def test_convert_textvqa_style(tmp_path, capsys):
    images = _images(tmp_path / "train_images", ["img1", "img2"])
    ann = {"dataset_name": "textvqa", "data": [
        {"question_id": 7, "question": "What brand?", "image_id": "img1", "answers": ["Sony"] * 6 + ["sony tv"] * 4},
        {"question_id": 8, "question": "What number?", "image_id": "img2", "answers": ["12"] * 10},
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "out" / "textvqa.jsonl"
    assert _convert_module().main([str(tmp_path / "ann.json"), "--images", str(images), "--out", str(out)]) == 0
    assert "wrote 2 questions" in capsys.readouterr().out
    first = json.loads(out.read_text().splitlines()[0])
    assert first == {"id": "7", "image": "../train_images/img1.jpg", "question": "What brand?",
                     "answers": ["Sony"] * 6 + ["sony tv"] * 4, "family": "textvqa"}
    samples = read_vqa_jsonl(out)
    assert [s.id for s in samples] == ["7", "8"] and samples[1].image.size == (48, 32) and samples[0].box_grid is None


def test_convert_gqa_style_with_limit_and_missing_images(tmp_path, capsys):
    images = _images(tmp_path / "gqa", ["n1", "n3"])
    ann = {
        "q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "types": {"structural": "verify"}},
        "q2": {"imageId": "n2", "question": "What is it?", "answer": "cat", "types": {"structural": "query"}},
        "q3": {"imageId": "n3", "question": "Which side?", "answer": "left"},
    }
    (tmp_path / "gqa.json").write_text(json.dumps(ann))
    convert = _convert_module()
    out = tmp_path / "gqa.jsonl"
    args = [str(tmp_path / "gqa.json"), "--images", str(images), "--out", str(out)]
    assert convert.main(args) == 2  # n2.jpg is missing
    err = capsys.readouterr().err
    assert "image of question q2 not found" in err and err.count("\n") == 1
    assert convert.main(args + ["--skip-missing"]) == 0
    assert "(1 skipped: image missing)" in capsys.readouterr().out
    samples = read_vqa_jsonl(out)
    assert [(s.id, s.answers, s.family) for s in samples] == [("q1", ["yes"], "verify"), ("q3", ["left"], "gqa")]
    assert convert.main(args + ["--skip-missing", "--limit", "1", "--format", "gqa"]) == 0
    assert len(read_vqa_jsonl(out)) == 1


@pytest.mark.parametrize("content,message", [
    ("{not json", "cannot read"),
    (json.dumps({"x": 1}), "neither TextVQA style"),
    (json.dumps({"data": [{"question": "q", "image_id": "i"}]}), "record 0: missing field 'answers'"),
])
def test_convert_bad_annotation_files(tmp_path, capsys, content, message):
    (tmp_path / "ann.json").write_text(content)
    images = _images(tmp_path / "imgs", ["i"])
    assert _convert_module().main([str(tmp_path / "ann.json"), "--images", str(images), "--out",
                                   str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# -- crop eval --data, end to end -----------------------------------------------------------------


EVAL = ["eval", "--model", "tiny-random-llava", "--methods", "full,crop-ilp", "--keep-tokens", "64",
        "--batch-size", "2", "--max-new-tokens", "2"]


def test_eval_on_jsonl_data_end_to_end(tmp_path, capsys):
    data, out = _dataset(tmp_path), tmp_path / "eval"
    assert main([*EVAL, "--data", str(data), "--localizer", "oracle", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == {"name": "jsonl", "path": str(data), "split": "data.jsonl", "n": 3, "seed": 0}
    assert results["spec"]["data"] == str(data) and results["devices"]["answerer"] == "cpu"
    assert results["localization"]["all"]["mean_iou"] == 1.0 and results["localization"]["all"]["n"] == 3
    assert set(results["localization"]) == {"all", "color", "count", "vqa"}
    runs = {(r["method"], r["keep_tokens_576"]): r for r in results["runs"]}
    assert set(runs) == {("full", None), ("crop-ilp", 64)}
    for run in runs.values():
        preds = run["predictions"]
        assert [p["id"] for p in preds] == ["a", "line2", "c"]
        assert [p["box_gt"] for p in preds] == [[0, 0, 3, 3], [0, 0, 1, 1], [4, 4, 7, 7]]
        if run["method"] != "full":  # the unpruned model ignores the region
            assert [p["box"] for p in preds] == [p["box_gt"] for p in preds]  # the oracle
        for p in preds:
            assert p["correct"] == exact_match(p["prediction"], p["answers"])
            assert p["vqa_score"] == pytest.approx(vqa_score(p["prediction"], p["answers"]))
        assert run["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 3)
        assert run["vqa_score"] == pytest.approx(sum(p["vqa_score"] for p in preds) / 3)
        assert set(run["accuracy_per_family"]) == set(run["vqa_score_per_family"]) == {"color", "count", "vqa"}
    assert runs[("crop-ilp", 64)]["visual_tokens_kept"] == {"after_layer_2": 64, "llm_input": 576}
    table = (out / "results.md").read_text()
    assert table.startswith("| method |") and f"Benchmark: {data}," in table and "| VQA score |" in table
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert (out / "accuracy_vs_flops.png").stat().st_size > 1000


def test_eval_data_equals_the_synthetic_path_on_the_same_samples(tmp_path):
    from crop.data.synth import write_split

    jsonl = write_split(tmp_path / "synth", "test", 2, seed=0)
    args = [*EVAL, "--localizer", "oracle", "--n", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--data", str(jsonl), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    for run_a, run_b in zip(a["runs"], b["runs"], strict=True):
        keys = ("id", "prediction", "box", "box_gt", "visual_tokens_kept", "flops")
        assert [{k: p[k] for k in keys} for p in run_a["predictions"]] == \
               [{k: p[k] for k in keys} for p in run_b["predictions"]]
    assert a["localization"] == b["localization"]


def test_eval_data_oracle_needs_every_box_but_other_localizers_do_not(tmp_path, capsys, monkeypatch):
    data = _dataset(tmp_path, boxes=False)
    assert main([*EVAL, "--data", str(data), "--localizer", "oracle", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--localizer oracle needs a box for every sample; 1 of 3 have none (first: id 'c')" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    out = tmp_path / "full"
    assert main([*EVAL, "--data", str(data), "--localizer", "full", "--n", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"]["n"] == 2 and results["localization"]["all"]["n"] == 2


def test_eval_data_bad_file_is_one_line_error_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("no model may load for a bad data file")

    monkeypatch.setattr("crop.models.loading.load_model", no_model)
    bad = _write(tmp_path / "bad.jsonl", [{"image": "nope.png", "question": "q?", "answers": "x"}])
    assert main([*EVAL, "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"crop eval: error: --data: {bad}:1:") and err.count("\n") == 1
    assert main([*EVAL, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main([*EVAL, "--data", str(bad), "--n", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


def test_eval_help_documents_data(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--data FILE.jsonl" in text and "box_grid" in text and "convert_vqa.py" in text
