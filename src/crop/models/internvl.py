"""Adapter for InternVL3 / InternVL3.5 (``InternVLForConditionalGeneration``): dynamic tiles + thumbnail, pixel shuffle.

How an image reaches the LLM (transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches``,
then ``InternVLModel.get_image_features``):

1. The processor picks a ``cols x rows`` arrangement of 448 px tiles whose aspect ratio is
   closest to the image's (``min_patches <= cols * rows <= max_patches``), resizes the whole
   image to ``cols * 448 x rows * 448`` and cuts it into tiles, row-major; when there is more
   than one tile, a **thumbnail** (the whole image squashed to 448 x 448) follows them.
2. InternViT cuts each tile into 14 px patches (32 x 32) plus a [CLS] token; the [CLS] is
   dropped and the **pixel shuffle** (``downsample_ratio`` 0.5) folds every 2 x 2 block of
   patches into one token, so a tile becomes a 16 x 16 grid, 256 tokens, row-major.
3. The prompt holds ``<img>`` + one ``<IMG_CONTEXT>`` per token of every tile + ``</img>``;
   ``<img>``/``</img>`` are ordinary text tokens here (never pruned).

Token grids (decisions; see :class:`TiledTokenGrid`):

* **Tiles are stitched into one high-resolution grid.** The ``rows x cols`` tiles of an image
  form one ``(16 rows) x (16 cols)`` grid over the whole image (tile ``(i, j)``'s token
  ``(a, b)`` is grid cell ``(16 i + a, 16 j + b)``); its span positions stay the model's
  tile-major order. So the region maps onto every tile it overlaps with the same
  :meth:`GridBox.token_mask` as a plain grid, and pooling blocks (PLC) never straddle tiles
  (16 is a multiple of the pool sizes 2 and 4). Visual-token order (:class:`InternVLSpan`)
  is the prompt's, as for every adapter; only grid geometry reads the stitched order.
* **The thumbnail is a second, plain 16 x 16 grid** over the whole image (after the tiles,
  as in the prompt), like LLaVA-NeXT's base view. A single-tile image is just one plain grid.
* **One budget over both grids**: ``keep_tokens`` counts visual tokens over tiles + thumbnail
  and is split by the region itself (:func:`crop.ops.selection.select_tokens_multi`), so a
  region keeps its share of each view. There are no structure tokens.
* **Positions are 1-D** (a Qwen2/Qwen3 LM with plain RoPE): ILP keeps original positions by
  gathering the rotary tables; PLC's rebuilt prompts get compact positions (as LLaVA).

The tile arrangement is not in the processor's outputs (only the tile count is, through the
placeholder count). It is read from ``image_sizes`` (``(images, 2)`` height, width) when the
inputs carry it (:class:`InternVLImageOnlyProcessor` adds it), else inferred from the pixels:
of the arrangements with that tile count, the one whose stitched tiles, shrunk to the
thumbnail's size, are closest to the thumbnail (a constant image is ambiguous and gets the
first candidate, which then does not matter for its content).

Vision saliency (VisionZip, HoloV): InternViT has a [CLS] token; its attention over the
tile's patches in the last vision layer (the one whose output the projector reads), summed
over heads and over each token's 2 x 2 patches, is the token's score; keys are averaged over
heads and the 2 x 2 patches. ``cls_pre_projector`` stays ``None`` (one [CLS] per tile, and the
pixel-shuffled projector input has no [CLS] row), so those methods keep image order.
No registered method is refused: every one runs through the generic span/grid interface.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from crop.models.base import (
    ADAPTERS,
    CompressedImage,
    ImageSpan,
    OverlayPanel,
    TokenGrid,
    VisionSaliency,
    VLMAdapter,
    module_list,
)
from crop.ops.selection import select_tokens_multi
from crop.ops.sequences import find_runs
from crop.regions import GridBox

THUMBNAIL_COMPARE_SIDE = 56
"""Side (pixels) both the thumbnail and each candidate stitching are pooled to when inferring the tile layout."""


class VisionAttention(Protocol):
    """What is read of an InternViT layer's ``attention``: its q/k norms (identities unless ``use_qk_norm``) and heads."""

    q_norm: nn.Module
    k_norm: nn.Module
    num_heads: int
    head_dim: int
    scale: float


@dataclass(frozen=True)
class TiledTokenGrid(TokenGrid):
    """Tiles of ``tile x tile`` tokens stitched into one ``rows x cols`` grid over the whole image.

    The span holds the tiles one after the other (row-major over tiles), each row-major
    inside, so grid cell ``(r, c)`` sits at span position
    ``offset + ((r // tile) * tiles_wide + c // tile) * tile**2 + (r % tile) * tile + c % tile``.
    :meth:`positions` and :meth:`local` follow that map; there are no structure tokens.

    Attributes:
        tile: tokens per tile side (16 for InternVL's 448 px tiles after the pixel shuffle).
    """

    tile: int = 1

    @property
    def tiles_wide(self) -> int:
        return self.cols // self.tile

    def positions(self) -> torch.Tensor:
        """``(rows * cols,)`` span positions of the grid's cells, in the stitched grid's row-major order."""
        r = torch.arange(self.rows)[:, None]  # (rows, 1)
        c = torch.arange(self.cols)[None, :]  # (1, cols)
        t = self.tile
        tile_index = (r // t) * self.tiles_wide + c // t  # (rows, cols) which tile
        return (self.offset + tile_index * t * t + (r % t) * t + c % t).flatten()  # (rows*cols,)

    def local(self, positions: torch.Tensor) -> torch.Tensor:
        """Stitched row-major indices of those ``positions`` (span positions) that are cells of this grid."""
        rel = positions - self.offset  # (k,)
        rel = rel[(rel >= 0) & (rel < self.rows * self.cols)]
        t = self.tile
        tile_index, inside = rel // (t * t), rel % (t * t)  # (k',), (k',)
        r = (tile_index // self.tiles_wide) * t + inside // t  # (k',)
        c = (tile_index % self.tiles_wide) * t + inside % t  # (k',)
        return r * self.cols + c  # (k',)

    def row_structure(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class InternVLSpan(ImageSpan):
    """An InternVL image's span: its visual positions are listed in span (prompt) order.

    The stitched tile grid's row-major order is not the span's order (tiles are consecutive in
    the prompt), so :meth:`visual_positions` sorts the grids' positions: visual-token indexed
    tensors (saliency, kept sets, candidates of inner-LLM methods) then follow the prompt, as
    for every other adapter. Grid geometry is read through each grid's ``positions``/``local``.
    """

    def visual_positions(self) -> torch.Tensor:
        """``(visual_tokens,)`` span positions of the visual tokens, increasing (tiles, then the thumbnail)."""
        return super().visual_positions().sort().values


def tile_candidates(tiles: int) -> list[tuple[int, int]]:
    """Every ``(tiles_high, tiles_wide)`` with ``tiles_high * tiles_wide == tiles``, the processor's order (by width)."""
    return [(tiles // w, w) for w in range(1, tiles + 1) if tiles % w == 0]


def layout_from_size(image_size: tuple[int, int], tiles: int, tile_px: int) -> tuple[int, int]:
    """``(tiles_high, tiles_wide)`` the processor picks for an image of ``(height, width)`` given its tile count.

    The processor's choice among all allowed arrangements has ``tiles`` tiles, so it is also its
    choice among the arrangements of exactly that count (same aspect-ratio rule, same tie rule):
    ``get_optimal_tiled_canvas`` with ``min = max = tiles`` reproduces it without knowing the
    processor's ``min_patches``/``max_patches``.
    """
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    wide, high = get_optimal_tiled_canvas((int(image_size[0]), int(image_size[1])), (tile_px, tile_px), tiles, tiles)
    return int(high), int(wide)


def layout_from_pixels(pixels: torch.Tensor, tiles: int) -> tuple[int, int]:
    """``(tiles_high, tiles_wide)`` whose stitching of ``pixels[:tiles]`` looks most like the thumbnail ``pixels[tiles]``.

    Args:
        pixels: ``(tiles + 1, C, S, S)`` one image's tiles (row-major) then its thumbnail.
        tiles: how many tiles (without the thumbnail).
    """
    candidates = tile_candidates(tiles)
    if len(candidates) == 1:
        return candidates[0]
    side = THUMBNAIL_COMPARE_SIDE
    thumb = F.adaptive_avg_pool2d(pixels[tiles].float()[None], side)  # (1, C, side, side)
    channels, size = int(pixels.shape[1]), int(pixels.shape[-1])
    errors = []
    for high, wide in candidates:
        canvas = pixels[:tiles].float().view(high, wide, channels, size, size)  # (h, w, C, S, S)
        canvas = canvas.permute(2, 0, 3, 1, 4).reshape(1, channels, high * size, wide * size)  # (1, C, h*S, w*S)
        errors.append(float((F.adaptive_avg_pool2d(canvas, side) - thumb).pow(2).mean()))
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]


@ADAPTERS.register("internvl")
class InternVLAdapter(VLMAdapter):
    """InternVL3 / 3.5: InternViT tiles (+ thumbnail) -> pixel shuffle -> projector -> ``<IMG_CONTEXT>`` tokens.

    Args:
        model: an ``InternVLForConditionalGeneration``.

    Raises:
        ValueError: for a ``vision_feature_select_strategy`` other than ``"default"`` or a tile
            whose patch grid the pixel shuffle cannot fold evenly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(f"InternVL vision_feature_select_strategy {strategy!r} is not supported; only "
                             "'default' (the [CLS] token dropped before the pixel shuffle)")
        vision = self.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        self.tile_px = int(size[0] if isinstance(size, (list, tuple)) else size)
        patch_px = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.fold = round(1 / float(self.config.downsample_ratio))  # patches per token side (2)
        patches = self.tile_px // patch_px
        if patches % self.fold:
            raise ValueError(f"a {patches}x{patches} patch grid cannot be pixel-shuffled by {self.fold}")
        self.side = patches // self.fold  # tokens per tile side (16)

    @property
    def tile_tokens(self) -> int:
        return self.side * self.side

    def decoder_layers(self) -> nn.ModuleList:
        return module_list(self.model, "model.language_model.layers")

    # ---- layout -------------------------------------------------------------------------------------

    def grids(self, tiles_high: int, tiles_wide: int) -> tuple[TokenGrid, ...]:
        """The token grids of an image cut into ``tiles_high x tiles_wide`` tiles (``1 x 1``: no thumbnail).

        Returns:
            ``()`` for a single tile (one plain grid), else ``(stitched tiles, thumbnail)``.
        """
        if tiles_high * tiles_wide == 1:
            return ()
        s = self.side
        tiled = TiledTokenGrid(tiles_high * s, tiles_wide * s, tile=s)
        return tiled, TokenGrid(s, s, tiles_high * tiles_wide * s * s)

    def _layouts(self, inputs: Mapping[str, Any], counts: list[int]) -> list[tuple[int, int]]:
        """``(tiles_high, tiles_wide)`` per image, from ``image_sizes`` if given, else from the pixels."""
        sizes = inputs.get("image_sizes")
        if sizes is not None and len(sizes) != len(counts):
            raise ValueError(f"image_sizes lists {len(sizes)} images but the prompts hold {len(counts)}")
        pixels = inputs.get("pixel_values")
        out, first = [], 0
        for i, n in enumerate(counts):
            if n == 1:
                out.append((1, 1))
            elif sizes is not None:
                out.append(layout_from_size(tuple(sizes[i].tolist()), n - 1, self.tile_px))
            elif len(tile_candidates(n - 1)) == 1:
                out.append(tile_candidates(n - 1)[0])
            elif pixels is None:
                raise ValueError("InternVL inputs with several tiles per image need 'pixel_values' or "
                                 "'image_sizes' to know how the tiles are arranged")
            else:
                out.append(layout_from_pixels(pixels[first:first + n], n - 1))
            first += n
        if pixels is not None and first != pixels.shape[0]:
            raise ValueError(f"the prompts hold {first} tiles' placeholders but pixel_values has {pixels.shape[0]}")
        return out

    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's span: one ``<IMG_CONTEXT>`` run per image (``<img>``/``</img>`` separate them).

        Raises:
            ValueError: if a run is not a whole number of tiles, or the tile layout cannot be known.
        """
        runs = []
        for b, row in enumerate(inputs["input_ids"]):
            for start, length in find_runs(row, self.image_token_id):
                if length % self.tile_tokens:
                    raise ValueError(f"an image placeholder run of {length} tokens in sample {b} is not a "
                                     f"multiple of {self.tile_tokens} (tokens per tile)")
                runs.append((b, start, length))
        layouts = self._layouts(inputs, [length // self.tile_tokens for _, _, length in runs])
        spans: list[ImageSpan] = []
        for (b, start, length), (high, wide) in zip(runs, layouts, strict=True):
            grids = self.grids(high, wide)
            first = grids[0] if grids else TokenGrid(self.side, self.side)
            spans.append(InternVLSpan(b, start, length, first.rows, first.cols, grids=grids))
        return spans

    def select(self, span: ImageSpan, box: GridBox, budget: int | None, trim: str = "center") -> torch.Tensor:
        """The box's tokens on the stitched tiles and the thumbnail under one ``budget`` (sorted span positions)."""
        if not span.grids:
            return super().select(span, box, budget, trim)
        chosen = select_tokens_multi(box, [(g.rows, g.cols) for g in span.grids], budget, trim=trim)  # (k,)
        grid_order = torch.cat([g.positions() for g in span.grids])  # (V,) span positions, grid after grid
        return grid_order[chosen].sort().values  # (k,)

    def tile_layout(self, image_size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
        """``(tiles_high, tiles_wide)`` the image processor gives an image of ``(width, height)`` pixels."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        if image_processor is None or not getattr(image_processor, "crop_to_patches", False):
            return 1, 1
        lo, hi = int(image_processor.min_patches), int(image_processor.max_patches)
        if hi <= 1:
            return 1, 1
        width, height = image_size
        wide, high = get_optimal_tiled_canvas((height, width), (self.tile_px, self.tile_px), lo, hi)
        return int(high), int(wide)

    def overlay_panels(self, image: Image.Image, image_processor: Any,
                       token_grid: tuple[int, int]) -> list[OverlayPanel]:
        """The stitched tiles' grid (tile boundaries marked) and the thumbnail's, both over the whole image."""
        high, wide = self.tile_layout(image.size, image_processor)
        picture = image.convert("RGB")
        grids = self.grids(high, wide)
        if not grids:
            return [OverlayPanel(f"one tile ({self.side}x{self.side})", picture, TokenGrid(self.side, self.side))]
        tiled, thumb = grids
        return [OverlayPanel(f"tiles ({high}x{wide}: {tiled.rows}x{tiled.cols})", picture, tiled,
                             tile=(self.side, self.side)),
                OverlayPanel(f"thumbnail ({thumb.rows}x{thumb.cols}, squashed)", picture, thumb)]

    # ---- features -----------------------------------------------------------------------------------

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Vision tower + pixel shuffle + projector, unchanged: one ``(tiles * 256, D)`` tensor per image."""
        out = self.multimodal_model().get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        per_tile = out.pooler_output  # (tiles_total, 256, D)
        counts = [span.length for span in self.image_spans(inputs)]
        return list(per_tile.flatten(0, 1).split(counts))  # each (length, D), span order

    def _feature_layer(self) -> nn.Module:
        """The InternViT layer whose output the projector reads (``vision_feature_layer``)."""
        layers = module_list(self.model, "model.vision_tower.encoder.layer")
        index = self.config.vision_feature_layer
        if isinstance(index, bool) or not isinstance(index, int) or not -len(layers) <= index < 0:
            raise ValueError(f"vision saliency needs one negative vision_feature_layer, got {index!r}")
        return layers[index]

    def encode_images_with_saliency(self, inputs: Mapping[str, Any]) -> list[VisionSaliency]:
        """:meth:`encode_images` + each token's [CLS] attention, keys and projector input, in span order.

        The [CLS] query and the keys are recorded (after InternViT's optional q/k norms) by
        forward hooks on the feature layer's attention while the stock tower runs; the [CLS]
        attention row is recomputed from them (InternViT attention has no mask). Per token:
        the attention summed over heads and its ``2 x 2`` patches, the keys averaged over heads
        and patches; the projector's input is the pixel-shuffled token itself.
        """
        attn = cast(VisionAttention, self._feature_layer().get_submodule("attention"))
        projector = self.model.get_submodule("model.multi_modal_projector")
        seen: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "pre": []}
        hooks = [
            attn.q_norm.register_forward_hook(lambda m, i, out: seen["q"].append(out[:, :1].detach())),  # (T, 1, E)
            attn.k_norm.register_forward_hook(lambda m, i, out: seen["k"].append(out.detach())),  # (T, N, E)
            projector.register_forward_pre_hook(lambda m, args: seen["pre"].append(args[0].detach())),  # (T, 256, P)
        ]
        try:
            features = self.encode_images(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        if any(len(v) != 1 for v in seen.values()):
            raise RuntimeError("the vision feature layer or the projector did not run exactly once in one encode")
        heads, dim = int(attn.num_heads), int(attn.head_dim)
        q = seen["q"][0].float()  # (T, 1, E)
        k = seen["k"][0].float()  # (T, N, E) N = 1 + patches
        tiles, n, _ = k.shape
        q = q.view(tiles, heads, dim)  # (T, H, d)
        k = k.view(tiles, n, heads, dim)  # (T, N, H, d)
        logits = torch.einsum("thd,tnhd->thn", q, k) * float(attn.scale)  # (T, H, N)
        attention = logits.softmax(dim=-1)[:, :, 1:].sum(dim=1)  # (T, P) patches only, summed over heads
        keys = k[:, 1:].mean(dim=2)  # (T, P, d)
        per_token_attention = self._fold(attention[..., None])[..., 0]  # (T, 256) summed over 2x2 patches
        per_token_keys = self._fold(keys) / (self.fold * self.fold)  # (T, 256, d) averaged
        pre = seen["pre"][0]  # (T, 256, 4C)
        out, first = [], 0
        for span, feats in zip(self.image_spans(inputs), features, strict=True):
            n_tiles = span.length // self.tile_tokens
            order = span.visual_positions()  # (V,) span positions in visual order
            sal = per_token_attention[first:first + n_tiles].flatten(0, 1)[order]  # (V,)
            key = per_token_keys[first:first + n_tiles].flatten(0, 1)[order]  # (V, d)
            pro = pre[first:first + n_tiles].flatten(0, 1)[order]  # (V, 4C)
            out.append(VisionSaliency(feats, sal, key, pro))
            first += n_tiles
        return out

    def _fold(self, per_patch: torch.Tensor) -> torch.Tensor:
        """Sum ``(T, P, C)`` per-patch values (row-major ``p x p`` patches) over each token's ``fold x fold`` block.

        Returns:
            ``(T, side * side, C)`` in the tokens' row-major order (the pixel shuffle's).
        """
        tiles, patches, channels = per_patch.shape
        p, f = math.isqrt(patches), self.fold
        blocks = per_patch.view(tiles, self.side, f, self.side, f, channels)  # (T, r, f, c, f, C)
        assert p == self.side * f  # noqa: S101 (geometry fixed in __init__)
        return blocks.sum(dim=(2, 4)).reshape(tiles, self.side * self.side, channels)  # (T, 256, C)

    def project_features(self, pre: torch.Tensor) -> torch.Tensor:
        return self.model.get_submodule("model.multi_modal_projector")(pre)  # (m, D)

    # ---- rebuilt prompts ----------------------------------------------------------------------------

    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Prompts with each ``<IMG_CONTEXT>`` run resized to its image's compressed length (``<img>``/``</img>`` kept).

        InternVL scatters its image features as one flat sequence over the placeholders, so the
        compressed images go in as one ``(1, M_total, D)`` tensor, images in prompt order.

        Returns:
            ``input_ids``, ``attention_mask`` and ``mm_encoder_outputs`` (no pixels).
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        ids, mask, _, _ = self.resized_prompt(inputs, spans, images)
        flat = torch.cat([im.tokens for im in images])[None]  # (1, M_total, D)
        return {"input_ids": ids, "attention_mask": mask,
                "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=flat)}}


@functools.cache
def internvl_image_only_processor_class() -> type[Any]:
    """``InternVLProcessor`` without its video processor (whose module imports torchvision, never installed here).

    Returns:
        A subclass built with ``image_processor``, ``tokenizer``, ``image_seq_length`` and
        ``chat_template``; images are processed exactly as by the stock class. Hub checkpoints
        load into it through :func:`crop.models.processors.load_checkpoint_processor`.
    """
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class InternVLProcessorImageOnly(InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.convert_tokens_to_ids(self.start_image_token)
            self.end_image_token_id = tokenizer.convert_tokens_to_ids(self.end_image_token)
            self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            # the stock __call__ splits prompts into images and videos with this pattern
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    return InternVLProcessorImageOnly
