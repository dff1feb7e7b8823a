"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: attention each merged visual token *receives* in the vision tower.

Qwen's vision tower has no [CLS] token, so VisionZip's ranking signal does not exist there.
The substitute used here: in the last full-attention vision block, the attention every
patch receives from the image's patches (mean over queries, summed over heads: the
"globally attended" patches that [CLS] attention picks out in CLIP), summed over the
``merge x merge`` patches of each visual token; the keys (head-averaged) are averaged over the
same patches. The block's inputs are recorded by an instance-level forward pre-hook on its
attention module while the stock tower runs (removed at once); q/k are recomputed with the
block's own ``qkv`` projection and the model's ``apply_rotary_pos_emb_vision``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from crop.models.base import module_list

QUERY_CHUNK = 128
"""Queries per chunk when accumulating received attention (bounds memory at ``H * chunk * n``)."""


class WindowedVisionTower(Protocol):
    """What is read of a Qwen2.5-VL vision tower's window geometry (Qwen2-VL's tower has none)."""

    window_size: int
    patch_size: int


class VisionBlockAttention(Protocol):
    """What is read of a Qwen vision block's ``attn``: the fused projection and the head geometry."""

    qkv: nn.Module
    num_heads: int
    scaling: float


def saliency_block(visual: nn.Module) -> int:
    """Index of the vision block used: the last full-attention one (Qwen2.5-VL windows the others)."""
    full = getattr(visual, "fullatt_block_indexes", None)
    return int(full[-1]) if full else len(module_list(visual, "blocks")) - 1


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention each key receives from all queries, summed over heads.

    Args:
        q: ``(n, H, d)`` queries (after RoPE).
        k: ``(n, H, d)`` keys (after RoPE).
        scale: the softmax temperature (``head_dim ** -0.5``).

    Returns:
        ``(n,)`` received attention (sums to ``H`` over the keys).
    """
    n = q.shape[0]
    received = q.new_zeros(n)
    for start in range(0, n, QUERY_CHUNK):
        logits = torch.einsum("qhd,khd->hqk", q[start:start + QUERY_CHUNK], k) * scale  # (H, c, n)
        received += logits.softmax(dim=-1).sum(dim=(0, 1))  # (n,)
    return received / n


def to_token_order(values: torch.Tensor, visual: nn.Module, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Per-merged-token values in the tower's block order -> the LLM's token order.

    Qwen2.5-VL runs its blocks on tokens permuted into attention windows and its merger output
    is permuted back (``argsort(window_index)``); Qwen2-VL keeps the row-major order.

    Args:
        values: ``(V_all, C)`` one row per merged token of all images, in block order.
        visual: the vision tower.
        grid_thw: ``(images, 3)`` patch grids.
        merge: ``spatial_merge_size``.

    Returns:
        ``(V_all, C)`` in the order of the tower's ``pooler_output``.
    """
    if getattr(visual, "fullatt_block_indexes", None) is None:
        return values
    from transformers.vision_utils import get_vision_window_index

    windowed = cast(WindowedVisionTower, visual)  # fullatt_block_indexes: a Qwen2.5-VL tower, which has both
    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=windowed.window_size,
                                              patch_size=windowed.patch_size)
    return values[torch.argsort(window_index.to(values.device))]


def capture_received_attention(visual: nn.Module, grid_thw: torch.Tensor, merge: int,
                               run: Callable[[], Any]) -> tuple[Any, list[torch.Tensor], list[torch.Tensor],
                                                                list[torch.Tensor]]:
    """Run ``run()`` (the tower must run once) and return per image the merged tokens' scores, keys, merger inputs.

    Args:
        visual: the model's vision tower (``blocks``, optional ``fullatt_block_indexes``/``window_size``).
        grid_thw: ``(images, 3)`` the processor's patch grids.
        merge: ``spatial_merge_size``.
        run: what to run (the adapter's ``encode_images``).

    Returns:
        ``(result, scores, keys, pre)``: per image ``(V,)`` received attention, ``(V, d)`` keys
        and ``(V, merge*merge*E)`` normed merger inputs of its merged visual tokens (the merger's
        ``mlp`` maps them to the features), in the LLM's (row-major) token order.

    Raises:
        RuntimeError: if the block or the merger did not run exactly once.
    """
    block = module_list(visual, "blocks")[saliency_block(visual)]
    merger = visual.get_submodule("merger")
    seen: list[tuple[torch.Tensor, dict]] = []
    merger_in: list[torch.Tensor] = []
    hooks = [
        block.get_submodule("attn").register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"], kwargs)),
            with_kwargs=True),
        merger.register_forward_pre_hook(lambda m, args: merger_in.append(args[0].detach())),  # (S, E)
    ]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    if len(seen) != 1 or len(merger_in) != 1:
        raise RuntimeError(f"the vision block ran {len(seen)} times and the merger {len(merger_in)} times during "
                           "one encode; expected once each")
    hidden, kwargs = seen[0]
    attn = cast(VisionBlockAttention, block.get_submodule("attn"))
    with torch.no_grad():
        seq = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d) each
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # (S, H, d) each
        q, k = q.float(), k.float()
        bounds = kwargs["cu_seqlens"].tolist()
        scores = torch.cat([received_attention(q[s:e], k[s:e], float(attn.scaling))
                            for s, e in zip(bounds[:-1], bounds[1:], strict=True)])  # (S,) patches, tower order
        keys = k.mean(dim=1)  # (S, d)
    unit = merge * merge  # consecutive patches of one merged token (the merger's own grouping)
    merged_scores = scores.view(-1, unit).sum(dim=1)  # (S / unit,)
    merged_keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)  # (S / unit, d)
    merged_scores = to_token_order(merged_scores[:, None], visual, grid_thw, merge)[:, 0]  # (V_all,)
    merged_keys = to_token_order(merged_keys, visual, grid_thw, merge)  # (V_all, d)
    with torch.no_grad():
        norm = merger.get_submodule("ln_q" if hasattr(merger, "ln_q") else "norm")  # Qwen2/2.5-VL: ln_q; Qwen3-VL: norm
        pre = norm(merger_in[0])  # (S, E) the merger's per-patch norm
    pre = to_token_order(pre.reshape(merged_scores.shape[0], -1), visual, grid_thw, merge)  # (V_all, unit*E)
    counts = [int(t * h * w) // unit for t, h, w in grid_thw.tolist()]
    return result, list(merged_scores.split(counts)), list(merged_keys.split(counts)), list(pre.split(counts))
