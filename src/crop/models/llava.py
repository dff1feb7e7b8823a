"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): one square token grid per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
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
from crop.models.clip_attention import capture_cls_attention, clip_feature_layer
from crop.ops.sequences import find_runs
from crop.regions import GridBox


def _size_field(size: Any, name: str) -> int | None:
    """A field of a processor's ``size``/``crop_size`` (a ``SizeDict`` or a plain dict)."""
    value = size.get(name) if isinstance(size, Mapping) else getattr(size, name, None)
    return int(value) if value else None


def llava_view_transform(image_size: tuple[int, int], image_processor: Any) -> tuple[float, float, float, float, int, int]:
    """Where original pixels land in the square a LLaVA-1.5 image processor produces.

    The processor optionally pads to a square (centred), resizes (shortest edge, or to a fixed
    height/width), then optionally centre-crops, so original ``(x, y)`` maps to
    ``(x * sx + ox, y * sy + oy)`` in a ``view_w x view_h`` image.

    Args:
        image_size: the original ``(width, height)``.
        image_processor: a LLaVA image processor (``do_pad``, ``size``, ``do_center_crop``, ``crop_size``).

    Returns:
        ``(sx, sy, ox, oy, view_w, view_h)``.
    """
    w, h = image_size
    ox = oy = 0.0
    if getattr(image_processor, "do_pad", False) and w != h:  # pad_to_square, the image centred
        side = max(w, h)
        ox, oy = (side - w) // 2, (side - h) // 2
        w = h = side
    sx = sy = 1.0
    if getattr(image_processor, "do_resize", True):
        size = image_processor.size
        short = _size_field(size, "shortest_edge")
        if short:  # shortest edge -> ``short``, the other edge scaled and truncated
            new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        else:
            new_w, new_h = _size_field(size, "width") or w, _size_field(size, "height") or h
        sx, sy = new_w / w, new_h / h
        ox, oy, w, h = ox * sx, oy * sy, new_w, new_h
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        cw, ch = _size_field(crop, "width") or w, _size_field(crop, "height") or h
        ox, oy, w, h = ox - (w - cw) // 2, oy - (h - ch) // 2, cw, ch
    return sx, sy, ox, oy, w, h


@ADAPTERS.register("llava")
class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: CLIP patches (CLS dropped) -> projector -> one ``<image>`` placeholder per token.

    The token grid is ``image_size / patch_size`` on each side (24x24 = 576 for the 336 px
    checkpoints); LM positions are 1-D, so compressed prompts simply get compact positions.
    """


    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"LLaVA vision_feature_select_strategy {strategy!r} is not supported; only 'default' "
                             "(CLS token dropped, a square grid of patch tokens)")
        vision = self.config.vision_config
        self.grid_side = int(vision.image_size) // int(vision.patch_size)

    def decoder_layers(self) -> nn.ModuleList:
        return module_list(self.model, "model.language_model.layers")

    def view_box(self, box: GridBox, image_size: tuple[int, int], image_processor: Any) -> GridBox | None:
        """The box on the square LLaVA-1.5 sees: padding shifts it, a centre crop can cut it."""
        if image_processor is None:
            return box
        w, h = image_size
        sx, sy, ox, oy, view_w, view_h = llava_view_transform(image_size, image_processor)
        left, top, right, bottom = box.fractions()
        x0, x1 = max(left * w * sx + ox, 0.0), min(right * w * sx + ox, float(view_w))
        y0, y1 = max(top * h * sy + oy, 0.0), min(bottom * h * sy + oy, float(view_h))
        x0, y0, x1, y1 = (round(v, 6) for v in (x0, y0, x1, y1))  # 0.75 * 300 * 1.12 must be 252, not 252.0000001
        if x1 <= x0 or y1 <= y0:
            return None
        return GridBox.from_pixels((x0, y0, x1, y1), view_w, view_h, box.grid)

    def view_image(self, image: Image.Image, image_processor: Any) -> Image.Image:
        """The padded (grey) and/or centre-cropped square the processor makes of ``image``."""
        if image_processor is None:
            return image
        sx, sy, ox, oy, view_w, view_h = llava_view_transform(image.size, image_processor)
        w, h = image.size
        view = Image.new("RGB", (view_w, view_h), (127, 127, 127))
        resized = image.convert("RGB").resize((max(1, round(w * sx)), max(1, round(h * sy))))
        view.paste(resized, (round(ox), round(oy)))  # negative offsets crop
        return view

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
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return list(out.pooler_output)  # each (rows*cols, D)

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + each image's [CLS] attention, keys and [CLS] features at ``vision_feature_layer``.

        ``cls_pre_projector`` is filled: LM positions are 1-D and an image is one plain grid, so
        VisionZip may pass the [CLS] token on and lay the tokens out as the official code does.
        """
        layer = clip_feature_layer(self.model.get_submodule("model.vision_tower"), self.config.vision_feature_layer)
        projector = self.model.get_submodule("model.multi_modal_projector")
        features, attention, keys, pre, cls = capture_cls_attention(layer, projector,
                                                                    lambda: self.encode_images(inputs))
        return [VisionSaliency(*row) for row in zip(features, attention, keys, pre, cls, strict=True)]

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        return self.model.get_submodule("model.multi_modal_projector")(pre)  # (m, D)

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        ids, mask, _, _ = self.resized_prompt(inputs, spans, images)
        features = [image.tokens for image in images]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_encoder_outputs": image_encoder_outputs(features),
        }
