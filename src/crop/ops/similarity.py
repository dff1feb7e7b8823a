"""Similarity-based token selection and merging (VisionZip's contextual tokens, DART's de-duplication).

Pure tensor code on one image's tokens; no model knowledge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spread_indices(n: int, k: int) -> torch.Tensor:
    """``k`` indices spread evenly over ``range(n)`` (every ``n // k``-th, starting at 0).

    Returns:
        Sorted ``(min(k, n),)`` long tensor.
    """
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    step = max(n // k, 1)
    return torch.arange(0, n, step)[:k]


def merge_into_targets(features: torch.Tensor, keys: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every token into the target token it is most similar to (cosine of ``keys``).

    Each non-target token joins the target whose key is most similar to its own (ties: the
    lower target index); each output token is the mean of its target and the tokens that
    joined it, so a target that attracts nothing stays as it was.

    Args:
        features: ``(n, D)`` the tokens to merge.
        keys: ``(n, K)`` the vectors compared (VisionZip: the vision layer's keys).
        targets: ``(c,)`` distinct indices into ``range(n)`` of the merge targets.

    Returns:
        ``(merged, assignment)``: ``merged`` is ``(c, D)`` (target order); ``assignment`` is
        ``(n,)`` the position in ``targets`` each token was merged into (targets map to themselves).
    """
    n = features.shape[0]
    device = features.device
    targets = targets.to(device)
    unit = F.normalize(keys.float(), dim=-1)  # (n, K)
    similarity = unit @ unit[targets].T  # (n, c)
    assignment = similarity.argmax(dim=1)  # (n,) first maximum on ties
    assignment[targets] = torch.arange(targets.numel(), device=device)
    member = torch.zeros(targets.numel(), n, dtype=features.dtype, device=device)  # (c, n)
    member[assignment, torch.arange(n, device=device)] = 1
    merged = (member @ features) / member.sum(1, keepdim=True)  # (c, D)
    return merged, assignment


def duplication_select(hidden: torch.Tensor, keep: int, pivots: int,
                       pivot_scores: torch.Tensor | None = None) -> torch.Tensor:
    """DART's selection: a few pivot tokens, then per pivot the tokens least similar to it.

    Pivots are the ``pivots`` tokens with the highest ``pivot_scores`` (default: L1 norm of
    ``hidden``). The remaining ``keep - pivots`` slots are split as evenly as possible between
    the pivots (earlier pivots take the extra one); pivot by pivot, in decreasing score order,
    the not-yet-kept tokens with the lowest cosine similarity to that pivot are added. A token
    that duplicates a pivot (cosine 1) is therefore the last its pivot would keep.

    Args:
        hidden: ``(n, D)`` the tokens (e.g. hidden states entering the pruning layer).
        keep: tokens to keep; ``keep >= n`` keeps all.
        pivots: number of pivot tokens (clipped to ``[1, keep]``).
        pivot_scores: ``(n,)`` optional pivot ranking, higher first.

    Returns:
        Sorted ``(min(keep, n),)`` indices into ``range(n)``.
    """
    n = hidden.shape[0]
    device = hidden.device
    if keep >= n:
        return torch.arange(n, device=device)
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    pivots = max(1, min(pivots, keep))
    if pivot_scores is None:
        pivot_scores = hidden.float().abs().sum(-1)  # (n,) L1 norm
    order = torch.argsort(pivot_scores, descending=True, stable=True)
    pivot_idx = order[:pivots]  # (P,)
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    kept[pivot_idx] = True
    unit = F.normalize(hidden.float(), dim=-1)  # (n, D)
    similarity = unit @ unit[pivot_idx].T  # (n, P)
    rest = keep - pivots
    for p in range(pivots):
        quota = rest // pivots + (1 if p < rest % pivots else 0)
        if quota == 0:
            continue
        score = similarity[:, p].masked_fill(kept, float("inf"))  # (n,) kept tokens never chosen again
        chosen = torch.argsort(score, stable=True)[:quota]  # (quota,) least similar first
        kept[chosen] = True
    return kept.nonzero().squeeze(1)
