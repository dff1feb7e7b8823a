"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``): 256 pooled tokens per image, bidirectional inside.

What matters for pruning, and how each part is served:

- **Tokens.** SigLIP cuts the (896 px) square view into a 64x64 patch grid; the projector
  average-pools it 4x4 into a 16x16 grid, so every image is one plain grid of
  ``mm_tokens_per_image`` = 256 ``<image_soft_token>`` placeholders between ``<start_of_image>``
  and ``<end_of_image>`` (kept as text). The processor only resizes (no pad, no crop), so a box on
  the image is the same box on the view. Pan-and-scan crops are not supported (each crop would be
  one more 256-token run that the box does not map onto): keep ``do_pan_and_scan`` off.
- **Bidirectional attention among one image's tokens.** transformers builds it from
  ``token_type_ids`` (1 on image tokens): each run of consecutive image tokens is one block whose
  tokens see each other both ways. Inner-LLM pruning gathers each layer's own 4-D mask at the kept
  slots, so kept tokens of one image still attend to each other both ways and text still does not
  attend forward. Pre-LLM methods rebuild ``token_type_ids`` from the rebuilt ``input_ids`` (1 on
  the image placeholders), so an image's compressed run is again one bidirectional block.
- **Sliding-window layers.** Each layer gets its own mask (``layer_types``); the pruner gathers
  every pruned layer's own mask, so a sliding layer keeps its window **measured in original
  positions**: a kept token sees a kept key only if the unpruned model would have let it (the
  dropped tokens simply vanish from the window, which does not reach further back). Cached decoding
  then works as long as transformers hands the pruned layers masks over the whole sequence: the
  sequence fits in the window, and the first layer of each kind (on which transformers sizes that
  kind's decode mask) runs before the pruning layer K. Otherwise the pruner refuses the decode step
  in one line (the real checkpoints' first global layer is 5: with a padded batch, cached decoding after
  pruning at K <= 5 is refused, as tested on that layout; prefill and no-cache generation are unaffected).
- **FlashAttention** is refused (transformers refuses it for Gemma 3 too: it cannot take the image blocks).
- **Rotary tables per layer type** (local and global theta): the pruner gathers each layer's own
  tables at the kept slots (original positions); a renumbering pruner (PyramidDrop, SparseVLM) passes
  its renumbered positions through each layer's own function (:meth:`layer_rotary_embedding`).
- **Vision saliency** (VisionZip, HoloV): SigLIP has no [CLS] token. As for Qwen's towers, the
  substitute is the attention each patch *receives* from all patches in the last encoder layer
  (mean over queries, summed over heads), summed over the 4x4 patches each token pools; keys are
  head-averaged and averaged the same way; the pre-projector features are the pooled ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from crop.models.base import (
    ADAPTERS,
    CompressedImage,
    ImageSpan,
    VisionSaliency,
    VLMAdapter,
    image_encoder_outputs,
    module_list,
)
from crop.models.qwen_vision_attention import received_attention
from crop.ops.sequences import find_runs


def _packed_encoder_outputs(features: list[torch.Tensor]) -> dict[str, Any]:
    """``mm_encoder_outputs`` feeding the LM the per-image ``features`` (each ``(M_i, D)``), packed as Gemma 3 reads them.

    Gemma 3's forward reads ``pooler_output`` as one tensor (it calls ``.to`` on it) and scatters
    its rows into the placeholders in order, so images of different lengths go as one
    ``(1, sum M_i, D)`` row rather than a list.
    """
    outputs = image_encoder_outputs(features)
    outputs["image"].pooler_output = torch.cat(features, dim=0)[None]  # (1, sum M_i, D)
    return outputs


@ADAPTERS.register("gemma3")
class Gemma3Adapter(VLMAdapter):
    """Gemma 3: SigLIP patches -> 4x4 average pool -> norm + projection -> one placeholder per pooled token.

    Args:
        model: a ``Gemma3ForConditionalGeneration``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.uses_flash_attention:  # transformers refuses it too: FlashAttention cannot take the image blocks
            raise ValueError("Gemma 3 under FlashAttention loses the bidirectional attention among an image's tokens "
                             "(transformers refuses it for Gemma 3); load it with attn_implementation='sdpa' or 'eager'")
        vision = self.config.vision_config
        self.patch_side = int(vision.image_size) // int(vision.patch_size)  # 64 for the 896 px checkpoints
        tokens = int(self.config.mm_tokens_per_image)
        self.grid_side = int(round(tokens ** 0.5))  # 16
        if self.grid_side * self.grid_side != tokens or self.patch_side % self.grid_side:
            raise ValueError(f"Gemma 3 with {tokens} tokens per image over a {self.patch_side}x{self.patch_side} patch "
                             "grid: expected a square number of tokens that divides the patch grid")
        self.pool = self.patch_side // self.grid_side  # 4

    def decoder_layers(self) -> nn.ModuleList:
        return module_list(self.model, "model.language_model.layers")

    def rotary_embedding(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global (``full_attention``) layers' ``(cos, sin)`` for ``position_ids`` ``(B, L)``.

        Gemma 3 computes one table per layer type (local and global theta); sliding layers' tables
        come with each layer's own arguments, which the pruner gathers.
        """
        return self.model.get_submodule("model.language_model.rotary_emb")(hidden, position_ids, "full_attention")

    def layer_rotary_embedding(self, layer: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Layer ``layer``'s own rotary function: the tables of its layer type (local or global theta)."""
        layer_type = str(self.text_config.layer_types[layer])
        rotary = self.model.get_submodule("model.language_model.rotary_emb")
        return functools.partial(rotary, layer_type=layer_type)

    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """One ``16 x 16`` plain grid per image, in prompt order (consecutive images' runs are split every 256).

        Raises:
            ValueError: if a run of image placeholders is not a whole number of images.
        """
        spans = []
        tokens = self.grid_side * self.grid_side
        for b, row in enumerate(inputs["input_ids"]):
            for start, length in find_runs(row, self.image_token_id):
                if length % tokens:
                    raise ValueError(f"an image placeholder run of {length} tokens is not a multiple of {tokens}")
                for k in range(length // tokens):
                    spans.append(ImageSpan(b, start + k * tokens, tokens, self.grid_side, self.grid_side))
        return spans

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return list(out.pooler_output)  # each (256, D)

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + per image the received attention, keys and pooled features of its tokens.

        The last SigLIP encoder layer's attention input is recorded by a forward pre-hook (removed
        at once) and q/k recomputed with its own projections; the projector's pooled input is
        recorded at its norm. See the module docstring for the substitute for [CLS] attention.
        """
        tower = self.model.get_submodule("model.vision_tower")
        inner = "encoder.layers" if hasattr(tower, "encoder") else "vision_model.encoder.layers"  # older: wrapped
        layers = module_list(tower, inner)
        attn = layers[len(layers) - 1].get_submodule("self_attn")
        norm = self.model.get_submodule("model.multi_modal_projector.mm_soft_emb_norm")
        seen: dict[str, list[torch.Tensor]] = {"x": [], "pre": []}

        def attention_input(module, args, kwargs) -> None:
            seen["x"].append((args[0] if args else kwargs["hidden_states"]).detach())  # (B, N, E)

        hooks = [attn.register_forward_pre_hook(attention_input, with_kwargs=True),
                 norm.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0].detach()))]  # (B, 256, E)
        try:
            features = self.encode_images(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        if len(seen["x"]) != 1 or len(seen["pre"]) != 1:
            raise RuntimeError(f"the last vision layer ran {len(seen['x'])} times and the projector "
                               f"{len(seen['pre'])} times for one encode; expected once each")
        x = seen["x"][0]  # (B, N, E), N = patch_side ** 2
        heads, head_dim = int(cast(Any, attn).num_heads), int(cast(Any, attn).head_dim)
        q = attn.get_submodule("q_proj")(x).unflatten(-1, (heads, head_dim))  # (B, N, H, d)
        k = attn.get_submodule("k_proj")(x).unflatten(-1, (heads, head_dim))  # (B, N, H, d)
        scale = float(cast(Any, attn).scale)
        out = []
        for i, feats in enumerate(features):
            received = received_attention(q[i].float(), k[i].float(), scale)  # (N,)
            saliency = self._pool_patches(received[:, None], "sum")[:, 0]  # (256,)
            keys = self._pool_patches(k[i].float().mean(dim=1), "mean")  # (256, d)
            out.append(VisionSaliency(feats, saliency, keys, seen["pre"][0][i]))
        return out

    def _pool_patches(self, values: torch.Tensor, how: str) -> torch.Tensor:
        """``(N, C)`` per-patch values (row-major 64x64) -> ``(256, C)`` per token, summed or averaged over its 4x4."""
        side, pool, c = self.patch_side, self.pool, values.shape[-1]
        grid = values.reshape(side // pool, pool, side // pool, pool, c)  # (16, 4, 16, 4, C)
        reduced = grid.sum(dim=(1, 3)) if how == "sum" else grid.mean(dim=(1, 3))  # (16, 16, C)
        return reduced.reshape(-1, c)  # (256, C)

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        """Pooled SigLIP features ``(m, E)`` -> ``(m, D)``: the projector's norm and projection (its pool done)."""
        projector = self.model.get_submodule("model.multi_modal_projector")
        weight = cast(torch.Tensor, projector.mm_input_projection_weight)  # (E, D)
        return torch.matmul(projector.get_submodule("mm_soft_emb_norm")(pre), weight).type_as(pre)  # (m, D)

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Rebuilt ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``mm_encoder_outputs``.

        ``token_type_ids`` is 1 exactly on the rebuilt image placeholders, so each image's
        compressed run is one bidirectional block as its full run was; positions are compact (1-D
        RoPE, as LLaVA).
        """
        ids, mask, _, _ = self.resized_prompt(inputs, spans, images)
        given = inputs.get("token_type_ids")
        types = (ids == self.image_token_id).to(given.dtype if given is not None else torch.long)  # (B, L') 1 on images
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "mm_encoder_outputs": _packed_encoder_outputs([image.tokens for image in images]),
        }
