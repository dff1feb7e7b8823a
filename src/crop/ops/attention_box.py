"""From an attention map over an image's visual tokens to one contiguous box on the region grid.

Used by CROP-self (:mod:`crop.methods.self_region`): the answerer's own early attention stands
in for the localizer. Two steps, both pure tensor code:

1. :func:`cell_mass`: the attention each grid cell received (every visual token is counted in
   the cell that holds its centre; an image seen through several token grids, as LLaVA-NeXT's
   base view + tiles, adds up every grid's mass in the same cells);
2. :func:`best_box`: the contiguous box that best trades the mass it holds against its size,
   by one of two documented rules (:data:`BOX_RULES`):

   - ``"price"``: the maximum-sum sub-rectangle of ``mass - price / cells``: a cell is worth
     including when it holds more than ``price`` times the uniform share (``1 / cells``);
     ``price=1`` keeps the cells that are above average, larger prices give tighter boxes;
   - ``"share"``: the smallest box holding at least ``share`` of the mass (ties: the one
     holding most).

Every box of the grid is scored at once from a 2-D prefix sum (``O(G^4)`` boxes, 1296 on the
default 8x8 grid), so the choice costs nothing next to one decoder layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crop.regions import GridBox

BOX_RULES = ("price", "share")


def cell_of_tokens(rows: int, cols: int, grid: int) -> torch.Tensor:
    """``(rows * cols,)`` the row-major grid cell (``y * grid + x``) holding each token's centre."""
    y = ((torch.arange(rows) * 2 + 1) * grid) // (2 * rows)  # (rows,) cell row of each token row's centre
    x = ((torch.arange(cols) * 2 + 1) * grid) // (2 * cols)  # (cols,)
    return (y[:, None] * grid + x[None, :]).flatten()  # (rows*cols,)


def cell_mass(weights: torch.Tensor, grids: Sequence[tuple[int, int]], grid: int) -> torch.Tensor:
    """The share of ``weights`` that falls in each cell of a ``grid x grid`` region grid.

    Args:
        weights: ``(V,)`` non-negative weight of each visual token, the grids' tokens one after
            the other, each row-major (the span order of :meth:`ImageSpan.visual_positions`).
        grids: ``(rows, cols)`` of each token grid; each covers the whole image.
        grid: the region grid side.

    Returns:
        ``(grid, grid)`` float64 masses summing to 1 (uniform when ``weights`` sums to 0).
    """
    cells = torch.cat([cell_of_tokens(r, c, grid) for r, c in grids])  # (V,)
    if cells.numel() != weights.numel():
        raise ValueError(f"{weights.numel()} weights for grids holding {cells.numel()} tokens")
    mass = torch.zeros(grid * grid, dtype=torch.float64)
    mass.index_add_(0, cells, weights.detach().double().cpu().clamp(min=0))
    total = mass.sum()
    if not total > 0:
        return torch.full((grid, grid), 1.0 / (grid * grid), dtype=torch.float64)
    return (mass / total).view(grid, grid)


def _box_sums(mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass and area of every box: ``(G, G, G, G)`` tensors indexed ``[y0, y1, x0, x1]`` (invalid boxes: NaN)."""
    g = mass.shape[0]
    prefix = torch.zeros(g + 1, g + 1, dtype=torch.float64)
    prefix[1:, 1:] = mass.cumsum(0).cumsum(1)  # prefix[i, j] = mass of rows < i, cols < j
    lo = torch.arange(g)
    y0, y1, x0, x1 = (t.flatten() for t in torch.meshgrid(lo, lo, lo, lo, indexing="ij"))
    sums = prefix[y1 + 1, x1 + 1] - prefix[y0, x1 + 1] - prefix[y1 + 1, x0] + prefix[y0, x0]  # (G^4,)
    area = ((y1 - y0 + 1) * (x1 - x0 + 1)).double()  # (G^4,)
    invalid = (y1 < y0) | (x1 < x0)
    sums[invalid] = float("nan")
    area[invalid] = float("nan")
    return sums.view(g, g, g, g), area.view(g, g, g, g)


def best_box(mass: torch.Tensor, rule: str = "price", price: float = 1.0, share: float = 0.5) -> GridBox:
    """The contiguous box that best trades attention mass against size (see the module docstring).

    Args:
        mass: ``(G, G)`` cell masses (rows = y), summing to 1.
        rule: ``"price"`` or ``"share"``.
        price: for ``"price"``, a cell's cost as a multiple of the uniform share ``1 / G^2``.
        share: for ``"share"``, the part of the mass the box must hold, in ``(0, 1]``.

    Returns:
        The box on the ``G x G`` grid. Ties go to the smaller box, then to the first in
        ``(y0, y1, x0, x1)`` order, so the answer is deterministic.
    """
    g = mass.shape[0]
    if mass.shape != (g, g):
        raise ValueError(f"mass must be a square (G, G) tensor, got {tuple(mass.shape)}")
    sums, area = _box_sums(mass.double())
    flat_sums, flat_area = sums.flatten(), area.flatten()  # (G^4,)
    if rule == "price":
        value = flat_sums - price * flat_area / (g * g)  # (G^4,)
    elif rule == "share":
        enough = flat_sums >= share - 1e-12
        value = torch.where(enough, -flat_area + flat_sums * 1e-6, torch.tensor(float("-inf"), dtype=torch.float64))
    else:
        raise ValueError(f"unknown box rule {rule!r}; choose one of {', '.join(BOX_RULES)}")
    value = torch.nan_to_num(value, nan=float("-inf"))
    best = value.max()
    ties = (value >= best - 1e-12).nonzero().squeeze(1)  # candidates within rounding of the best
    pick = ties[flat_area[ties].argmin()]  # the smallest of them; argmin takes the first on equal areas
    y0, y1, x0, x1 = (int(v) for v in torch.unravel_index(pick, (g, g, g, g)))
    return GridBox(x0, y0, x1, y1, g)
