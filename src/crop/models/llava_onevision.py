"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): AnyRes-Max base view + tiles.

OneVision packs an image as LLaVA-NeXT does (:mod:`crop.models.llava_next`), with three
differences that matter for pruning:

1. **A SigLIP tower without [CLS]** on 384 px tiles of 14 px patches: ``27 x 27 = 729`` tokens
   per tile, ``vision_feature_select_strategy="full"`` (every patch is a token).
2. **More tiles** (stock pinpoints up to 6 x 6 tiles of 384 px).
3. **AnyRes-Max** (``vision_aspect_ratio="anyres_max_N"``): once stitched and unpadded, a
   high-resolution grid of more than about ``1.1**2 * N`` tiles' worth of tokens is bilinearly
   downsampled to ``rows' // r x cols' // r`` (``r = sqrt(rows' * cols' / (N * 729))``), so an
   image never costs much more than ``N`` tiles.

So one image's placeholder run is: the base view (the whole image squashed to one tile, a plain
``27 x 27`` grid), then the high-resolution grid (``rows' x cols'``, downsampled or not), each row
followed by one ``image_newline`` token.

Decisions:

* **Newlines are structure and go with their rows**, as for LLaVA-NeXT: not visual tokens, not
  counted in ``keep_tokens``; ILP keeps a row's newline iff the row keeps a visual token, PLC
  emits it after every row that still contributes a token.
* **One budget over both grids** (:func:`crop.ops.selection.select_tokens_multi`), as for LLaVA-NeXT.
* **AnyRes-Max downsampling is part of the geometry**: the downsampled grid still covers the
  whole (unpadded) image, so the region maps onto it like onto any grid; its tokens are what the
  LLM receives (bilinear mixes of tile tokens), and they are what is kept or pooled.
* **Saliency** (VisionZip, HoloV): SigLIP has no [CLS]; the substitute is the attention each
  patch receives in ``vision_feature_layer`` (:mod:`crop.models.siglip_attention`), packed like
  the features (stitched, unpadded and, if the image was downsampled, bilinearly downsampled
  the same way). For a downsampled grid, the projector inputs given to VisionZip are downsampled
  too; the projector being non-linear, their projection only approximates the LLM's token there.
* **One image per prompt.** OneVision's multi-image prompts give each image only its base view
  and one newline (``batch_num_images > 1``); such prompts, and videos, are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from crop.models.base import ADAPTERS, ImageSpan, OverlayPanel, TokenGrid, VisionSaliency, VLMAdapter
from crop.models.clip_attention import clip_feature_layer
from crop.models.llava_next import LlavaNextAdapter
from crop.models.siglip_attention import capture_received_attention

ANYRES_MAX = "anyres_max_"


def anyres_max_shape(rows: int, cols: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The high-resolution grid's shape after AnyRes-Max: ``(rows, cols)`` or its bilinear downsampling.

    The model's rule: with ``r = sqrt(rows * cols / (max_tiles * side**2))``, a grid with
    ``r > 1.1`` becomes ``floor(rows / r) x floor(cols / r)``.

    Args:
        rows, cols: the unpadded stitched grid.
        side: tokens per tile side (27).
        max_tiles: ``N`` of ``anyres_max_N``.
    """
    ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@ADAPTERS.register("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP tiles -> projector -> base view + unpadded (AnyRes-Max) tiles + newlines.

    Spans, region selection, PLC's rebuilt prompts and the projector are LLaVA-NeXT's
    (:class:`crop.models.llava_next.LlavaNextAdapter`); the geometry, encoding, saliency and overlay
    are OneVision's.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration``.

    Raises:
        ValueError: for a ``vision_feature_select_strategy`` other than ``"full"`` (SigLIP has no
            [CLS]: ``"default"`` would drop a patch) or a ``vision_aspect_ratio`` that is not ``anyres_max_N``.
    """

    def __init__(self, model: nn.Module) -> None:
        VLMAdapter.__init__(self, model)
        strategy = getattr(self.config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(f"LLaVA-OneVision vision_feature_select_strategy {strategy!r} is not supported; only "
                             "'full' (SigLIP has no [CLS] token: every patch is a visual token)")
        aspect = str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith(ANYRES_MAX) or not aspect[len(ANYRES_MAX):].isdigit():
            raise ValueError(f"LLaVA-OneVision vision_aspect_ratio {aspect!r} is not supported; use 'anyres_max_N'")
        self.max_tiles = int(aspect[len(ANYRES_MAX):])
        vision = self.config.vision_config
        self.tile_px = int(vision.image_size)
        self.side = self.tile_px // int(vision.patch_size)  # tokens per tile side (27)

    def tile_layout(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The tiles and the unpadded high-res grid (before AnyRes-Max) of an image of ``(height, width)`` pixels.

        Returns:
            ``(tiles_high, tiles_wide, rows, cols)``.
        """
        tiles_high, tiles_wide = get_anyres_image_grid_shape(list(image_size), self.config.image_grid_pinpoints,
                                                             self.tile_px)
        full = torch.zeros(1, tiles_high * self.side, tiles_wide * self.side)  # (1, H, W) only the shape matters
        rows, cols = unpad_image(full, list(image_size)).shape[1:]
        return int(tiles_high), int(tiles_wide), int(rows), int(cols)

    def grids_for(self, image_size: tuple[int, int]) -> tuple[TokenGrid, TokenGrid]:
        """The base-view and high-res grids of an image of ``(height, width)`` pixels (after AnyRes-Max).

        Tile layout and unpadding are the model's own functions; the downsampling follows its rule
        (:func:`anyres_max_shape`).

        Returns:
            ``(base, high_res)``; ``high_res`` has one newline after each row.
        """
        _, _, rows, cols = self.tile_layout(image_size)
        rows, cols = anyres_max_shape(rows, cols, self.side, self.max_tiles)
        base = TokenGrid(self.side, self.side, 0, self.side)
        return base, TokenGrid(rows, cols, self.side * self.side, cols + 1)

    def overlay_panels(self, image, image_processor: Any, token_grid: tuple[int, int]) -> list[OverlayPanel]:
        """Two panels over the image at its own aspect ratio: the base view's grid, and the high-res grid.

        The high-res panel marks the tile boundaries where they fall after unpadding; once AnyRes-Max
        has downsampled the grid, tile boundaries no longer fall on token boundaries and are not drawn.
        """
        width, height = image.size
        base, high = self.grids_for((height, width))
        tiles_high, tiles_wide, rows, cols = self.tile_layout((height, width))
        picture = image.convert("RGB")
        panels = [OverlayPanel(f"base view ({base.rows}x{base.cols}, squashed)", picture, base)]
        if (high.rows, high.cols) != (rows, cols):
            panels.append(OverlayPanel(f"tiles ({tiles_high}x{tiles_wide}: {rows}x{cols}, anyres_max_{self.max_tiles}"
                                       f" -> {high.rows}x{high.cols})", picture, high))
            return panels
        origin = ((tiles_high * self.side - rows) // 2, (tiles_wide * self.side - cols) // 2)  # cut padding
        panels.append(OverlayPanel(f"tiles ({tiles_high}x{tiles_wide}: {rows}x{cols})", picture, high,
                                   tile=(self.side, self.side), tile_origin=(-origin[0], -origin[1])))
        return panels

    @staticmethod
    def _check_single_images(inputs: Mapping[str, Any]) -> None:
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError("LLaVA-OneVision videos are not supported; give images")
        counts = inputs.get("batch_num_images")
        if counts is not None and any(int(n) > 1 for n in torch.as_tensor(counts).flatten().tolist()):
            raise ValueError("LLaVA-OneVision multi-image prompts (each image packed as its base view + one newline) "
                             "are not supported; give one image per prompt")

    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's span (base view + high-res grid + newlines), matched to ``image_sizes`` in order.

        Raises:
            ValueError: if the placeholders do not match the images' packed lengths, or for
                multi-image prompts or videos.
        """
        self._check_single_images(inputs)
        if inputs.get("image_sizes") is None:
            raise ValueError("LLaVA-OneVision inputs need 'image_sizes' (the processor returns it with the pixels)")
        return super().image_spans(inputs)

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Vision tower + projector + packing, unchanged: one ``(span.length, D)`` tensor per image."""
        self._check_single_images(inputs)
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"],
                                                         image_sizes=inputs["image_sizes"],
                                                         batch_num_images=inputs.get("batch_num_images"),
                                                         return_dict=True)
        return list(out.pooler_output)  # each (729 + rows' * (cols' + 1), D)

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + each visual token's received attention and keys at ``vision_feature_layer``.

        Scores, keys and projector inputs are computed per tile and laid out like the features
        (:meth:`pack_tile_values`). ``cls_pre_projector`` is ``None``: SigLIP has no [CLS].

        Raises:
            ValueError: if ``vision_feature_layer`` is not one layer's output.
        """
        layer = clip_feature_layer(self.model.get_submodule("model.vision_tower"), self.config.vision_feature_layer)
        projector = self.model.get_submodule("model.multi_modal_projector")
        features, scores, keys, pre = capture_received_attention(layer, projector, lambda: self.encode_images(inputs))
        d = keys.shape[-1]
        per_tile = torch.cat([scores[..., None], keys, pre.float()], dim=-1)  # (tiles, side*side, 1 + d + P)
        packed = self.pack_tile_values(per_tile, inputs["image_sizes"])  # per image (V, 1 + d + P)
        return [VisionSaliency(f, p[:, 0], p[:, 1:1 + d], p[:, 1 + d:].to(pre.dtype))
                for f, p in zip(features, packed, strict=True)]

    def pack_tile_values(self, per_tile: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Lay out per-tile, per-patch values as the images' visual tokens (newlines left out).

        Tiles are stitched and unpadded as the model packs features (its own ``unpad_image``), then
        bilinearly downsampled where AnyRes-Max downsamples the features; base view first.

        Args:
            per_tile: ``(tiles, side*side, C)`` values of every tile the vision tower saw, images
                one after the other (base view, then high-res tiles), patches row-major.
            image_sizes: ``(images, 2)`` the processor's ``(height, width)`` per image.

        Returns:
            Per image, ``(V, C)`` in :meth:`ImageSpan.visual_positions` order.

        Raises:
            ValueError: if the tile count does not match ``image_sizes``.
        """
        out, offset = [], 0
        for h, w in image_sizes.tolist():
            tiles_high, tiles_wide, rows, cols = self.tile_layout((int(h), int(w)))
            n = 1 + tiles_high * tiles_wide
            tiles = per_tile[offset:offset + n]  # (n, side*side, C)
            offset += n
            stitched = tiles[1:].reshape(tiles_high, tiles_wide, self.side, self.side, -1)
            stitched = stitched.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (C, H, W) as the model packs
            high = unpad_image(stitched, [int(h), int(w)])  # (C, rows, cols)
            small = anyres_max_shape(rows, cols, self.side, self.max_tiles)
            if small != (rows, cols):
                high = nn.functional.interpolate(high[None], list(small), mode="bilinear")[0]  # (C, rows'', cols'')
            out.append(torch.cat([tiles[0], high.flatten(1).T]))  # (V, C) base view, then the high-res grid
        if offset != per_tile.shape[0]:
            raise ValueError(f"the vision tower saw {per_tile.shape[0]} tiles but image_sizes implies {offset}")
        return out
