"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): one merged-patch grid per image, of any size.

The vision tower cuts an image into 14 px patches on a ``(t, h, w)`` grid
(``image_grid_thw``) and its merger fuses ``merge x merge`` neighbours (2x2) into one
visual token, so an image becomes ``t * (h / merge) * (w / merge)`` tokens in row-major
order; images are single frames (``t == 1``). The token grid therefore follows the image's
size and aspect: the region's 8x8 grid is mapped onto whatever ``rows x cols`` it gets.

Positions are 3-D (M-RoPE: temporal, height, width). ILP needs nothing from here: its hooks
gather the cos/sin the model computed, so kept tokens keep their original 3-D positions. PLC
changes the number of placeholders, so the model can no longer derive positions itself
(``get_rope_index`` expects ``t*h*w/merge**2`` placeholders per image): we compute the
original ``(3, B, L)`` positions once with the model's own ``get_rope_index`` and pass
explicit ``(3, B, L')`` ``position_ids`` in which every kept or pooled token takes the
position of its first source token and text keeps its original positions (Qwen places the
text after an image at ``start + max(rows, cols)``, not ``start + count``, so shrinking the
image leaves them valid). ``generate`` then extends them by one per step on all three axes,
which is what the model would do for generated text.

Only what ``get_image_features`` returns is touched, so the vision tower (Qwen2.5-VL's
windowed attention included) runs exactly as stock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, cast

import torch
from torch import nn

from crop.models.base import (
    ADAPTERS,
    CompressedImage,
    ImageSpan,
    MultimodalModel,
    VisionSaliency,
    VLMAdapter,
    image_encoder_outputs,
    module_list,
)
from crop.models.qwen_vision_attention import capture_received_attention
from crop.ops.sequences import find_runs


class QwenMultimodalModel(MultimodalModel, Protocol):
    """What the adapter calls on ``Qwen2VLModel`` / ``Qwen2_5_VLModel``: image features and M-RoPE positions."""

    def get_rope_index(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(position_ids (3, B, L), rope_deltas)`` for a prompt, as the model computes them itself."""
        ...


@ADAPTERS.register("qwen2_vl")
@ADAPTERS.register("qwen2_5_vl")
class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL: ``<|vision_start|>`` + one ``<|image_pad|>`` per merged token + ``<|vision_end|>``.

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
    """


    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.merge = int(self.config.vision_config.spatial_merge_size)

    def decoder_layers(self) -> nn.ModuleList:
        return module_list(self.model, "model.language_model.layers")

    def multimodal_model(self) -> QwenMultimodalModel:
        """The inner ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` (``model.model``), for its methods."""
        return cast(QwenMultimodalModel, self.model.get_submodule("model"))

    def _grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's merged token grid, from ``image_grid_thw``."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise ValueError("Qwen2-VL inputs need 'image_grid_thw' (the processor returns it with the pixels)")
        grids = []
        for t, h, w in thw.tolist():
            if t != 1:
                raise ValueError(f"an image with temporal grid t={t}: CROP handles still images (t == 1), not video")
            if h % self.merge or w % self.merge:
                raise ValueError(f"image grid {h}x{w} is not a multiple of the {self.merge}x{self.merge} merge")
            grids.append((h // self.merge, w // self.merge))
        return grids

    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's span; images are matched to ``image_grid_thw`` rows in prompt order.

        Raises:
            ValueError: if the placeholders do not match the image grids.
        """
        grids = iter(self._grids(inputs))
        spans = []
        for b, row in enumerate(inputs["input_ids"]):
            for start, length in find_runs(row, self.image_token_id):
                pos = start
                while pos < start + length:  # a run normally holds one image (vision_start/end separate them)
                    rows, cols = next(grids, (0, 0))
                    if rows * cols == 0 or pos + rows * cols > start + length:
                        raise ValueError(f"image placeholders in sample {b} do not match image_grid_thw")
                    spans.append(ImageSpan(b, pos, rows * cols, rows, cols))
                    pos += rows * cols
        if next(grids, None) is not None:
            raise ValueError("image_grid_thw lists more images than the prompts hold")
        return spans

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Vision tower + merger, unchanged: one ``(rows*cols, D)`` tensor per image."""
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"],
                                                         image_grid_thw=inputs["image_grid_thw"], return_dict=True)
        return list(out.pooler_output)  # each (rows*cols, D)

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + per image the saliency, keys and merger inputs of its merged tokens.

        Qwen's tower has no [CLS] token; the substitute is the attention each token receives
        in the last full-attention vision block (see :mod:`crop.models.qwen_vision_attention`).
        """
        features, saliency, keys, pre = capture_received_attention(
            self.model.get_submodule("model.visual"), inputs["image_grid_thw"], self.merge,
            lambda: self.encode_images(inputs))
        return [VisionSaliency(*row) for row in zip(features, saliency, keys, pre, strict=True)]

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        mlp = self.model.get_submodule("model.visual.merger.mlp")  # the merger after its per-patch norm
        return mlp(pre)  # (m, D)

    def original_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The ``(3, B, L)`` M-RoPE positions the model itself gives the uncompressed prompt."""
        ids = inputs["input_ids"]  # (B, L)
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).int()  # (B, L) 1 on image placeholders
        pos, _ = self.multimodal_model().get_rope_index(input_ids=ids, mm_token_type_ids=types,
                                                        image_grid_thw=inputs["image_grid_thw"],
                                                        attention_mask=inputs.get("attention_mask"))
        return pos  # (3, B, L)

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Rebuilt ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, explicit ``(3, B, L')``
        ``position_ids`` and ``mm_encoder_outputs`` for the compressed images.

        Returns:
            Keyword arguments for ``forward``/``generate`` (no pixels, no ``image_grid_thw``).
        """
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError("video inputs are not supported by CROP's Qwen2-VL adapter")
        batch = inputs["input_ids"].shape[0]
        per_sample: list[list[tuple[ImageSpan, CompressedImage]]] = [[] for _ in range(batch)]
        for span, image in zip(spans, images, strict=True):
            per_sample[span.sample].append((span, image))
        ids, mask, source, starts = self.resized_prompt(inputs, spans, images)
        old = self.original_positions(inputs)  # (3, B, L)
        src = source.to(old.device)  # (B, L')
        gathered = old.gather(2, src.clamp(min=0)[None].expand(3, -1, -1))  # (3, B, L') copies of old positions
        positions = torch.where(src[None] >= 0, gathered, torch.zeros_like(gathered))  # (3, B, L') new padding -> 0
        for b in range(batch):
            for (span, image), new_start in zip(per_sample[b], starts[b], strict=True):
                n = int(image.tokens.shape[0])
                origin = span.start + image.source.to(old.device)  # (n,) old prompt position of each token's source
                positions[:, b, new_start:new_start + n] = old[:, b, origin]  # (3, n)
        given = inputs.get("mm_token_type_ids")
        types = (ids == self.image_token_id).to(given.dtype if given is not None else torch.long)  # (B, L') 1 on images
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": types,
            "position_ids": positions,
            "mm_encoder_outputs": image_encoder_outputs([im.tokens for im in images]),
        }
