"""Uniform pooling baseline: average-pool each image's token grid to the budget, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, PreLLMMethod
from crop.models.base import ImageSpan
from crop.ops.grid_pool import pool_grid_to, pooling_mix, split_budget


@dataclass
class PoolConfig(ConfigMixin):
    """Config of the uniform-pooling baseline.

    Args:
        keep_tokens: visual tokens per image that reach the LLM; ``None`` keeps every token.

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    method_name: ClassVar[str] = "pool"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)


@METHODS.register("pool")
class UniformPool(PreLLMMethod):
    """Uniform pooling: average-pool each image's token grid to exactly keep_tokens tokens, before the LLM.

    The budget-matched "just make the image coarser" baseline (as used for comparison in the
    token-pruning literature, e.g. the pooling baselines of LLaVA-PruMerge / VisionZip).
    Stage: before the LLM. The pooled grid is the factorisation ``r' x c' == keep_tokens``
    closest to the grid's aspect (64 on 24x24 -> 8x8 of 3x3 bins), or near-square ragged bands
    when no such factorisation exists (:func:`crop.ops.grid_pool.pool_grid_to`); every pooled
    token takes the position of its bin's centre token. Multi-grid images (LLaVA-NeXT) split
    the budget over base view and high-resolution grid in proportion to their token counts,
    each pooled on its own; a high-res row keeps its newline iff it holds a bin centre.
    Config: :class:`PoolConfig`.
    """

    name = "pool"
    config_class = PoolConfig
    config: PoolConfig


    def compress_image(self, features, span, box, image_index):
        budget = self.config.keep_tokens
        if budget is None or budget >= span.visual_tokens:
            return keep_all(span, features)
        grids = span.token_grids
        shares = split_budget([g.rows * g.cols for g in grids], budget)
        tokens, sources = [], []
        for grid, share in zip(grids, shares, strict=True):
            if share == 0:
                continue
            where = grid.positions().to(features.device)  # (rows*cols,) span positions
            pooled, local = pool_grid_to(features[where], grid.rows, grid.cols, share)  # (share, D), (share,)
            tokens.append(pooled)
            sources.append(where[local])
        image = compose(span, features, torch.cat(tokens), torch.cat(sources),
                        mixing=partial(_pool_mixing, span, shares))
        return image, []


def _pool_mixing(span: ImageSpan, shares: list[int]) -> torch.Tensor:
    """``(budget, span.length)`` what each pooled token is made of: ``1/n`` on its bin's ``n`` tokens."""
    parts = []
    for grid, share in zip(span.token_grids, shares, strict=True):
        if share == 0:
            continue
        weights = torch.zeros(share, span.length)
        weights[:, grid.positions()] = pooling_mix(grid.rows, grid.cols, share)  # (share, rows*cols)
        parts.append(weights)
    return torch.cat(parts)
