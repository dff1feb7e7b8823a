"""Pre-LLM compression (PLC, CROP paper section 3), training-free variant.

Before the LLM, each image's visual tokens inside the region stay at full resolution and the
rest are average-pooled in ``pool x pool`` blocks (global context at low cost). The prompt's
placeholders are rebuilt to the new count; the adapter rebuilds positions where the model
needs them. With ``keep_tokens`` the *total* reaching the LLM (region + pooled) equals the
budget: the region share is grown or trimmed (see :mod:`crop.ops.selection`) until it fits.
The paper's trained PLC (learnable queries) is :mod:`crop.methods.plc_trained` (``crop-plc-trained``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from crop.config import CropPLCConfig
from crop.methods.base import METHODS, PreLLMMethod
from crop.models.base import CompressedImage, ImageSpan
from crop.ops.pooling import count_pooled, pool_outside, pooling_weights
from crop.regions import GridBox


def _count_pooled(span: ImageSpan, keep: torch.Tensor, pool: int) -> int:
    """Pooled tokens :func:`pool_image` adds for ``keep`` (span positions), over all the span's grids."""
    if not span.grids:
        return count_pooled(span.rows, span.cols, keep, pool)
    return sum(count_pooled(g.rows, g.cols, g.local(keep), pool) for g in span.grids)


def pool_image(span: ImageSpan, features: torch.Tensor, keep: torch.Tensor, pool: int) -> CompressedImage:
    """One image's kept tokens + pooled rest (each grid pooled on its own) + its structure tokens.

    Args:
        span: the image's span.
        features: ``(span.length, D)`` its features as the LLM would receive them.
        keep: ``(k,)`` span positions kept at full resolution.
        pool: pooling block side.

    Returns:
        The compressed image, tokens in span order of their first source token.
    """
    device = features.device
    mixing = partial(_pool_mixing, span, keep, pool, device)
    if not span.grids:
        tokens, source = pool_outside(features, span.rows, span.cols, keep.to(device), pool)
        return CompressedImage(tokens, source, mixing=mixing)
    token_parts, sources = [], []
    for grid in span.grids:
        where = grid.positions().to(device)  # (rows*cols,) span positions
        grid_tokens, grid_source = pool_outside(features[where], grid.rows, grid.cols,
                                                grid.local(keep.cpu()).to(device), pool)
        token_parts.append(grid_tokens)  # (m_g, D)
        sources.append(where[grid_source])  # (m_g,)
    structure = span.structure_positions(torch.cat(sources).cpu()).to(device)  # (s,) e.g. newlines of live rows
    token_parts.append(features[structure])
    sources.append(structure)
    source = torch.cat(sources)  # (M,)
    order = torch.argsort(source)
    return CompressedImage(torch.cat(token_parts)[order], source[order], structure=int(structure.numel()),
                           mixing=mixing)


def _pool_mixing(span: ImageSpan, keep: torch.Tensor, pool: int, device: torch.device) -> torch.Tensor:
    """``(M, span.length)`` what each token of :func:`pool_image` is made of (see :attr:`CompressedImage.mixing`)."""
    if not span.grids:
        return pooling_weights(span.rows, span.cols, keep, pool).to(device)
    parts, sources = [], []
    for grid in span.grids:
        where = grid.positions()  # (rows*cols,) span positions
        local = pooling_weights(grid.rows, grid.cols, grid.local(keep.cpu()), pool)  # (m_g, rows*cols)
        weights = torch.zeros(local.shape[0], span.length)
        weights[:, where] = local
        parts.append(weights)  # (m_g, length)
        sources.append(where[(local > 0).float().argmax(1)])  # (m_g,) first member: each token's source
    structure = span.structure_positions(torch.cat(sources))  # (s,)
    parts.append(torch.eye(span.length)[structure])
    sources.append(structure)
    order = torch.argsort(torch.cat(sources))
    return torch.cat(parts)[order].to(device)  # (M, length)


def region_share(select: Callable[[ImageSpan, GridBox, int | None], torch.Tensor], span: ImageSpan, box: GridBox,
                 budget: int | None, pool: int) -> torch.Tensor:
    """Full-resolution token indices for one image so that kept + pooled == ``budget``.

    Args:
        select: maps (span, region, budget) to the region's tokens (:meth:`crop.models.base.VLMAdapter.select`).
        span: the image's token span.
        box: the region.
        budget: total tokens that may reach the LLM, or ``None`` for the region alone + pooling.
        pool: pooling block side.

    Returns:
        Sorted ``(k,)`` indices within the span.

    Raises:
        ValueError: if the budget is smaller than the pooled context alone can be.
    """
    if budget is None:
        return select(span, box, None)
    n = span.visual_tokens
    if budget >= n:
        return span.visual_positions()
    # Kept sets grow monotonically with their size and pooled counts only shrink, so raising
    # the region share by the remaining deficit never overshoots; it stops at the budget.
    share = max(budget - _count_pooled(span, torch.empty(0, dtype=torch.long), pool), 0)
    while True:
        keep = select(span, box, share) if share > 0 else torch.empty(0, dtype=torch.long)
        total = keep.numel() + _count_pooled(span, keep, pool)
        if total >= budget:
            break
        share += budget - total
    if total != budget:
        raise ValueError(f"PLC cannot meet keep_tokens={budget} with {pool}x{pool} pooling on a "
                         f"{' + '.join(f'{g.rows}x{g.cols}' for g in span.token_grids)} token grid "
                         "(the pooled context alone needs more); "
                         "raise keep_tokens or the pool size")
    return keep


@METHODS.register("crop-plc")
class CropPLC(PreLLMMethod):
    """CROP's pre-LLM compression (training-free): region at full resolution, the rest pooled.

    Paper: Contextual Region-Oriented Visual Token Pruning, EMNLP 2025 (arXiv 2505.21233),
    section 3 (PLC). Stage: before the LLM. The paper's PLC is trained (learnable queries with
    the region tokens as anchors); this variant replaces the learned compressor by average
    pooling, so it needs no training. Config: :class:`crop.config.CropPLCConfig` (``keep_tokens``
    counts region + pooled tokens).
    """

    name = "crop-plc"
    config_class = CropPLCConfig
    config: CropPLCConfig
    uses_region = True


    def compress_image(self, features, span, box, image_index):
        keep = region_share(self.adapter.select, span, box, self.config.keep_tokens, self.config.pool)
        return pool_image(span, features, keep, self.config.pool), keep.tolist()
