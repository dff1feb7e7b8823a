"""The synthetic localized-VQA generator: determinism, geometry, families, answers vs scene."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crop.data.synth import (
    COLORS,
    FAMILIES,
    SHAPES,
    SynthConfig,
    answers_match,
    default_config,
    generate,
    generate_sample,
    normalize_answer,
    pixel_box_to_grid,
    read_split,
    write_split,
)

N = 24  # 6 per family


@pytest.fixture(scope="module")
def samples():
    return {split: list(generate(N, seed=7, split=split)) for split in ("train", "test")}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_byte_identical_files(tmp_path):
    write_split(tmp_path / "a", "test", 8, seed=3)
    write_split(tmp_path / "b", "test", 8, seed=3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 8 + 2  # 8 PNGs, the JSONL and the meta file
    assert a == b


def test_seed_and_split_change_the_stream():
    base = generate_sample(0, seed=0, split="train")
    other_seed = generate_sample(0, seed=1, split="train")
    other_split = generate_sample(0, seed=0, split="val")
    assert base.image.tobytes() != other_seed.image.tobytes()
    assert base.image.tobytes() != other_split.image.tobytes()


def test_sample_is_independent_of_how_many_are_generated():
    alone = generate_sample(5, seed=2, split="val")
    in_run = list(generate(6, seed=2, split="val"))[5]
    assert alone.image.tobytes() == in_run.image.tobytes()
    assert (alone.question, alone.answer, alone.box_px) == (in_run.question, in_run.answer, in_run.box_px)


def test_jsonl_records(tmp_path):
    path = write_split(tmp_path, "val", 8, seed=1)
    records = read_split(path)
    assert len(records) == 8
    for rec in records:
        assert set(rec) == {"id", "image", "question", "answer", "family", "box_px", "box_grid"}
        assert (tmp_path / rec["image"]).is_file() or __import__("os").path.isfile(rec["image"])
    meta = json.loads((tmp_path / "val.meta.json").read_text())
    assert SynthConfig.from_dict(meta["config"]) == default_config("val")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_family_present_and_balanced(samples, split):
    fams = [s.family for s in samples[split]]
    assert {f: fams.count(f) for f in FAMILIES} == {f: N // 4 for f in FAMILIES}


@pytest.mark.parametrize("split", ["train", "test"])
def test_boxes_inside_image_and_grid_consistent(samples, split):
    from crop.regions import GridBox

    for s in samples[split]:
        w, h = s.image.size
        assert (w, h) == (336, 336) and s.image.mode == "RGB"
        x0, y0, x1, y1 = s.box_px
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert s.box_grid == pixel_box_to_grid(s.box_px, w, 8)
        assert s.box_grid == GridBox.from_pixels(tuple(s.box_px), w, h, 8).as_list()
        gx0, gy0, gx1, gy1 = s.box_grid
        assert 0 <= gx0 <= gx1 <= 7 and 0 <= gy0 <= gy1 <= 7
        if s.family == "global":
            assert s.box_grid == [0, 0, 7, 7]
        for o in s.objects:
            assert 0 <= o.bbox[0] < o.bbox[2] <= w and 0 <= o.bbox[1] < o.bbox[3] <= h


def test_objects_do_not_overlap(samples):
    for s in samples["train"]:
        boxes = [o.bbox for o in s.objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _pixel_matches(image, obj, color_name):
    rgb = np.asarray(image)[int(obj.cy), int(obj.cx)].astype(int)
    return np.abs(rgb - np.array(COLORS[color_name])).max() <= 14  # per-object jitter is +-12


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_consistent_with_scene(samples, split):
    for s in samples[split]:
        q = s.question.rstrip("?").split()
        if s.family == "attribute":  # What color is the <shape>
            shape = q[-1]
            targets = [o for o in s.objects if o.shape == shape]
            assert len(targets) == 1, "the asked shape must be unique"
            assert targets[0].color == s.answer and targets[0].bbox == s.box_px
            assert _pixel_matches(s.image, targets[0], s.answer)
            assert any(o.color == s.answer for o in s.objects if o is not targets[0]), "a same-colour distractor"
        elif s.family == "text":  # What number is on the <color> card
            color = q[-2]
            cards = [o for o in s.objects if o.shape == "card" and o.color == color]
            assert len(cards) == 1 and cards[0].digit == s.answer and cards[0].bbox == s.box_px
            assert any(o.shape == "card" and o.digit != s.answer for o in s.objects), "another card, another digit"
        elif s.family == "relation":  # What shape is <left|right> of the <color> <shape>
            direction, color, shape = q[3], q[-2], q[-1]
            anchors = [o for o in s.objects if o.shape == shape and o.color == color]
            assert len(anchors) == 1
            a = anchors[0]
            assert _pixel_matches(s.image, a, color)
            side = [o for o in s.objects if o is not a and o.bbox[1] < a.bbox[3] and a.bbox[1] < o.bbox[3]
                    and (o.cx < a.cx if direction == "left" else o.cx > a.cx)]
            nearest = min(side, key=lambda o: abs(o.cx - a.cx))
            assert nearest.shape == s.answer and s.answer in SHAPES
            union = [min(a.bbox[0], nearest.bbox[0]), min(a.bbox[1], nearest.bbox[1]),
                     max(a.bbox[2], nearest.bbox[2]), max(a.bbox[3], nearest.bbox[3])]
            assert union == s.box_px
        else:  # How many <shape>s are there
            shape = q[2][:-1]
            assert str(sum(o.shape == shape for o in s.objects)) == s.answer
            assert 1 <= int(s.answer) <= 4


def test_test_split_is_shifted():
    train, test = default_config("train"), default_config("test")
    assert test.n_objects != train.n_objects and test.object_scale != train.object_scale
    counts = [len(s.objects) for s in generate(12, 0, "test")]
    assert min(counts) >= 10


def test_knobs_change_scenes():
    cfg = SynthConfig(n_objects=(3, 3), object_scale=(0.2, 0.2), backgrounds=("stripes",))
    s = generate_sample(3, 0, "train", cfg)  # family "global" at index 3: count objects may exceed 3
    assert all(o.bbox[2] - o.bbox[0] in (int(round(0.2 * 336)), int(round(0.2 * 336 * 0.78))) for o in s.objects)


@pytest.mark.parametrize("bad", [dict(n_objects=(5, 2)), dict(object_scale=(0.5, 0.6)), dict(backgrounds=("x",)),
                                 dict(families=("nope",)), dict(image_size=10)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        SynthConfig(**bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 335), st.integers(1, 335), st.integers(1, 335), st.integers(1, 335), st.sampled_from([4, 8, 16]))
def test_grid_box_is_exactly_the_overlapped_cells(a, b, c, d, grid):
    x0, x1 = sorted((a, c))
    y0, y1 = sorted((b, d))
    x1, y1 = x1 + 1, y1 + 1
    gx0, gy0, gx1, gy1 = pixel_box_to_grid([x0, y0, x1, y1], 336, grid)
    cell = 336 / grid
    overlapped_x = [k for k in range(grid) if k * cell < x1 and (k + 1) * cell > x0]
    overlapped_y = [k for k in range(grid) if k * cell < y1 and (k + 1) * cell > y0]
    assert (gx0, gx1) == (overlapped_x[0], overlapped_x[-1])
    assert (gy0, gy1) == (overlapped_y[0], overlapped_y[-1])


def test_pixel_box_outside_image_raises():
    with pytest.raises(ValueError):
        pixel_box_to_grid([0, 0, 400, 10], 336)


@pytest.mark.parametrize("pred,gold,ok", [
    ("Red.", "red", True), ("  the star ", "star", True), ("three", "3", True), ("3", "3", True),
    ("red circle", "red", False), ("blue", "red", False), ("", "red", False), ("A Square!", "square", True),
])
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_normalize_answer():
    assert normalize_answer(" The Number is: Seven ") == "number is 7"


def test_cli_synth(tmp_path, capsys):
    from crop.cli import main

    assert main(["synth", "--out", str(tmp_path), "--split", "train", "--n", "4", "--seed", "1",
                 "--objects", "5,7", "--object-size", "30,40", "--background", "grain", "--no-progress"]) == 0
    records = read_split(tmp_path / "train.jsonl")
    assert len(records) == 4
    meta = json.loads((tmp_path / "train.meta.json").read_text())
    assert meta["config"]["n_objects"] == [5, 7] and meta["config"]["backgrounds"] == ["grain"]
    assert main(["synth", "--out", str(tmp_path), "--n", "2", "--objects", "9,2", "--no-progress"]) == 2
    assert "n_objects" in capsys.readouterr().err


def test_scene_questions_include_the_benchmark_question(samples):
    from crop.data.synth import scene_questions

    for s in samples["train"] + samples["test"]:
        qs = scene_questions(s.objects, 336)
        match = [q for q in qs if q[1] == s.question]
        assert match and match[0][0] == s.family and match[0][2] == s.answer and match[0][3] == s.box_px
        assert len({q[1] for q in qs}) == len(qs)
