"""Analytic FLOPs and KV-cache sizes of decoder-only transformers, from their configs.

Counted: every matrix multiply (2 FLOPs per multiply-add) of the attention projections, the
MLP (gated, 3 matrices, as Llama/Qwen2) and the attention itself (QK^T and AV, causal: query
``i`` sees ``context_i`` keys). Ignored: norms, activations, softmax, RoPE (a few percent at
most). These numbers predict *ratios* between methods on the same model; they are not a
hardware model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderDims:
    """The sizes that decide a decoder's cost."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> DecoderDims:
        """From a Llama/Qwen2-style text config (``model.config.get_text_config()``)."""
        heads = int(text_config.num_attention_heads)
        hidden = int(text_config.hidden_size)
        head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
        return cls(hidden=hidden, intermediate=int(text_config.intermediate_size),
                   layers=int(text_config.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
                   head_dim=head_dim, vocab=int(text_config.vocab_size))

    @property
    def linear_flops_per_token(self) -> int:
        """FLOPs of one token through one layer's projections and MLP."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return 2 * (q_o + k_v + mlp)

    def attention_flops(self, queries: int, context_before: int) -> int:
        """QK^T + AV FLOPs for ``queries`` new tokens appended causally after ``context_before`` cached ones."""
        # query i (0-based) sees context_before + i + 1 keys
        keys = queries * context_before + queries * (queries + 1) // 2
        return 2 * 2 * self.heads * self.head_dim * keys


def prefill_flops(dims: DecoderDims, tokens_per_layer: Sequence[int], logits: int = 1) -> int:
    """FLOPs of a prefill where layer ``l`` processes ``tokens_per_layer[l]`` tokens (per sample).

    Args:
        dims: the decoder.
        tokens_per_layer: sequence length entering each layer (pruning shortens it).
        logits: positions whose logits are computed (``generate`` computes the last one only).
    """
    if len(tokens_per_layer) != dims.layers:
        raise ValueError(f"need {dims.layers} per-layer token counts, got {len(tokens_per_layer)}")
    total = sum(n * dims.linear_flops_per_token + dims.attention_flops(n, 0) for n in tokens_per_layer)
    return total + 2 * dims.hidden * dims.vocab * logits


def decode_flops(dims: DecoderDims, cache_per_layer: Sequence[int]) -> int:
    """FLOPs of one decode step with ``cache_per_layer[l]`` cached positions in layer ``l``."""
    total = sum(dims.linear_flops_per_token + dims.attention_flops(1, c) for c in cache_per_layer)
    return total + 2 * dims.hidden * dims.vocab


def kv_cache_bytes(dims: DecoderDims, cache_per_layer: Sequence[int], batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of keys + values for the given per-layer cache lengths."""
    return sum(cache_per_layer) * batch * 2 * dims.kv_heads * dims.head_dim * bytes_per_value


def vit_flops(tokens: int, hidden: int, intermediate: int, layers: int, patch_pixels: int,
              gated: bool = False) -> int:
    """FLOPs of a ViT encoder over ``tokens`` patches (patch embedding + ``layers`` blocks, full attention)."""
    embed = 2 * tokens * patch_pixels * hidden
    mlp = (3 if gated else 2) * hidden * intermediate
    per_layer = 2 * tokens * (4 * hidden * hidden + mlp) + 2 * 2 * tokens * tokens * hidden
    return embed + layers * per_layer


def _vision_sizes(vision_config) -> tuple[int, int, int]:
    """``(hidden, intermediate, layers)`` of a CLIP-style or Qwen2-VL-style vision config."""
    hidden = int(getattr(vision_config, "embed_dim", 0) or vision_config.hidden_size)  # Qwen2-VL: embed_dim
    inter = int(getattr(vision_config, "intermediate_size", 0) or hidden * getattr(vision_config, "mlp_ratio", 4))
    layers = int(getattr(vision_config, "num_hidden_layers", 0) or vision_config.depth)
    return hidden, inter, layers


def llava_vision_flops(config, visual: int) -> int:
    """FLOPs of a LLaVA vision tower (CLS + ``visual`` patches) and its 2-layer projector, per image.

    Args:
        config: the VLM's config (``vision_config`` + text config).
        visual: visual tokens the tower produces for the LLM (CLS excluded).
    """
    hidden, inter, layers = _vision_sizes(config.vision_config)
    patch = int(config.vision_config.patch_size)
    text_hidden = int(config.get_text_config().hidden_size)
    projector = 2 * visual * (hidden * text_hidden + text_hidden * text_hidden)
    return vit_flops(visual + 1, hidden, inter, layers, 3 * patch * patch) + projector


def qwen_vision_flops(config, visual: int) -> int:
    """FLOPs of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower and its merger(s) for an image of ``visual`` tokens.

    The tower runs on ``visual * merge**2`` patches; the merger (and Qwen3-VL's DeepStack
    mergers, one per level) maps each ``merge x merge`` group to one token with a 2-layer MLP.
    Attention is counted as full over the image's patches: Qwen2.5-VL's windowed blocks cost
    less, so its count is an upper bound.

    Args:
        config: the VLM's config (``vision_config`` with ``spatial_merge_size``).
        visual: the image's merged visual tokens.
    """
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    patches = visual * merge * merge
    hidden, inter, layers = _vision_sizes(vision)
    patch_pixels = 3 * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    gated = hasattr(vision, "fullatt_block_indexes")  # Qwen2.5-VL's blocks have a gated (SwiGLU) MLP
    out = int(getattr(vision, "out_hidden_size", 0) or vision.hidden_size)  # Qwen2-VL: hidden_size is the LM's
    group = merge * merge * hidden
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or [])
    return vit_flops(patches, hidden, inter, layers, patch_pixels, gated) + mergers * 2 * visual * (
        group * group + group * out)


def internvl_vision_flops(config, visual: int) -> int:
    """FLOPs of InternVL's vision side for an image of ``visual`` tokens: InternViT per 448 px tile, pixel shuffle, projector.

    Each tile is ``(tile / patch)**2`` patches + [CLS] through the tower; the pixel shuffle (a
    reshape, no FLOPs) folds ``1 / downsample_ratio`` squared patches into one token, and the
    projector maps it (``fold**2 * hidden`` wide) to the LM's width with two linear layers.

    Args:
        config: an ``InternVLConfig``.
        visual: the image's visual tokens (tiles and thumbnail, 256 per tile at 448 px / 14 px / 0.5).
    """
    vision = config.vision_config
    hidden, inter, layers = _vision_sizes(vision)
    tile_px, patch_px = (int(v[0] if isinstance(v, (list, tuple)) else v) for v in (vision.image_size, vision.patch_size))
    side = tile_px // patch_px  # patches per tile side (32)
    fold = round(1 / float(config.downsample_ratio))
    tiles = max(1, -(-visual // (side // fold) ** 2))
    text_hidden = int(config.get_text_config().hidden_size)
    tower = tiles * vit_flops(side * side + 1, hidden, inter, layers, 3 * patch_px * patch_px)
    projector = 2 * visual * (fold * fold * hidden * text_hidden + text_hidden * text_hidden)
    return tower + projector


def gemma3_vision_flops(config, visual: int) -> int:
    """FLOPs of Gemma 3's vision side for ``visual`` tokens: SigLIP over the square view, 4x4 average pool, projector.

    Each image (``mm_tokens_per_image`` tokens) is ``(image_size / patch_size)**2`` patches through
    the tower (no [CLS]); the pool adds each patch once; the projector is a norm and one linear
    map from the tower's width to the LM's.

    Args:
        config: a ``Gemma3Config``.
        visual: the image's visual tokens (256 per image).
    """
    vision = config.vision_config
    hidden, inter, layers = _vision_sizes(vision)
    patch = int(vision.patch_size)
    patches = (int(vision.image_size) // patch) ** 2  # 4096 at 896 px / 14 px
    images = max(1, -(-visual // int(config.mm_tokens_per_image)))
    text_hidden = int(config.get_text_config().hidden_size)
    tower = vit_flops(patches, hidden, inter, layers, 3 * patch * patch)
    return images * (tower + patches * hidden) + 2 * visual * hidden * text_hidden


def llava_onevision_vision_flops(config, visual: int) -> int:
    """FLOPs of LLaVA-OneVision's SigLIP tower (no [CLS], one pass per 384 px tile) and projector for one image.

    The tiles are the base view plus ``ceil((visual - t) / t)`` high-res tiles (``t`` tokens per
    tile): exact while unpadding cuts less than a tile, a lower bound once AnyRes-Max has
    downsampled the grid (the tower then saw more tiles than the tokens show).

    Args:
        config: the VLM's config (``vision_config`` + text config).
        visual: the image's visual tokens (newlines not counted).
    """
    hidden, inter, layers = _vision_sizes(config.vision_config)
    patch = int(config.vision_config.patch_size)
    per_tile = (int(config.vision_config.image_size) // patch) ** 2
    tiles = 1 + max(0, -(-(visual - per_tile) // per_tile))
    text_hidden = int(config.get_text_config().hidden_size)
    projector = 2 * tiles * per_tile * (hidden * text_hidden + text_hidden * text_hidden)
    return tiles * vit_flops(per_tile, hidden, inter, layers, 3 * patch * patch) + projector


def vision_flops(config, visual: int) -> int:
    """FLOPs of the VLM's vision side for one image of ``visual`` tokens: Qwen-style towers or LLaVA's CLIP + projector."""
    if hasattr(config.vision_config, "spatial_merge_size"):
        return qwen_vision_flops(config, visual)
    if getattr(config, "model_type", None) == "internvl":
        return internvl_vision_flops(config, visual)
    if getattr(config, "model_type", None) == "gemma3":
        return gemma3_vision_flops(config, visual)
    if getattr(config, "model_type", None) == "llava_onevision":
        return llava_onevision_vision_flops(config, visual)
    return llava_vision_flops(config, visual)


def localization_flops(config, prompt_tokens: int, patches: int, patch_pixels: int, decoded: int) -> int:
    """FLOPs of one generative localization: vision tower, prefill, and the decode of the box.

    Args:
        config: the localizer VLM's config (Qwen2-VL style: ``vision_config.depth``).
        prompt_tokens: the prompt's length, image tokens included.
        patches: patches the vision tower processes (``pixel_values.shape[0]`` per image).
        patch_pixels: values per patch (``pixel_values.shape[1]``).
        decoded: tokens generated (the first comes from the prefill's logits).
    """
    dims = DecoderDims.from_config(config.get_text_config())
    flops = prefill_flops(dims, [prompt_tokens] * dims.layers)
    flops += sum(decode_flops(dims, [prompt_tokens + i] * dims.layers) for i in range(max(decoded - 1, 0)))
    hidden, inter, layers = _vision_sizes(config.vision_config)
    return flops + vit_flops(patches, hidden, inter, layers, patch_pixels)


def vlm_localization_flops(localizer, question: str, image) -> int:
    """Analytic FLOPs of one localization (vision + prefill + the box it decodes) by a VLM localizer; 0 for others.

    The localizer runs once here to count the tokens it actually decodes (2 for the embedded
    one, which stops at the box's ``]``; about 12 for a byte-level box).

    Args:
        localizer: any localizer (only :class:`crop.localizers.vlm.VLMLocalizer` costs FLOPs).
        question, image: one sample to localize.
    """
    from crop.localizers.vlm import VLMLocalizer

    if not isinstance(localizer, VLMLocalizer):
        return 0
    inputs = localizer.prepare([image], [question])
    decoded = int(localizer.generate(inputs).shape[1])
    pixels = inputs["pixel_values"]  # (patches, values per patch)
    return localization_flops(localizer.model.config, int(inputs["input_ids"].shape[1]), int(pixels.shape[0]),
                              int(pixels.shape[1]), decoded)


def visual_per_layer(kept: dict[str, list[int]], image: int, layers: int) -> list[int]:
    """Visual tokens of one image entering each decoder layer, from the stage counts of its stats.

    Args:
        kept: ``PruneStats.visual_tokens_kept`` (``"llm_input"`` and ``"after_layer_K"`` counts per image).
        image: the image's index.
        layers: the LM's depth.
    """
    from crop.methods.base import visual_counts_per_layer

    stages = [(int(k.rsplit("_", 1)[1]), v[image]) for k, v in kept.items() if k.startswith("after_layer_")]
    return visual_counts_per_layer(kept["llm_input"][image], stages, layers)
