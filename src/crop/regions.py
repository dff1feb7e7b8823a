"""Regions on a coarse grid over the image, and their mapping to visual-token grids.

A localizer answers with a :class:`GridBox`: a rectangle of cells on an ``n x n`` grid
(default 8, as in the CROP paper), with 0-indexed inclusive coordinates
``[x_min, y_min, x_max, y_max]``. Adapters map it onto whatever token grid the model
has (LLaVA-1.5: 24x24, so one cell is 3x3 tokens; Qwen2-VL: the merged-patch grid).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_GRID = 8
_MAX_PARSE_CHARS = 20_000
_BOX_PATTERN = re.compile(r"[\[(]\s*(-?\d{1,6})\s*,\s*(-?\d{1,6})\s*,\s*(-?\d{1,6})\s*,\s*(-?\d{1,6})\s*[\])]")


@dataclass(frozen=True)
class GridBox:
    """An axis-aligned rectangle of cells on a ``grid`` x ``grid`` grid, inclusive on both ends.

    Args:
        x0, y0: first column and row (0-indexed).
        x1, y1: last column and row (inclusive).
        grid: number of cells per side.

    Raises:
        ValueError: if the box is off the grid or inverted.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    grid: int = DEFAULT_GRID

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "x1", "y1", "grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GridBox.{name} must be an int, got {value!r}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not (0 <= self.x0 <= self.x1 < self.grid and 0 <= self.y0 <= self.y1 < self.grid):
            raise ValueError(
                f"box [{self.x0}, {self.y0}, {self.x1}, {self.y1}] is not a valid box on a {self.grid}x{self.grid} "
                f"grid: need 0 <= x0 <= x1 <= {self.grid - 1} and 0 <= y0 <= y1 <= {self.grid - 1}"
            )

    @classmethod
    def full(cls, grid: int = DEFAULT_GRID) -> GridBox:
        """The whole image."""
        return cls(0, 0, grid - 1, grid - 1, grid)

    @classmethod
    def from_list(cls, coords: Sequence[int], grid: int = DEFAULT_GRID) -> GridBox:
        """The box ``[x0, y0, x1, y1]`` (as :meth:`as_list` writes it, e.g. in a results file) on a ``grid``.

        Raises:
            ValueError: unless ``coords`` holds exactly four cells (and they lie on the grid).
        """
        if len(coords) != 4:
            raise ValueError(f"a grid box is [x0, y0, x1, y1], got {list(coords)!r}")
        x0, y0, x1, y1 = coords
        return cls(x0, y0, x1, y1, grid)

    @classmethod
    def from_pixels(cls, box_px: tuple[float, float, float, float], width: int, height: int,
                    grid: int = DEFAULT_GRID) -> GridBox:
        """The smallest grid box covering every cell that the pixel box overlaps with positive area.

        Args:
            box_px: ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive edges (as PIL uses).
            width, height: image size in pixels.
            grid: cells per side.
        """
        x0, y0, x1, y1 = box_px
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"pixel box {box_px} is empty or outside a {width}x{height} image")
        cx0 = int(x0 * grid // width)
        cy0 = int(y0 * grid // height)
        cx1 = int(-(-x1 * grid // width)) - 1  # ceil, then the last overlapped cell
        cy1 = int(-(-y1 * grid // height)) - 1
        return cls(cx0, cy0, max(cx0, cx1), max(cy0, cy1), grid)

    def as_list(self) -> list[int]:
        """``[x0, y0, x1, y1]``."""
        return [self.x0, self.y0, self.x1, self.y1]

    @property
    def width(self) -> int:
        return self.x1 - self.x0 + 1

    @property
    def height(self) -> int:
        return self.y1 - self.y0 + 1

    @property
    def area(self) -> int:
        """Number of cells."""
        return self.width * self.height

    def is_full(self) -> bool:
        return self.area == self.grid * self.grid

    def union(self, other: GridBox) -> GridBox:
        """The smallest box containing both (same grid required)."""
        self._same_grid(other)
        return GridBox(min(self.x0, other.x0), min(self.y0, other.y0), max(self.x1, other.x1),
                       max(self.y1, other.y1), self.grid)

    def intersection_area(self, other: GridBox) -> int:
        self._same_grid(other)
        w = min(self.x1, other.x1) - max(self.x0, other.x0) + 1
        h = min(self.y1, other.y1) - max(self.y0, other.y0) + 1
        return max(w, 0) * max(h, 0)

    def iou(self, other: GridBox) -> float:
        """Intersection over union, counted in cells."""
        inter = self.intersection_area(other)
        return inter / (self.area + other.area - inter)

    def contains(self, other: GridBox) -> bool:
        """Whether ``other`` lies entirely inside this box."""
        self._same_grid(other)
        return self.x0 <= other.x0 and self.y0 <= other.y0 and self.x1 >= other.x1 and self.y1 >= other.y1

    def grow(self, cells: int = 1) -> GridBox:
        """The box grown by ``cells`` on every side, clipped to the grid (symmetric where there is room)."""
        return GridBox(max(self.x0 - cells, 0), max(self.y0 - cells, 0), min(self.x1 + cells, self.grid - 1),
                       min(self.y1 + cells, self.grid - 1), self.grid)

    def on_grid(self, grid: int) -> GridBox:
        """The smallest box on a ``grid`` x ``grid`` grid that covers this box's part of the image.

        A cell of the new grid is in it when it overlaps this box with positive area (exact
        integer arithmetic), so no covered pixel is lost when a localizer's grid and the
        caller's differ.
        """
        if grid == self.grid:
            return self
        g = self.grid
        # new cell i spans [i/grid, (i+1)/grid); it overlaps [x0/g, (x1+1)/g) iff i*g < (x1+1)*grid and (i+1)*g > x0*grid
        lo = lambda a: (a * grid) // g  # noqa: E731  first new cell with (i+1)*g > a*grid
        hi = lambda b: -(-(b * grid) // g) - 1  # noqa: E731  last new cell with i*g < b*grid
        return GridBox(lo(self.x0), lo(self.y0), hi(self.x1 + 1), hi(self.y1 + 1), grid)

    def fractions(self) -> tuple[float, float, float, float]:
        """The box as fractions of the image: ``(left, top, right, bottom)`` in [0, 1]."""
        g = self.grid
        return self.x0 / g, self.y0 / g, (self.x1 + 1) / g, (self.y1 + 1) / g

    def token_mask(self, rows: int, cols: int) -> torch.Tensor:
        """Which tokens of a ``rows x cols`` token grid (covering the whole image) the box overlaps.

        A token is in the box when its cell of the image overlaps the box with positive area.
        When the token grid is a multiple of the box grid (LLaVA-1.5: 24 = 3 * 8) this is exact.

        Returns:
            A bool tensor of shape ``(rows, cols)``.
        """
        c = torch.arange(cols)
        r = torch.arange(rows)
        # token c spans [c/cols, (c+1)/cols); overlap iff c/cols < right and (c+1)/cols > left (exact integer test)
        col_in = (c * self.grid < (self.x1 + 1) * cols) & ((c + 1) * self.grid > self.x0 * cols)  # (cols,)
        row_in = (r * self.grid < (self.y1 + 1) * rows) & ((r + 1) * self.grid > self.y0 * rows)  # (rows,)
        return row_in[:, None] & col_in[None, :]  # (rows, cols)

    def token_indices(self, rows: int, cols: int) -> torch.Tensor:
        """Row-major indices (into a flattened ``rows x cols`` grid) of the tokens the box overlaps."""
        return self.token_mask(rows, cols).flatten().nonzero().squeeze(1)

    def _same_grid(self, other: GridBox) -> None:
        if self.grid != other.grid:
            raise ValueError(f"boxes on different grids: {self.grid} vs {other.grid}")

    def __str__(self) -> str:
        return f"[{self.x0}, {self.y0}, {self.x1}, {self.y1}]"


def parse_grid_box(text: str, grid: int = DEFAULT_GRID) -> GridBox:
    """Parse a localizer's answer such as ``"The region is [2, 3, 5, 6]."`` into a :class:`GridBox`.

    Tolerates spacing, round or square brackets and surrounding words; takes the first
    four-integer bracket group in the text.

    Args:
        text: the localizer's decoded output.
        grid: the grid the box must lie on.

    Returns:
        The box.

    Raises:
        ValueError: if the text holds no four-integer box, or the box is off the grid or inverted.
    """
    if not isinstance(text, str):
        raise ValueError(f"localizer output must be a string, got {type(text).__name__}")
    match = _BOX_PATTERN.search(text[:_MAX_PARSE_CHARS])
    if match is None:
        snippet = text[:60].replace("\n", " ")
        raise ValueError(f"no box of the form [x0, y0, x1, y1] in localizer output {snippet!r}")
    x0, y0, x1, y1 = (int(g) for g in match.groups())
    return GridBox(x0, y0, x1, y1, grid)


def parse_box_argument(text: str, grid: int = DEFAULT_GRID) -> GridBox:
    """Parse a box given by a user as ``"x0,y0,x1,y1"`` (grid coordinates), strictly.

    Raises:
        ValueError: if it is not four integers or not a valid box on the grid.
    """
    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ValueError(f"box must be four integers x0,y0,x1,y1, got {text!r}")
    x0, y0, x1, y1 = (int(p) for p in parts)
    return GridBox(x0, y0, x1, y1, grid)
