"""Choosing which visual tokens of one image to keep, given a region and a budget.

Pure tensor code on one image's token grid (``rows x cols``, row-major), shared by CROP's
ILP and PLC stages. The policy (DESIGN.md section 3):

* ``budget=None``: exactly the tokens the region overlaps (the paper's pure variant);
* region larger than the budget: keep ``budget`` tokens inside the region, chosen by ``trim``:
  ``"center"`` the best-scoring (a compact blob around the region's centre), ``"stride"``
  evenly spaced over the region (coverage of all of it, e.g. every object of a whole-image
  box for a counting question);
* region smaller: grow the box one cell per side at a time (CROP's thesis is contiguity),
  keep every token of the last box that fits, and fill the rest from the next ring by score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crop.regions import GridBox


def center_scores(box: GridBox, rows: int, cols: int) -> torch.Tensor:
    """Score = minus the distance of each token's centre to the box's centre (in image fractions).

    Trimming by this score keeps a compact blob around the centre of the region, and filling
    by it grows the kept set outwards evenly; ties break by token index.

    Returns:
        ``(rows * cols,)`` float scores, higher is better.
    """
    left, top, right, bottom = box.fractions()
    cy = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows  # (rows,)
    cx = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols  # (cols,)
    dy = (cy - (top + bottom) / 2)[:, None]  # (rows, 1)
    dx = (cx - (left + right) / 2)[None, :]  # (1, cols)
    return -(dy.square() + dx.square()).sqrt().flatten()  # (rows*cols,)


def _top(indices: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` entries of ``indices`` with the highest ``scores[indices]``; stable, ties by index."""
    order = torch.argsort(-scores[indices], stable=True)
    return indices[order[:k]]


TRIMS = ("center", "stride")


def select_tokens(box: GridBox, rows: int, cols: int, budget: int | None,
                  scores: torch.Tensor | None = None, trim: str = "center") -> torch.Tensor:
    """Token indices to keep for one image.

    Args:
        box: the region on the coarse grid.
        rows, cols: the image's token grid.
        budget: tokens to keep, or ``None`` for exactly the region's tokens.
        scores: ``(rows * cols,)`` token scores for trimming/filling (higher kept first);
            defaults to :func:`center_scores`.
        trim: how a region larger than the budget is cut (:data:`TRIMS`).

    Returns:
        Sorted ``(k,)`` long tensor of row-major token indices, ``k = min(budget, rows*cols)``
        (or the region's size when ``budget`` is ``None``).
    """
    return select_tokens_multi(box, [(rows, cols)], budget, scores, trim)  # one grid is the general case's simplest

def _grid_indices(box: GridBox, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The box's tokens on every grid, as indices into the grids' concatenation."""
    out, offset = [], 0
    for rows, cols in grids:
        out.append(box.token_indices(rows, cols) + offset)  # (r_g,)
        offset += rows * cols
    return torch.cat(out)  # (r,)


def select_tokens_multi(box: GridBox, grids: Sequence[tuple[int, int]], budget: int | None,
                        scores: torch.Tensor | None = None, trim: str = "center") -> torch.Tensor:
    """:func:`select_tokens` for an image seen through several token grids at once.

    Each grid covers the whole image (LLaVA-NeXT: the 24x24 base view and the unpadded tile
    grid). The box maps onto every grid; trimming, growing and filling act on all grids
    together, with one budget counted over all of them, so a region keeps its share of every
    view. Indices address the grids' concatenation (grid 0 row-major, then grid 1, ...).

    Args:
        box: the region on the coarse grid.
        grids: ``(rows, cols)`` of each grid, in order.
        budget: tokens to keep over all grids, or ``None`` for exactly the region's tokens.
        scores: ``(sum rows*cols,)`` token scores; defaults to :func:`center_scores` per grid.
        trim: how a region larger than the budget is cut (:data:`TRIMS`).

    Returns:
        Sorted ``(k,)`` long tensor of indices, ``k = min(budget, total)`` (or the region's size).
    """
    n = sum(rows * cols for rows, cols in grids)
    if budget is not None and budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if scores is None:
        scores = torch.cat([center_scores(box, rows, cols) for rows, cols in grids])  # (n,)
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
    region = _grid_indices(box, grids)  # (r,)
    if budget is None:
        return region
    if budget >= n:
        return torch.arange(n)
    if trim not in TRIMS:
        raise ValueError(f"unknown trim {trim!r}; choose one of {', '.join(TRIMS)}")
    if region.numel() >= budget:
        if trim == "stride":  # evenly spaced over the region's tokens (grid by grid, row-major)
            picks = torch.linspace(0, region.numel() - 1, budget, dtype=torch.float64).round().long()  # (budget,)
            return region[picks].sort().values
        return _top(region, scores, budget).sort().values
    inner, current = region, box
    while True:
        grown = current.grow(1)
        outer = _grid_indices(grown, grids)
        if outer.numel() >= budget or grown == current:
            break
        inner, current = outer, grown
    ring = outer[~torch.isin(outer, inner)]  # tokens added by the last growth step
    fill = _top(ring, scores, budget - inner.numel())
    return torch.cat([inner, fill]).sort().values
