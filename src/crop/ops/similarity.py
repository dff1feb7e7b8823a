"""Similarity-based token selection and merging (VisionZip's contextual tokens, DART's de-duplication).

Pure tensor code on one image's tokens; no model knowledge.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def duplication_select(hidden: torch.Tensor, pivots: torch.Tensor, quotas: Sequence[int],
                       taken: torch.Tensor | None = None) -> torch.Tensor:
    """DART's de-duplication: pivot after pivot, the not-yet-kept tokens least similar to it.

    Pivots are visited in the given order; each keeps its quota of the tokens that are not
    kept yet and have the lowest cosine similarity to it (so later pivots never pick what
    earlier ones did). A token that duplicates a pivot (cosine 1) is the last it would keep.

    Args:
        hidden: ``(n, D)`` the candidate tokens (the vectors compared).
        pivots: ``(P, D)`` the pivot vectors, in visiting order (they need not be candidates).
        quotas: ``P`` counts: how many tokens each pivot keeps (clipped to what is left).
        taken: ``(n,)`` bool, candidates kept from the start and never picked (e.g. the
            pivots among them); default none.

    Returns:
        Sorted ``(k,)`` indices into ``range(n)``: the ``taken`` tokens and the picks.
    """
    n = hidden.shape[0]
    if len(quotas) != pivots.shape[0]:
        raise ValueError(f"one quota per pivot: got {len(quotas)} quotas for {pivots.shape[0]} pivots")
    kept = torch.zeros(n, dtype=torch.bool, device=hidden.device) if taken is None else taken.clone()
    tokens = hidden.float()  # (n, D)
    for p, quota in enumerate(quotas):
        quota = min(int(quota), int((~kept).sum()))
        if quota <= 0:
            continue
        similarity = F.cosine_similarity(tokens, pivots[p].float()[None], dim=-1)  # (n,) cosine to this pivot
        similarity = similarity.masked_fill(kept, float("inf"))  # kept tokens are never chosen again
        chosen = torch.argsort(similarity, stable=True)[:quota]  # (quota,) least similar first
        kept[chosen] = True
    return kept.nonzero().squeeze(1)
