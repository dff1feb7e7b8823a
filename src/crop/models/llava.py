"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): one square token grid per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from crop.models.base import ADAPTERS, CompressedImage, ImageSpan, VisionSaliency, VLMAdapter
from crop.models.clip_attention import capture_cls_attention, clip_feature_layer
from crop.ops.sequences import find_runs, resize_runs


@ADAPTERS.register("llava")
class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: CLIP patches (CLS dropped) -> projector -> one ``<image>`` placeholder per token.

    The token grid is ``image_size / patch_size`` on each side (24x24 = 576 for the 336 px
    checkpoints); LM positions are 1-D, so compressed prompts simply get compact positions.
    """

    model_types = ("llava",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"LLaVA vision_feature_select_strategy {strategy!r} is not supported; only 'default' "
                             "(CLS token dropped, a square grid of patch tokens)")
        vision = self.config.vision_config
        self.grid_side = int(vision.image_size) // int(vision.patch_size)

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        spans = []
        tokens = self.grid_side * self.grid_side
        for b, row in enumerate(inputs["input_ids"]):
            for start, length in find_runs(row, self.image_token_id):
                if length % tokens:
                    raise ValueError(f"an image placeholder run of {length} tokens is not a multiple of {tokens}")
                for k in range(length // tokens):  # adjacent images form one run
                    spans.append(ImageSpan(b, start + k * tokens, tokens, self.grid_side, self.grid_side))
        return spans

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return list(out.pooler_output)  # each (rows*cols, D)

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + each image's [CLS] attention and keys at ``vision_feature_layer``."""
        layer = clip_feature_layer(self.model.model.vision_tower, self.config.vision_feature_layer)
        features, attention, keys, pre = capture_cls_attention(layer, self.model.model.multi_modal_projector,
                                                                lambda: self.encode_images(inputs))
        return [VisionSaliency(*row) for row in zip(features, attention, keys, pre, strict=True)]

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(pre)  # (m, D)

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        batch = inputs["input_ids"].shape[0]
        runs: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
        lengths: list[list[int]] = [[] for _ in range(batch)]
        for span, image in zip(spans, images, strict=True):
            runs[span.sample].append((span.start, span.length))
            lengths[span.sample].append(int(image.tokens.shape[0]))
        ids, mask, _, _ = resize_runs(inputs["input_ids"], inputs.get("attention_mask"), runs, lengths,
                                      self.image_token_id, self.pad_token_id())
        features = [image.tokens for image in images]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)},
        }
