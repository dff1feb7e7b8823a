"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes base view + tiles.

An image reaches the LLM as one placeholder run made of two token grids (what the model's
``pack_image_features`` builds):

1. the **base view**: the whole image squashed to one 336 px square, a plain ``24 x 24``
   grid (576 tokens);
2. the **high-resolution grid**: the image resized into the best ``image_grid_pinpoints``
   resolution, cut into 336 px tiles whose ``24 x 24`` grids are stitched into one
   ``(24 * tiles_high) x (24 * tiles_wide)`` grid, then *unpadded* back to the image's aspect
   ratio (``rows' x cols'``); each of its rows is followed by one ``image_newline`` token.

So a run holds ``576 + rows' * (cols' + 1)`` placeholders. Both grids cover the whole image,
so the region maps onto the base view *and* onto the high-resolution grid (every tile it
overlaps) through the same :meth:`GridBox.token_mask`.

Decisions (see also :class:`crop.models.base.TokenGrid`):

* **Newline tokens are structure, not visual tokens.** They hold a learned constant, no
  image content. ``keep_tokens``, ``visual_tokens_in`` and every ``visual_tokens_kept`` count
  visual tokens only, over base view + high-res grid (576 + rows' * cols', e.g. 2880 for a
  672x672 image, the number the LLaVA-NeXT paper quotes).
* **A row's newline goes with its row.** ILP keeps the newline of every high-res row that
  keeps at least one visual token and drops the others with their row; PLC emits the newline
  after every row that still contributes a token (full-resolution or the first source token
  of a pooled block). The LM thus always sees kept rows terminated as in training; with
  everything kept the prompt is exactly the stock one. The newlines kept are extra prompt
  tokens on top of ``keep_tokens`` (at most ``rows'``).
* **One budget over both grids.** ``keep_tokens`` is split between base view and high-res
  grid by the region itself: trimming, growing and filling act on both grids together
  (:func:`crop.ops.selection.select_tokens_multi`), so a region keeps its share of each view.
* **PLC** keeps the region's tokens of both grids at full resolution and average-pools the
  rest of each grid on its own (blocks never mix the two views), in the original order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from crop.models.base import (
    ADAPTERS,
    CompressedImage,
    ImageSpan,
    OverlayPanel,
    TokenGrid,
    VisionSaliency,
    VLMAdapter,
    image_encoder_outputs,
    module_list,
)
from crop.models.clip_attention import capture_cls_attention, clip_feature_layer
from crop.ops.sequences import find_runs


@ADAPTERS.register("llava_next")
class LlavaNextAdapter(VLMAdapter):
    """LLaVA-NeXT (LLaVA-1.6): CLIP tiles -> projector -> packed base view + unpadded tiles + newlines.

    Args:
        model: a ``LlavaNextForConditionalGeneration``.

    Raises:
        ValueError: for a ``vision_feature_select_strategy`` other than ``"default"``.
    """


    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"LLaVA-NeXT vision_feature_select_strategy {strategy!r} is not supported; only "
                             "'default' (CLS token dropped, square 24x24 grids per tile)")
        vision = self.config.vision_config
        self.tile_px = int(vision.image_size)
        self.side = self.tile_px // int(vision.patch_size)  # tokens per tile side (24)

    def decoder_layers(self) -> nn.ModuleList:
        return module_list(self.model, "model.language_model.layers")

    def grids_for(self, image_size: tuple[int, int]) -> tuple[TokenGrid, TokenGrid]:
        """The base-view and high-res grids of an image of ``(height, width)`` pixels.

        The tile layout and the unpadding are the model's own (``get_anyres_image_grid_shape``
        and ``unpad_image`` applied to an index grid), so the geometry cannot drift from it.

        Returns:
            ``(base, high_res)``; ``high_res`` has one newline after each row.
        """
        tiles_high, tiles_wide = get_anyres_image_grid_shape(list(image_size), self.config.image_grid_pinpoints,
                                                             self.tile_px)
        full = torch.zeros(1, tiles_high * self.side, tiles_wide * self.side)  # (1, H, W) only the shape matters
        rows, cols = unpad_image(full, torch.as_tensor(image_size)).shape[1:]
        base = TokenGrid(self.side, self.side, 0, self.side)
        return base, TokenGrid(int(rows), int(cols), self.side * self.side, int(cols) + 1)

    def overlay_panels(self, image, image_processor: Any, token_grid: tuple[int, int]) -> list[OverlayPanel]:
        """Two panels over the image at its own aspect ratio: the base view's grid, and the tiles' grid.

        Both grids cover the whole image (the base view squashes it to a square, so its cells are
        drawn stretched back to the image's shape). The high-res panel marks the tile boundaries
        where they fall after unpadding (``token_grid`` is the base view's and is not needed).
        """
        width, height = image.size
        base, high = self.grids_for((height, width))
        tiles_high, tiles_wide = get_anyres_image_grid_shape([height, width], self.config.image_grid_pinpoints,
                                                             self.tile_px)
        origin = ((tiles_high * self.side - high.rows) // 2, (tiles_wide * self.side - high.cols) // 2)  # cut padding
        picture = image.convert("RGB")
        return [OverlayPanel(f"base view ({base.rows}x{base.cols}, squashed)", picture, base),
                OverlayPanel(f"tiles ({tiles_high}x{tiles_wide}: {high.rows}x{high.cols})", picture, high,
                             tile=(self.side, self.side), tile_origin=(-origin[0], -origin[1]))]

    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's span (base view + high-res grid + newlines), matched to ``image_sizes`` in order.

        Raises:
            ValueError: if the placeholders do not match the images' packed lengths.
        """
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT inputs need 'image_sizes' (the processor returns it with the pixels)")
        layouts = iter([self.grids_for((int(h), int(w))) for h, w in sizes.tolist()])
        spans = []
        for b, row in enumerate(inputs["input_ids"]):
            for start, length in find_runs(row, self.image_token_id):
                pos = start
                while pos < start + length:  # adjacent images would share a run
                    layout = next(layouts, None)
                    if layout is None:
                        raise ValueError(f"more image placeholders in sample {b} than images in image_sizes")
                    base, high = layout
                    n = base.rows * base.cols + high.rows * high.stride
                    if pos + n > start + length:
                        raise ValueError(f"image placeholders in sample {b} do not match the packed length {n} "
                                         "of its image (base view + unpadded tiles + newlines)")
                    spans.append(ImageSpan(b, pos, n, base.rows, base.cols, grids=layout))
                    pos += n
        if next(layouts, None) is not None:
            raise ValueError("image_sizes lists more images than the prompts hold")
        return spans

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Vision tower + projector + packing, unchanged: one ``(span.length, D)`` tensor per image."""
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"],
                                                         image_sizes=inputs["image_sizes"], return_dict=True)
        return list(out.pooler_output)  # each (576 + rows' * (cols' + 1), D)

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + each image's [CLS] attention and keys at ``vision_feature_layer``.

        Every tile (base view first, then the high-res tiles) has its own [CLS] token; each
        tile's scores, keys and projector inputs are laid out like its features
        (:meth:`pack_tile_values`). ``cls_pre_projector`` stays ``None``: an image has one [CLS]
        per tile and its packed layout (grids, newlines) fixes the token order, so VisionZip keeps
        image order here.
        """
        layer = clip_feature_layer(self.model.get_submodule("model.vision_tower"), self.config.vision_feature_layer)
        projector = self.model.get_submodule("model.multi_modal_projector")
        features, attention, keys, pre, _ = capture_cls_attention(layer, projector,
                                                                  lambda: self.encode_images(inputs))
        d = keys.shape[-1]
        per_tile = torch.cat([attention[..., None], keys, pre.to(keys.dtype)], dim=-1)  # (tiles, side*side, 1+d+P)
        packed = self.pack_tile_values(per_tile, inputs["image_sizes"])  # per image (V, 1 + d + P)
        return [VisionSaliency(f, p[:, 0], p[:, 1:1 + d], p[:, 1 + d:].to(pre.dtype))
                for f, p in zip(features, packed, strict=True)]

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        return self.model.get_submodule("model.multi_modal_projector")(pre)  # (m, D)

    def pack_tile_values(self, per_tile: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Lay out per-tile, per-patch values as the images' visual tokens (newlines left out).

        Tiles are stitched and unpadded exactly as ``pack_image_features`` does with features
        (the model's own ``unpad_image``), base view first.

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
            tiles_high, tiles_wide = get_anyres_image_grid_shape([int(h), int(w)], self.config.image_grid_pinpoints,
                                                                 self.tile_px)
            n = 1 + tiles_high * tiles_wide
            tiles = per_tile[offset:offset + n]  # (n, side*side, C)
            offset += n
            stitched = tiles[1:].reshape(tiles_high, tiles_wide, self.side, self.side, -1)
            stitched = stitched.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (C, H, W) as the model packs
            high = unpad_image(stitched, torch.as_tensor([int(h), int(w)])).flatten(1).T  # (rows'*cols', C)
            out.append(torch.cat([tiles[0], high]))  # (V, C) base view, then the high-res grid
        if offset != per_tile.shape[0]:
            raise ValueError(f"the vision tower saw {per_tile.shape[0]} tiles but image_sizes implies {offset}")
        return out

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Prompts with each image run resized to its compressed length (newlines included).

        LM positions are 1-D, so rebuilt prompts get compact positions (as with LLaVA-1.5).

        Returns:
            ``input_ids``, ``attention_mask`` and ``mm_encoder_outputs`` (no pixels).
        """
        ids, mask, _, _ = self.resized_prompt(inputs, spans, images)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_encoder_outputs": image_encoder_outputs([im.tokens for im in images]),
        }
