"""``--overlay`` draws what each model family sees: its aspect ratio, and LLaVA-NeXT's tiles."""

from __future__ import annotations

import pytest
from PIL import Image

from crop.cli import main
from crop.models.base import OverlayPanel, TokenGrid
from crop.regions import GridBox
from crop.viz import CAPTION_PX, POOLED, TILE, draw_panel


def _overlay(tmp_path, model: str, size: tuple[int, int]) -> Image.Image:
    img = tmp_path / "wide.png"
    Image.new("RGB", size, (60, 60, 200)).save(img)
    png = tmp_path / "overlay.png"
    assert main(["answer", str(img), "What is it?", "--model", model, "--localizer", "box:0,0,1,1",
                 "--keep-tokens", "8", "--max-new-tokens", "1", "--overlay", str(png)]) == 0
    return Image.open(png).convert("RGB")


def _bright(picture: Image.Image, x: int, y: int) -> bool:
    return picture.getpixel((x, y))[2] > 150  # the blue image, not dimmed


@pytest.mark.parametrize("model", ["tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_qwen_overlay_keeps_the_image_aspect_ratio(tmp_path, model):
    """Qwen2-VL and Qwen3-VL tokenize the image at its own aspect ratio: a 2:1 image is drawn 2:1, not squashed."""
    picture = _overlay(tmp_path, model, (640, 320))
    assert picture.size == (448, 224)
    assert _bright(picture, 30, 30) and not _bright(picture, 300, 150)  # kept top-left, dimmed elsewhere


def test_llava_next_overlay_draws_the_base_view_and_the_tiles(tmp_path):
    """Two titled panels at the image's aspect ratio; the tiles panel shows the tile boundary and its kept tokens."""
    picture = _overlay(tmp_path, "tiny-random-llava-next", (640, 320))
    panel_w, panel_h = 448, 224
    assert picture.size == (2 * panel_w + 4, panel_h + CAPTION_PX)
    right = picture.crop((panel_w + 4, CAPTION_PX, 2 * panel_w + 4, CAPTION_PX + panel_h))
    # 1 x 2 tiles of a 2:1 image: the boundary is the vertical middle line of the tiles panel
    assert all(right.getpixel((panel_w // 2, y))[:2] == TILE[:2] for y in range(100, 120))
    kept_right = [(x, y) for x in range(0, 120, 3) for y in range(0, 60, 3) if _bright(right, x, y)]
    assert kept_right, "the region's high-res tokens are drawn as kept"
    assert not _bright(right, 300, 150)


def test_tile_lines_follow_the_unpadded_origin():
    """A grid unpadded by 6 rows at the top has its horizontal tile boundary 6 rows above the tile side."""
    panel = OverlayPanel("tiles", Image.new("RGB", (480, 360), (60, 60, 200)), TokenGrid(36, 48),
                         tile=(24, 24), tile_origin=(-6, 0))
    picture = draw_panel(panel, GridBox(0, 0, 0, 0, grid=8), [], size=480)
    row_px = (24 - 6) * 10  # 10 px per cell at this size
    assert picture.getpixel((100, row_px))[:2] == TILE[:2]
    assert picture.getpixel((100, 24 * 10))[:2] != TILE[:2]
    assert picture.getpixel((240, 100))[:2] == TILE[:2]  # the vertical boundary at column 24


def test_pooled_blocks_are_outlined_where_plc_pools():
    """With pool=4 on an 8x8 grid, the blocks holding non-kept tokens get an outline; a fully kept block none."""
    panel = OverlayPanel("model view", Image.new("RGB", (320, 320), (60, 60, 200)), TokenGrid(8, 8))
    kept = [r * 8 + c for r in range(4) for c in range(4)]  # the top-left block entirely kept
    picture = draw_panel(panel, GridBox(0, 0, 0, 0, grid=8), kept, size=320, pool=4)
    assert picture.getpixel((200, 160))[:3] == POOLED  # top edge of the bottom-right block (x 160..319)
    assert picture.getpixel((100, 120))[:3] != POOLED  # inside the kept block: no block outline
