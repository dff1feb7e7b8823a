"""A SigLIP vision layer's *received* attention and keys, captured without ``output_attentions``.

SigLIP towers (LLaVA-OneVision) have no [CLS] token, so VisionZip's ranking signal (the
attention [CLS] pays each patch) does not exist there. The substitute is the one the Qwen
adapters use (:mod:`crop.models.qwen_vision_attention`): in the vision layer whose output the
LLM receives, the attention each patch *receives* from all patches of its tile (mean over
queries, summed over heads), the patches every query looks at. Two instance-level forward hooks
record the layer's ``q_proj`` and ``k_proj`` outputs while the stock tower runs (SigLIP's
attention has no mask and no rotary embedding, so ``softmax(q k^T * scale)`` recomputed from them
is the layer's own attention), a third the projector's input; all are removed after the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import nn

from crop.models.qwen_vision_attention import received_attention


class SiglipSelfAttention(Protocol):
    """What is read of a SigLIP encoder layer's ``self_attn`` (``SiglipAttention`` in transformers)."""

    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    head_dim: int
    scale: float


def capture_received_attention(layer: nn.Module, projector: nn.Module, run: Callable[[], Any]
                               ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``run()`` while recording ``layer``'s received attention and keys per tile, and the projector's input.

    Args:
        layer: a SigLIP encoder layer (``self_attn.q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``).
        projector: the multimodal projector (its input: the selected patch features).
        run: what to run (the adapter's ``encode_images``); the layer and the projector must run once.

    Returns:
        ``(result, scores, keys, pre)``: ``run()``'s result; ``scores`` ``(T, N)`` the attention
        each patch of each tile receives, averaged over the tile's queries and summed over heads;
        ``keys`` ``(T, N, head_dim)`` the patches' keys averaged over heads; ``pre`` ``(T, N, P)``
        the projector's input. ``T`` is the tower's batch (tiles), ``N`` its patches per tile.

    Raises:
        RuntimeError: if the layer or the projector did not run exactly once.
    """
    attn = cast(SiglipSelfAttention, layer.get_submodule("self_attn"))
    seen: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "pre": []}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, out: seen["q"].append(out.detach())),  # (T, N, E)
        attn.k_proj.register_forward_hook(lambda m, i, out: seen["k"].append(out.detach())),  # (T, N, E)
        projector.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0].detach())),  # (T, N, P)
    ]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    if len(seen["q"]) != 1 or len(seen["k"]) != 1 or len(seen["pre"]) != 1:
        raise RuntimeError(f"the vision layer ran {len(seen['k'])} times and the projector {len(seen['pre'])} "
                           "times during one encode; expected once each")
    heads, dim = int(attn.num_heads), int(attn.head_dim)
    q = seen["q"][0].float()  # (T, N, E)
    k = seen["k"][0].float()  # (T, N, E)
    tiles, n, _ = k.shape
    q = q.view(tiles, n, heads, dim)  # (T, N, H, d)
    k = k.view(tiles, n, heads, dim)  # (T, N, H, d)
    scores = torch.stack([received_attention(q[t], k[t], float(attn.scale)) for t in range(tiles)])  # (T, N)
    return result, scores, k.mean(dim=2), seen["pre"][0]  # (T, N), (T, N, d), (T, N, P)
