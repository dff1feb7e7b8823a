"""Boxes found on the whole image map onto the (padded / centre-cropped) view LLaVA-1.5 sees."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from crop.config import CropILPConfig
from crop.localizers import FixedBoxLocalizer
from crop.models import get_adapter
from crop.pipeline import CropPipeline
from crop.regions import GridBox
from tests.conftest import tiny


def _painted(size: tuple[int, int], box: GridBox) -> Image.Image:
    """A black image with ``box``'s cells painted white."""
    w, h = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    left, top, right, bottom = box.fractions()
    img[round(top * h):round(bottom * h), round(left * w):round(right * w)] = 255
    return Image.fromarray(img)


def _where_it_lands(image_processor, image: Image.Image, grid: int) -> set[GridBox | None]:
    """The grid box of the painted pixels in the processor's output (half-intensity threshold).

    Resampling blurs edges by a pixel, so an edge that lands exactly on a cell boundary can be
    read on either side: both readings (as painted, and 2 px inside) are returned.
    """
    pixels = image_processor([image], return_tensors="pt")["pixel_values"][0].mean(0)  # (H, W)
    lit = (pixels > (pixels.max() + pixels.min()) / 2).numpy()
    if not lit.any() or pixels.max() - pixels.min() < 1e-3:
        return {None}
    ys, xs = np.nonzero(lit)
    h, w = lit.shape
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    inner = (min(x0 + 2, x1 - 1), min(y0 + 2, y1 - 1), max(x1 - 2, x0 + 1), max(y1 - 2, y0 + 1))
    return {GridBox.from_pixels((x0, y0, x1, y1), w, h, grid), GridBox.from_pixels(inner, w, h, grid)}


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("size", [(672, 336), (300, 500), (336, 336)])
def test_llava_view_box_matches_the_processor(size, pad):
    model, processor = tiny("tiny-random-llava")
    image_processor = type(processor.image_processor)(**processor.image_processor.to_dict())
    image_processor.do_pad = pad
    adapter = get_adapter(model)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, 8, size=2))
        box = GridBox(x0, y0, int(rng.integers(x0, 8)), int(rng.integers(y0, 8)))
        mapped = adapter.view_box(box, size, image_processor)
        assert mapped in _where_it_lands(image_processor, _painted(size, box), 8), box
        checked += mapped is not None
    assert checked >= 6
    for box in (GridBox(2, 1, 5, 6), GridBox(0, 0, 3, 7)):  # the picture drawn under the tokens is that view
        view = adapter.view_image(_painted(size, box), image_processor)
        assert view.size == (336, 336)
        assert adapter.view_box(box, size, image_processor) in _where_it_lands(image_processor, view, 8), box
    if size == (336, 336):  # a square image at the model's size: identity
        assert adapter.view_box(GridBox(1, 2, 3, 4), size, image_processor) == GridBox(1, 2, 3, 4)


def test_qwen_view_box_is_identity():
    model, processor = tiny("tiny-random-qwen2-vl")
    box = GridBox(0, 1, 2, 3)
    assert get_adapter(model).view_box(box, (640, 200), processor.image_processor) == box
    image = Image.new("RGB", (640, 200))
    assert get_adapter(model).view_image(image, processor.image_processor) is image


def test_pipeline_uses_the_view_box_and_falls_back_when_cropped_away(caplog):
    model, processor = tiny("tiny-random-llava")
    wide = Image.new("RGB", (672, 336), (90, 120, 200))  # the centre crop keeps x in [168, 504)
    pipe = CropPipeline(model, processor, FixedBoxLocalizer(GridBox(2, 0, 3, 1)), CropILPConfig(keep_tokens=64))
    result = pipe(wide, "What is here?", max_new_tokens=2)
    assert result.box == [2, 0, 3, 1] and result.extra["model_view_box"] == [0, 0, 3, 1]
    off = CropPipeline(model, processor, FixedBoxLocalizer(GridBox(0, 0, 0, 7)), CropILPConfig(keep_tokens=64))
    with caplog.at_level(logging.WARNING):
        result = off(wide, "What is here?", max_new_tokens=2)
    assert result.extra["model_view_box"] == [0, 0, 7, 7]
    assert any("outside the part" in r.message for r in caplog.records)
