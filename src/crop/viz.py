"""Drawing what CROP kept: the region and the full-resolution tokens over the image."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from crop.regions import GridBox


def draw_overlay(image: Image.Image, box: GridBox, token_grid: tuple[int, int], kept: Sequence[int],
                 size: int = 448) -> Image.Image:
    """The image (resized to ``size`` x ``size``, the square the token grid covers) with dropped
    or pooled tokens dimmed, kept tokens outlined in green, and the region in red.

    Args:
        image: the input image.
        box: the region on its grid.
        token_grid: ``(rows, cols)`` of the visual tokens.
        kept: row-major indices of the tokens kept at full resolution.
        size: output side in pixels.

    Returns:
        A new RGB image.
    """
    rows, cols = token_grid
    base = image.convert("RGB").resize((size, size))
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept_set = set(int(k) for k in kept)
    cell_w, cell_h = size / cols, size / rows
    for idx in range(rows * cols):
        r, c = divmod(idx, cols)
        rect = [c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1]
        if idx in kept_set:
            draw.rectangle(rect, outline=(40, 200, 80, 200))
        else:
            draw.rectangle(rect, fill=(0, 0, 0, 150))
    out = Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")
    left, top, right, bottom = box.fractions()
    ImageDraw.Draw(out).rectangle([left * size, top * size, right * size - 1, bottom * size - 1],
                                  outline=(230, 30, 30), width=3)
    return out
