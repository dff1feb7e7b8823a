"""Capturing a CLIP vision layer's [CLS] attention and keys without ``output_attentions``.

VisionZip ranks patches by the attention the [CLS] token pays them in the vision layer whose
output LLaVA uses (``vision_feature_layer``) and merges the rest by the similarity of that
layer's keys. Asking transformers for attentions would force the eager attention path, so
instead two instance-level forward hooks record the layer's ``q_proj`` output (its [CLS]
row only) and ``k_proj`` output while the stock vision tower runs, and the [CLS] attention row
``softmax(q_cls k^T / sqrt(d))`` is recomputed from them: the same numbers the layer's own
attention produced (CLIP's vision attention has no mask). A third hook records the layer's
output at the [CLS] token: the official VisionZip passes that token on to the projector and the
LLM. The hooks live only for one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import nn

from crop.models.base import module_list


class ClipSelfAttention(Protocol):
    """What is read of a CLIP encoder layer's ``self_attn`` (``CLIPAttention`` in transformers)."""

    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    head_dim: int
    scale: float


def clip_feature_layer(vision_tower: nn.Module, vision_feature_layer: Any) -> nn.Module:
    """The CLIP encoder layer whose output is ``hidden_states[vision_feature_layer]``.

    Args:
        vision_tower: the model's ``CLIPVisionModel`` (older layouts nest it in ``vision_model``).
        vision_feature_layer: the model config's value (LLaVA: ``-2``).

    Raises:
        ValueError: for multi-layer features or the embedding output (no attention there).
    """
    model: nn.Module = getattr(vision_tower, "vision_model", vision_tower)
    layers = module_list(model, "encoder.layers")
    if isinstance(vision_feature_layer, bool) or not isinstance(vision_feature_layer, int):
        raise ValueError(f"[CLS] attention needs a single vision_feature_layer, got {vision_feature_layer!r}")
    if vision_feature_layer == 0 or not -len(layers) <= vision_feature_layer <= len(layers):
        raise ValueError(f"vision_feature_layer={vision_feature_layer} is not the output of one of the "
                         f"{len(layers)} vision layers")
    # hidden_states = (embeddings, out_0, ..., out_{L-1}): index v >= 1 is layer v - 1, index -v is layer -v
    return layers[vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer - 1]


def capture_cls_attention(layer: nn.Module, projector: nn.Module, run: Callable[[], Any]
                          ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``run()`` while recording ``layer``'s [CLS] attention, keys and [CLS] output, and the projector's input.

    Args:
        layer: a CLIP encoder layer (``self_attn.q_proj``, ``k_proj``, ``num_heads``, ``head_dim``).
        projector: the multimodal projector (its input: the selected patch features).
        run: what to run (e.g. the adapter's ``encode_images``); each must run exactly once.

    Returns:
        ``(result, attention, keys, pre, cls)``: ``run()``'s result; ``attention`` is ``(B, N - 1)``
        the [CLS] token's attention to each patch, summed over heads (VisionZip's score);
        ``keys`` is ``(B, N - 1, head_dim)`` the patches' keys averaged over heads (VisionZip's
        metric); ``pre`` is ``(B, N - 1, P)`` the projector's input; ``cls`` is ``(B, P)`` the
        layer's output at the [CLS] token (``hidden_states[vision_feature_layer][:, 0]``, the
        row LLaVA's "default" feature selection drops before the projector). ``B`` is the vision
        tower's batch (images, or tiles for LLaVA-NeXT), ``N`` its tokens.

    Raises:
        RuntimeError: if the layer or the projector did not run exactly once.
    """
    attn = cast(ClipSelfAttention, layer.get_submodule("self_attn"))
    seen: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "pre": [], "cls": []}

    def layer_output(module, args, out) -> None:
        hidden = out[0] if isinstance(out, tuple) else out  # (B, N, P) (older transformers return a tuple)
        seen["cls"].append(hidden[:, 0].detach())  # (B, P)

    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, out: seen["q"].append(out[:, :1].detach())),  # (B, 1, E)
        attn.k_proj.register_forward_hook(lambda m, i, out: seen["k"].append(out.detach())),  # (B, N, E)
        layer.register_forward_hook(layer_output),
        projector.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0].detach())),  # (B, N-1, P)
    ]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    if len(seen["q"]) != 1 or len(seen["k"]) != 1 or len(seen["cls"]) != 1 or len(seen["pre"]) != 1:
        raise RuntimeError(f"the vision layer ran {len(seen['k'])} times and the projector {len(seen['pre'])} "
                           "times during one encode; expected once each")
    heads, dim = int(attn.num_heads), int(attn.head_dim)
    q = seen["q"][0].float()  # (B, 1, E)
    k = seen["k"][0].float()  # (B, N, E)
    batch, n, _ = k.shape
    q = q.view(batch, heads, dim)  # (B, H, d) the [CLS] query per head
    k = k.view(batch, n, heads, dim)  # (B, N, H, d)
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * float(attn.scale)  # (B, H, N)
    attention = logits.softmax(dim=-1)[:, :, 1:].sum(dim=1)  # (B, N-1) patches only, summed over heads
    keys = k.mean(dim=2)[:, 1:]  # (B, N-1, d)
    return result, attention, keys, seen["pre"][0], seen["cls"][0]
