"""Adapter for Qwen3-VL (``Qwen3VLForConditionalGeneration``; the MoE variant shares its code path).

What Qwen3-VL keeps from Qwen2-VL (:mod:`crop.models.qwen2_vl`): one ``<|image_pad|>`` per
merged token between ``<|vision_start|>``/``<|vision_end|>``, one row-major merged grid per
image (16 px patches merged 2x2, so 32 px per token), M-RoPE positions from ``get_rope_index``
(text after an image at ``start + max(rows, cols)``), so the grid mapping and the rebuilt
positions of compressed prompts are Qwen2-VL's. Its rotary tables interleave the three axes
over the frequencies; kept tokens keep the tables the model computed, so nothing changes here.

What is new:

- **q/k norms**: every attention layer normalizes each head's query and key before RoPE; the
  default :meth:`~crop.models.base.VLMAdapter.attention_parts` passes them on, so recomputed
  attention is the model's.
- **DeepStack**: features from three vision blocks are added to the hidden states at the
  visual positions after LM layers 0-2. Before the LLM (PLC and the pre-LLM baselines), each
  token that reaches the LLM gets the DeepStack features of what it was made of, mixed as its
  own features were (:meth:`crop.models.base.CompressedImage.carry`): a kept token its own, a
  pooled token the mean over its block, a merged or compressed token the same weights over its
  members. The reason: DeepStack refines a token with finer features *of the same patches*; a
  summary token summarises the same patches, so it gets the same summary of their finer
  features, and a budget never changes what the model adds per patch. Inside the LLM, the
  :class:`crop.models.deepstack.DeepStackRelay` adds them to the kept tokens only.
- **The vision tower** has no windows and its merger's per-patch norm is ``norm``; VisionZip's
  saliency uses its last block, as for Qwen2-VL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from crop.models.base import ADAPTERS, CompressedImage, ImageSpan, SlotOrigin, module_list
from crop.models.deepstack import DeepStackRelay
from crop.models.qwen2_vl import Qwen2VLAdapter


@ADAPTERS.register("qwen3_vl")
@ADAPTERS.register("qwen3_vl_moe")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's token layout, plus DeepStack features that follow every kept, pooled or merged token.

    Args:
        model: a ``Qwen3VLForConditionalGeneration`` or ``Qwen3VLMoeForConditionalGeneration``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # the last encode's DeepStack features: (the pixel tensor they came from, per image per level (length, D))
        self._deepstack: tuple[torch.Tensor, list[list[torch.Tensor]]] | None = None

    @property
    def deepstack_levels(self) -> int:
        """How many DeepStack levels the model adds (after LM layers ``0 .. levels - 1``)."""
        return len(self.config.vision_config.deepstack_visual_indexes)

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Vision tower + merger, unchanged: one ``(rows*cols, D)`` tensor per image.

        The DeepStack features of the same run are kept for :meth:`compressed_inputs` (until it
        uses them), so PLC runs the tower once.
        """
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"],
                                                         image_grid_thw=inputs["image_grid_thw"], return_dict=True)
        per_image = [list(levels) for levels in zip(*out.deepstack_features, strict=True)]  # [image][level] (len, D)
        self._deepstack = (inputs["pixel_values"], per_image)
        return list(out.pooler_output)  # each (rows*cols, D)

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        merger = self.model.get_submodule("model.visual.merger")  # after its per-patch norm: fc1, GELU, fc2
        fc1, act, fc2 = (merger.get_submodule(n) for n in ("linear_fc1", "act_fn", "linear_fc2"))
        return fc2(act(fc1(pre)))  # (m, D)

    def release_encoded(self) -> None:
        self._deepstack = None

    def deepstack_features(self, inputs: Mapping[str, Any]) -> list[list[torch.Tensor]]:
        """Per image, per level, the ``(rows*cols, D)`` DeepStack features of ``inputs``' images.

        Those of the last :meth:`encode_images` when it encoded these very pixels (then
        forgotten), else from a new run of the tower.
        """
        kept, self._deepstack = self._deepstack, None
        if kept is not None and kept[0] is inputs["pixel_values"]:
            return kept[1]
        self.encode_images(inputs)
        assert self._deepstack is not None
        kept, self._deepstack = self._deepstack, None
        return kept[1]

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Qwen2-VL's rebuilt prompt, with each image's DeepStack features carried onto its compressed tokens."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        rebuilt = super().compressed_inputs(inputs, spans, images)
        levels = self.deepstack_features(inputs)  # [image][level] (length, D)
        carried = [[image.carry(level) for level in per_image]
                   for image, per_image in zip(images, levels, strict=True)]  # [image][level] (M, D)
        # HF annotates both fields as tensors but stores, and reads back, one tensor per image (per level)
        per_image: Any = [im.tokens for im in images]
        per_level: Any = [list(level) for level in zip(*carried, strict=True)]  # [level][image] (M, D)
        rebuilt["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=per_image, deepstack_features=per_level)}
        return rebuilt

    def layer_feature_relay(self, slot_origin: SlotOrigin) -> DeepStackRelay:
        """The :class:`~crop.models.deepstack.DeepStackRelay` for inner-LLM pruning on this model."""
        return DeepStackRelay(self.model.get_submodule("model.language_model"),
                              module_list(self.model, "model.language_model.layers"), self.deepstack_levels, slot_origin)
