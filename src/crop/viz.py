"""Drawing what CROP kept: the region and the full-resolution tokens over what the model sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

from crop.models.base import OverlayPanel
from crop.regions import GridBox

KEPT = (40, 200, 80, 200)  # outline of a kept token
DIMMED = (0, 0, 0, 150)  # fill of a dropped or pooled token
REGION = (230, 30, 30)
TILE = (255, 210, 0)
POOLED = (120, 170, 255)  # outline of a pooled block (PLC: one token per block of non-kept tokens)
CAPTION_PX = 18  # height of a panel's title strip when there are several panels


def pooled_block(config: Any) -> int | None:
    """The block side to outline on an overlay: training-free PLC's ``pool``, else ``None``."""
    return int(config.pool) if getattr(config, "method_name", None) == "crop-plc" else None


def draw_panels(panels: Sequence[OverlayPanel], box: GridBox, kept: Sequence[int], size: int = 448,
                pool: int | None = None) -> Image.Image:
    """Every panel (see :func:`draw_panel`) side by side, each titled when there are several.

    Args:
        panels: what the model sees (``VLMAdapter.overlay_panels``).
        box: the region, as fractions of every panel's picture (all panels cover the same image).
        kept: span positions of the tokens kept at full resolution (a result's
            ``full_resolution_tokens``); each panel takes those of its own grid.
        size: each panel's longer side in pixels.
        pool: PLC's block side: outline each pooled block (see :func:`draw_panel`).

    Returns:
        A new RGB image.
    """
    drawn = [draw_panel(p, box, kept, size, pool) for p in panels]
    if len(drawn) == 1:
        return drawn[0]
    width = sum(d.width for d in drawn) + 4 * (len(drawn) - 1)
    height = max(d.height for d in drawn) + CAPTION_PX
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for panel, picture in zip(panels, drawn, strict=True):
        draw.text((x + 4, 3), panel.title, fill=(0, 0, 0))
        out.paste(picture, (x, CAPTION_PX))
        x += picture.width + 4
    return out


def draw_panel(panel: OverlayPanel, box: GridBox, kept: Sequence[int], size: int = 448,
               pool: int | None = None) -> Image.Image:
    """The panel's picture at its own aspect ratio (longer side ``size``), its dropped or pooled
    tokens dimmed, kept tokens outlined in green, tile boundaries in yellow, the region in red;
    with ``pool``, every ``pool x pool`` block (aligned to the grid's origin, as PLC pools) that
    still holds a non-kept token is outlined in blue: each is one pooled token.

    Args:
        panel: picture + the token grid over it.
        box: the region, as fractions of the picture.
        kept: span positions of the tokens kept at full resolution; ``panel.grid.local`` maps
            them into the grid (for a plain grid they are its row-major indices).
        size: the longer side of the output in pixels.
        pool: PLC's block side, or ``None`` (dropped tokens, no blocks).

    Returns:
        A new RGB image.
    """
    grid = panel.grid
    w, h = panel.picture.size
    scale = size / max(w, h)
    width, height = max(1, round(w * scale)), max(1, round(h * scale))
    base = panel.picture.convert("RGB").resize((width, height))
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept_local = set(grid.local(torch.as_tensor(list(kept), dtype=torch.long)).tolist()) if len(kept) else set()
    cell_w, cell_h = width / grid.cols, height / grid.rows
    for idx in range(grid.rows * grid.cols):
        r, c = divmod(idx, grid.cols)
        rect = [c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1]
        if idx in kept_local:
            draw.rectangle(rect, outline=KEPT)
        else:
            draw.rectangle(rect, fill=DIMMED)
    out = Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")
    pen = ImageDraw.Draw(out)
    if pool:
        for br in range(0, grid.rows, pool):
            for bc in range(0, grid.cols, pool):
                cells = [r * grid.cols + c for r in range(br, min(br + pool, grid.rows))
                         for c in range(bc, min(bc + pool, grid.cols))]
                if any(i not in kept_local for i in cells):
                    r1, c1 = min(br + pool, grid.rows), min(bc + pool, grid.cols)
                    pen.rectangle([bc * cell_w, br * cell_h, c1 * cell_w - 1, r1 * cell_h - 1], outline=POOLED)
    if panel.tile is not None:
        for r in _tile_lines(panel.tile_origin[0], panel.tile[0], grid.rows):
            pen.line([(0, r * cell_h), (width, r * cell_h)], fill=TILE, width=2)
        for c in _tile_lines(panel.tile_origin[1], panel.tile[1], grid.cols):
            pen.line([(c * cell_w, 0), (c * cell_w, height)], fill=TILE, width=2)
    left, top, right, bottom = box.fractions()
    pen.rectangle([left * width, top * height, right * width - 1, bottom * height - 1], outline=REGION, width=3)
    return out


def _tile_lines(origin: int, step: int, extent: int) -> list[int]:
    """Grid lines strictly inside ``(0, extent)`` at ``origin + k * step``."""
    first = origin % step
    return [v for v in range(first, extent, step) if 0 < v < extent]
