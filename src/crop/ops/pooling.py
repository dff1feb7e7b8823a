"""Average pooling of the visual tokens outside a kept set, on the token grid.

PLC keeps the region at full resolution and summarises the rest of the image with coarse
tokens: the token grid is cut into ``pool x pool`` blocks and each block's tokens that are
*not* kept are averaged into one token. Blocks whose tokens are all kept vanish.
"""

from __future__ import annotations

import torch


def pool_outside(features: torch.Tensor, rows: int, cols: int, keep: torch.Tensor,
                 pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens at full resolution plus pooled tokens for the rest, in reading order.

    Args:
        features: ``(rows * cols, D)`` one image's visual tokens, row-major.
        rows, cols: the token grid.
        keep: ``(k,)`` indices of tokens kept as they are.
        pool: block side in tokens (``pool=1`` keeps everything).

    Returns:
        ``(tokens, source)``: ``tokens`` is ``(M, D)``; ``source`` is ``(M,)`` the row-major index
        of each output token's first source token, sorted ascending (the output order).
    """
    n, dim = features.shape
    if n != rows * cols:
        raise ValueError(f"{n} features do not fill a {rows}x{cols} token grid")
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    device = features.device
    kept_mask = torch.zeros(n, dtype=torch.bool, device=device)
    kept_mask[keep.to(device)] = True
    idx = torch.arange(n, device=device)
    block_cols = -(-cols // pool)
    block = (idx // cols // pool) * block_cols + (idx % cols) // pool  # (n,) block id of each token
    outside = (~kept_mask).nonzero().squeeze(1)  # (o,)
    n_blocks = (-(-rows // pool)) * block_cols
    sums = features.new_zeros(n_blocks, dim).index_add_(0, block[outside], features[outside])  # (nb, D)
    counts = torch.zeros(n_blocks, dtype=torch.long, device=device).index_add_(
        0, block[outside], torch.ones_like(outside))  # (nb,)
    first = torch.full((n_blocks,), n, dtype=torch.long, device=device).scatter_reduce_(
        0, block[outside], outside, reduce="amin")  # (nb,) first outside token of each block
    live = counts > 0
    pooled = sums[live] / counts[live, None].to(features.dtype)  # (p, D)
    kept_idx = kept_mask.nonzero().squeeze(1)  # (k,)
    source = torch.cat([kept_idx, first[live]])  # (k + p,)
    tokens = torch.cat([features[kept_idx], pooled])  # (k + p, D)
    order = torch.argsort(source)
    return tokens[order], source[order]


def pooling_weights(rows: int, cols: int, keep: torch.Tensor, pool: int) -> torch.Tensor:
    """What each token of :func:`pool_outside` is made of: ``(M, rows * cols)`` weights, rows in its output order.

    A kept token is one-hot on itself; a pooled token holds ``1/n`` on each of the ``n``
    not-kept tokens of its block (so ``weights @ features`` is ``pool_outside``'s tokens).

    Args:
        rows, cols: the token grid.
        keep: ``(k,)`` indices of tokens kept as they are.
        pool: block side in tokens.
    """
    n = rows * cols
    keep = keep.cpu()
    kept_mask = torch.zeros(n, dtype=torch.bool)
    kept_mask[keep] = True
    idx = torch.arange(n)
    block = (idx // cols // pool) * (-(-cols // pool)) + (idx % cols) // pool  # (n,) block id of each token
    blocks = block[~kept_mask].unique()  # (p,) live blocks, ascending
    member = (block[None, :] == blocks[:, None]) & ~kept_mask[None, :]  # (p, n) outside tokens of each live block
    pooled = member.float() / member.sum(1, keepdim=True)  # (p, n)
    kept_idx = kept_mask.nonzero().squeeze(1)  # (k,)
    first = torch.where(member, idx[None, :], n).min(1).values  # (p,) first outside token of each block
    source = torch.cat([kept_idx, first])  # (k + p,) as pool_outside orders them
    weights = torch.cat([torch.eye(n)[kept_idx], pooled])  # (k + p, n)
    return weights[torch.argsort(source)]


def count_pooled(rows: int, cols: int, keep: torch.Tensor, pool: int) -> int:
    """How many pooled tokens :func:`pool_outside` would add for this kept set (no features needed)."""
    idx = torch.arange(rows * cols)
    mask = torch.ones(rows * cols, dtype=torch.bool)
    mask[keep] = False
    block = (idx // cols // pool) * (-(-cols // pool)) + (idx % cols) // pool
    return int(block[mask].unique().numel())
