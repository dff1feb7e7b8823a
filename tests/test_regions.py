from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from crop.regions import GridBox, parse_box_argument, parse_grid_box


def test_gridbox_validation():
    GridBox(0, 0, 7, 7)
    for bad in [(-1, 0, 3, 3), (0, 0, 8, 3), (4, 0, 3, 3), (0, 5, 3, 4)]:
        with pytest.raises(ValueError, match="not a valid box"):
            GridBox(*bad)
    with pytest.raises(ValueError, match="must be an int"):
        GridBox(0.5, 0, 1, 1)


def test_union_iou_contains_grow():
    a, b = GridBox(0, 0, 1, 1), GridBox(1, 1, 2, 2)
    assert a.union(b) == GridBox(0, 0, 2, 2)
    assert a.iou(b) == pytest.approx(1 / 7)
    assert a.union(b).contains(a) and not a.contains(b)
    assert GridBox(3, 3, 4, 4).grow() == GridBox(2, 2, 5, 5)
    assert GridBox(0, 0, 0, 7).grow() == GridBox(0, 0, 1, 7)  # clipped at the border
    assert GridBox.full().grow() == GridBox.full()


def test_token_mask_llava_cells_are_3x3():
    box = GridBox(2, 2, 5, 5)
    mask = box.token_mask(24, 24)
    assert mask.sum() == 12 * 12
    rows, cols = mask.nonzero().unbind(1)
    assert rows.min() == 6 and rows.max() == 17 and cols.min() == 6 and cols.max() == 17
    assert GridBox(0, 0, 0, 0).token_indices(24, 24).tolist() == [0, 1, 2, 24, 25, 26, 48, 49, 50]


def test_token_mask_non_divisible_grid_covers_box():
    box = GridBox(3, 0, 3, 0)  # one cell; a 10x13 grid does not divide by 8
    mask = box.token_mask(10, 13)
    assert mask.any()
    cols = mask.nonzero()[:, 1]
    assert cols.min() * 8 < 4 * 13 and (cols.max() + 1) * 8 > 3 * 13


def test_from_pixels_rounding():
    assert GridBox.from_pixels((0, 0, 42, 42), 336, 336) == GridBox(0, 0, 0, 0)
    assert GridBox.from_pixels((0, 0, 43, 42), 336, 336) == GridBox(0, 0, 1, 0)
    assert GridBox.from_pixels((100, 200, 336, 336), 336, 336) == GridBox(2, 4, 7, 7)


@pytest.mark.parametrize("text,box", [
    ("[2, 3, 5, 6]", (2, 3, 5, 6)),
    ("[2,3,5,6]", (2, 3, 5, 6)),
    ("The region is [ 0 , 1 , 7 , 7 ].", (0, 1, 7, 7)),
    ("box: (1, 1, 2, 2) then [3, 3, 4, 4]", (1, 1, 2, 2)),
    ("\n\n[4, 4, 4, 4]<|im_end|>", (4, 4, 4, 4)),
])
def test_parse_valid_and_noisy(text, box):
    assert parse_grid_box(text).as_list() == list(box)


@pytest.mark.parametrize("text", [
    "", "no box here", "[1, 2, 3]", "[0.1, 0.2, 0.5, 0.6]", "[5, 5, 2, 2]", "[0, 0, 8, 8]", "[-1, 0, 2, 2]",
    "[1, 2, 3, 4" , "[a, b, c, d]", "[" * 10000, "[1,2,3,4,5]",
])
def test_parse_rejects_invalid(text):
    with pytest.raises(ValueError):
        parse_grid_box(text)


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="must be a string"):
        parse_grid_box(None)  # type: ignore[arg-type]


@given(st.integers(0, 7), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7), st.text(max_size=30),
       st.text(max_size=30))
def test_parse_property_roundtrip(a, b, c, d, before, after):
    x0, x1 = sorted((a, c))
    y0, y1 = sorted((b, d))
    before = before.replace("[", "").replace("(", "")
    box = parse_grid_box(f"{before}[{x0}, {y0}, {x1}, {y1}]{after}")
    assert box == GridBox(x0, y0, x1, y1)


@given(st.text(max_size=200))
def test_parse_hostile_text_never_crashes_otherwise(text):
    try:
        box = parse_grid_box(text)
    except ValueError:
        return
    assert 0 <= box.x0 <= box.x1 <= 7 and 0 <= box.y0 <= box.y1 <= 7


def test_parse_box_argument_strict():
    assert parse_box_argument("2,2,5,5") == GridBox(2, 2, 5, 5)
    for bad in ["2,2,5", "a,b,c,d", "2,2,5,9", "1.5,2,3,4"]:
        with pytest.raises(ValueError):
            parse_box_argument(bad)


def test_token_indices_dtype():
    idx = GridBox(1, 1, 1, 1).token_indices(24, 24)
    assert idx.dtype == torch.long and idx.numel() == 9


def test_on_grid_covers_the_same_part_of_the_image():
    box = GridBox(3, 6, 4, 7)  # grid 8
    assert box.on_grid(8) is box
    assert box.on_grid(16) == GridBox(6, 12, 9, 15, grid=16)  # exactly the same pixels
    assert box.on_grid(4) == GridBox(1, 3, 2, 3, grid=4)  # the covering cells
    assert GridBox(0, 0, 0, 0).on_grid(3) == GridBox(0, 0, 0, 0, grid=3)
    assert GridBox.full(8).on_grid(5) == GridBox.full(5)
    odd = GridBox(2, 2, 2, 2).on_grid(3)  # [0.25, 0.375) lies in cell 0 ([0, 1/3)) and cell 1 ([1/3, 2/3)): 0.375 > 1/3
    assert (odd.x0, odd.x1) == (0, 1)
