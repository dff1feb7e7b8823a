"""Uniform average pooling of a token grid down to an exact number of tokens.

Used by the ``pool`` baseline: the whole grid is cut into ``k`` bins (no region, no kept
tokens) and each bin's tokens are averaged. The bins follow the adaptive-pooling convention
(bin ``i`` of ``m`` over ``n`` cells spans ``[floor(i*n/m), ceil((i+1)*n/m))``), so any ``k`` up to
``rows * cols`` is met exactly:

* if ``k`` factors as ``r' x c'`` with ``r' <= rows``, ``c' <= cols`` and an aspect ratio within
  a factor :data:`MAX_ASPECT_DEVIATION` of the grid's, the bins form that regular grid (the
  factorisation with the closest aspect wins; 64 on 24x24 -> 8x8, 192 -> 12x16);
* otherwise (e.g. a prime ``k``) the grid is cut into ``r'`` horizontal bands (``r'`` chosen
  for square-ish bins) and band ``i`` into ``c_i`` column bins, the ``c_i`` differing by at most
  one and summing to ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAX_ASPECT_DEVIATION = 2.0
"""A factorisation ``r' x c'`` is used only if ``(r'/c') / (rows/cols)`` lies within this factor of 1."""


def _bins(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start (inclusive) and end (exclusive) of ``m`` adaptive bins over ``n`` cells, each ``(m,)``."""
    i = torch.arange(m)
    return (i * n) // m, -((-(i + 1) * n) // m)


def band_layout(rows: int, cols: int, k: int) -> list[int]:
    """Column bins per horizontal band so that the bins total exactly ``k``.

    Args:
        rows, cols: the token grid.
        k: pooled tokens wanted, ``1 <= k <= rows * cols``.

    Returns:
        ``[c_0, ..., c_{r'-1}]`` with ``sum == k``; all equal for a regular ``r' x c'`` grid.

    Raises:
        ValueError: if ``k`` is out of range.
    """
    if not 1 <= k <= rows * cols:
        raise ValueError(f"cannot pool a {rows}x{cols} grid to {k} tokens (need 1 <= k <= {rows * cols})")
    target = math.log(rows / cols)
    best: tuple[float, int] | None = None
    for r in range(1, min(rows, k) + 1):
        if k % r or k // r > cols:
            continue
        deviation = abs(math.log(r / (k // r)) - target)
        if best is None or deviation < best[0] - 1e-9:  # ties: fewer rows (wider bins) first
            best = (deviation, r)
    if best is not None and best[0] <= math.log(MAX_ASPECT_DEVIATION):
        r = best[1]
        return [k // r] * r
    # ragged bands: r' bands of near-square bins, at least enough bands for k <= r' * cols
    r = min(max(round(math.sqrt(k * rows / cols)), -(-k // cols), 1), rows, k)
    return [k // r + (1 if i < k % r else 0) for i in range(r)]


def grid_bins(rows: int, cols: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` bins :func:`pool_grid_to` averages, band after band (sort by ``source`` for its output order).

    Args:
        rows, cols: the grid.
        k: bins wanted, ``1 <= k < rows * cols``.

    Returns:
        ``(member, source)``: ``member`` is ``(k, rows * cols)`` bool (token ``j`` is in bin
        ``i``); ``source`` is ``(k,)`` the row-major index of each bin's centre token.
    """
    layout = band_layout(rows, cols, k)
    row_start, row_end = _bins(rows, len(layout))  # (r',) each
    row_idx = torch.arange(rows)
    col_idx = torch.arange(cols)
    weights, sources = [], []
    for band, bins in enumerate(layout):
        in_rows = (row_idx >= row_start[band]) & (row_idx < row_end[band])  # (rows,)
        col_start, col_end = _bins(cols, bins)  # (c_i,) each
        in_cols = (col_idx[None, :] >= col_start[:, None]) & (col_idx[None, :] < col_end[:, None])  # (c_i, cols)
        weights.append((in_rows[None, :, None] & in_cols[:, None, :]).flatten(1))  # (c_i, rows*cols)
        centre_row = (row_start[band] + row_end[band] - 1) // 2
        sources.append(centre_row * cols + (col_start + col_end - 1) // 2)  # (c_i,)
    return torch.cat(weights), torch.cat(sources)  # (k, n), (k,)


def pool_grid_to(features: torch.Tensor, rows: int, cols: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool one ``rows x cols`` token grid to exactly ``k`` tokens.

    Args:
        features: ``(rows * cols, D)`` tokens, row-major.
        rows, cols: the grid.
        k: tokens wanted, ``1 <= k <= rows * cols`` (``k == rows * cols`` returns the grid unchanged).

    Returns:
        ``(tokens, source)``: ``tokens`` is ``(k, D)`` the bin means in reading order; ``source``
        is ``(k,)`` the row-major index of each bin's centre token (its representative
        position), strictly increasing.

    Raises:
        ValueError: if the features do not fill the grid or ``k`` is out of range.
    """
    n, _ = features.shape
    if n != rows * cols:
        raise ValueError(f"{n} features do not fill a {rows}x{cols} token grid")
    if k == n:
        return features, torch.arange(n, device=features.device)
    member, source = grid_bins(rows, cols, k)  # (k, n) bool, (k,)
    member, source = member.to(features.device), source.to(features.device)
    counts = member.sum(1, keepdim=True).to(features.dtype)  # (k, 1)
    tokens = (member.to(features.dtype) @ features) / counts  # (k, D)
    order = torch.argsort(source)
    return tokens[order], source[order]


def pooling_mix(rows: int, cols: int, k: int) -> torch.Tensor:
    """``(k, rows * cols)`` what each token of :func:`pool_grid_to` is made of: ``1/n`` on each of its bin's ``n`` tokens."""
    if k == rows * cols:
        return torch.eye(k)
    member, source = grid_bins(rows, cols, k)  # (k, n), (k,)
    weights = member.float() / member.sum(1, keepdim=True)  # (k, n)
    return weights[torch.argsort(source)]


def split_budget(sizes: Sequence[int], k: int) -> list[int]:
    """Split ``k`` over groups proportionally to ``sizes`` (largest remainder), never above a group's size.

    Args:
        sizes: group sizes (e.g. tokens of each grid of a LLaVA-NeXT image).
        k: total to split, ``0 <= k <= sum(sizes)``.

    Returns:
        One share per group, summing to ``k``.
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot split {k} over groups of {total} in all")
    exact = [k * s / total for s in sizes]
    shares = [int(math.floor(e)) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:k - sum(shares)]:
        shares[i] += 1
    return shares
