"""Seeded random VLMs of the LLaVA-1.5, LLaVA-NeXT and Qwen architectures, built from configs in code.

They have the real classes (``LlavaForConditionalGeneration`` and friends) and real geometry
(LLaVA-1.5: 336 px / 14 px patches = 24x24 = 576 visual tokens) but tiny widths, so tests and
smoke runs are fast and need no download. Their answers are gibberish by construction.
The same builders, with larger sizes, define the embedded models' architectures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crop.models.processors import qwen_image_only_processor_class
from crop.models.tokenizers import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_QUESTION_FIRST_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    llama_byte_tokenizer,
    qwen_byte_tokenizer,
    qwen_word_tokenizer,
)

TINY_MODEL_NAMES = ("tiny-random-llava", "tiny-random-llava-next", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl",
                    "tiny-random-qwen3-vl", "tiny-random-llava-onevision", "tiny-random-internvl",
                    "tiny-random-gemma3")
QWEN_VERSIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class LlavaShape:
    """Sizes of a LLaVA-1.5-shaped model (CLIP vision tower + 2-layer projector + Llama LM)."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_positions: int = 4096
    vision_intermediate: int = 0  # 0: twice vision_hidden
    vocab_size: int = 0  # 0: the byte tokenizer's size; larger pads the embedding (realistic LM-head cost)
    question_first: bool = False  # chat template "USER: q\n<image>\nq ASSISTANT:" (the embedded answerer)


# CLIP ViT-L/14-336-shaped tower, LLaVA-1.5 projector, a ~0.5B-parameter Llama LM (576 visual tokens):
# random weights with realistic proportions, for speed measurements on a CPU.
LLAVA_SHAPE_05B = LlavaShape(
    vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
    text_hidden=1024, text_layers=16, text_heads=16, text_kv_heads=16, text_intermediate=7168, vocab_size=32000,
)
SHAPE_MODEL_NAMES = ("llava-shape-0.5b", "qwen3-vl-shape-2b")


def _clip_config(shape: LlavaShape):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate or 2 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        projection_dim=shape.vision_hidden,
    )


def _llama_config(shape: LlavaShape, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=vocab_size - 2,
    )


def llava_processor(shape: LlavaShape = LlavaShape()):
    """A ``LlavaProcessor`` (PIL image backend, byte tokenizer, minimal chat template) for ``shape``."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = llama_byte_tokenizer()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_QUESTION_FIRST_CHAT_TEMPLATE if shape.question_first else LLAVA_CHAT_TEMPLATE,
    )


def llava_config(shape: LlavaShape = LlavaShape(), vocab_size: int | None = None, image_token_id: int | None = None):
    """A ``LlavaConfig`` for ``shape`` sized to the byte tokenizer unless told otherwise."""
    from transformers import LlavaConfig

    if vocab_size is None or image_token_id is None:
        tok = llama_byte_tokenizer()
        vocab_size, image_token_id = len(tok), tok.convert_tokens_to_ids("<image>")
    grid = shape.image_size // shape.patch_size
    return LlavaConfig(
        vision_config=_clip_config(shape),
        text_config=_llama_config(shape, vocab_size),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=grid * grid,
    )


def build_tiny_llava(seed: int = 0, shape: LlavaShape = LlavaShape(), attn_implementation: str = "sdpa"):
    """A seeded random ``LlavaForConditionalGeneration`` and its processor.

    Args:
        seed: torch seed for the weights.
        shape: the sizes; the default is LLaVA-1.5 geometry (576 visual tokens) at tiny width.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import LlavaForConditionalGeneration

    processor = llava_processor(shape)
    tok = processor.tokenizer
    config = llava_config(shape, max(len(tok), shape.vocab_size), tok.convert_tokens_to_ids("<image>"))
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, processor


LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa"):
    """A seeded random ``LlavaNextForConditionalGeneration`` (AnyRes, pinpoints up to 672x672)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    shape = LlavaShape()
    tok = llama_byte_tokenizer()
    config = LlavaNextConfig(
        vision_config=_clip_config(shape),
        text_config=_llama_config(shape, len(tok)),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


@dataclass(frozen=True)
class QwenShape:
    """Sizes of a Qwen2-VL-shaped model; the merged token grid follows the image size."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    min_pixels: int = 56 * 56
    max_pixels: int = 336 * 336
    # vision patch side in pixels and the patch merger's side: the LLM sees one token per
    # (patch_size * merge_size)-pixel square (14 and 2, i.e. 28 px, in every real Qwen2-VL)
    patch_size: int = 14
    merge_size: int = 2
    # "bytes", "words" (byte-level plus one token per benchmark word) or "words+corners" (plus
    # two tokens per 8x8-grid box, see crop.models.tokenizers.grid_corner_tokens)
    tokenizer: str = "bytes"
    # Qwen3-VL only: the vision blocks whose outputs DeepStack adds to the LM's hidden states after
    # its first layers (one LM layer per entry; ``None``: every vision block, up to the LM's depth - 1)
    deepstack_blocks: tuple[int, ...] | None = None
    vision_intermediate: int = 0  # 0: twice vision_hidden (Qwen2.5-VL / Qwen3-VL towers)
    head_dim: int = 0  # 0: text_hidden // text_heads (Qwen3 sets it on its own)
    vocab_size: int = 0  # 0: the tokenizer's size; larger pads the embedding (realistic LM-head cost)
    tie_embeddings: bool = False


# Qwen3-VL's geometry at tiny width: 16 px patches merged 2x2 (32 px per LLM token), a 3-block tower
# whose every block feeds DeepStack (the real ones feed 3 of 27), so its features reach LM layers 0-2
QWEN3_TINY_SHAPE = QwenShape(vision_layers=3, patch_size=16, min_pixels=64 * 64, max_pixels=384 * 384)

# Qwen/Qwen3-VL-2B-Instruct's sizes (vision tower 24 x 1024 with DeepStack from blocks 5, 11, 17; LM 28 x 2048,
# 16/8 heads of 128, 151,936-token vocabulary, tied embeddings), random weights, every image resized to
# 768 x 768 px = 24 x 24 = 576 visual tokens (LLaVA-1.5's count): realistic proportions for `crop bench`
QWEN3_VL_SHAPE_2B = QwenShape(
    vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, deepstack_blocks=(5, 11, 17),
    text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=8, head_dim=128, text_intermediate=6144,
    vocab_size=151936, tie_embeddings=True, patch_size=16, min_pixels=768 * 768, max_pixels=768 * 768,
)


def qwen_tokenizer(kind: str = "bytes"):
    """The code-built Qwen2 tokenizer of ``kind``: ``"bytes"``, ``"words"`` or ``"words+corners"``.

    See :mod:`crop.models.tokenizers`; ``"words+corners"`` adds the box-corner tokens of the
    8x8 region grid.
    """
    if kind == "bytes":
        return qwen_byte_tokenizer()
    if kind == "words":
        return qwen_word_tokenizer()
    if kind == "words+corners":
        return qwen_word_tokenizer(box_grid=8)
    raise ValueError(f"unknown tokenizer {kind!r}; use 'bytes', 'words' or 'words+corners'")


def _default_shape(version: str, shape: QwenShape | None) -> QwenShape:
    """``shape``, or the version's tiny default (Qwen3-VL's 16 px patches, else Qwen2-VL's 14 px)."""
    if shape is not None:
        return shape
    return QWEN3_TINY_SHAPE if version == "qwen3_vl" else QwenShape()


def qwen_processor(version: str = "qwen2_vl", shape: QwenShape | None = None):
    """An image-only Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor with the tokenizer ``shape.tokenizer`` names."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _check_qwen_version(version)
    shape = _default_shape(version, shape)
    base = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[version]
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=shape.min_pixels, max_pixels=shape.max_pixels, patch_size=shape.patch_size,
        merge_size=shape.merge_size, temporal_patch_size=2,
    )
    return qwen_image_only_processor_class(base)(
        image_processor=image_processor, tokenizer=qwen_tokenizer(shape.tokenizer), chat_template=QWEN_CHAT_TEMPLATE
    )


def _check_qwen_version(version: str) -> None:
    if version not in QWEN_VERSIONS:
        raise ValueError(f"unknown Qwen version {version!r}; use one of {', '.join(QWEN_VERSIONS)}")


def qwen_config(version: str = "qwen2_vl", shape: QwenShape | None = None):
    """A ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` sized to the tokenizer ``shape.tokenizer`` names."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    _check_qwen_version(version)
    shape = _default_shape(version, shape)
    if version == "qwen3_vl":
        return _qwen3_config(shape)

    tok = qwen_tokenizer(shape.tokenizer)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    head_dim = shape.text_hidden // shape.text_heads
    half = head_dim // 2  # mrope_section must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        vocab_size=len(tok),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    vision: dict[str, Any]
    if version == "qwen2_vl":
        vision = dict(
            depth=shape.vision_layers, embed_dim=shape.vision_hidden, hidden_size=shape.text_hidden,
            num_heads=shape.vision_heads, mlp_ratio=2, patch_size=shape.patch_size,
            spatial_merge_size=shape.merge_size,
            temporal_patch_size=2, in_channels=3,
        )
        return Qwen2VLConfig(vision_config=vision, text_config=text, **common)
    vision = dict(
        depth=shape.vision_layers, hidden_size=shape.vision_hidden, out_hidden_size=shape.text_hidden,
        intermediate_size=2 * shape.vision_hidden, num_heads=shape.vision_heads, patch_size=shape.patch_size,
        spatial_merge_size=shape.merge_size, temporal_patch_size=2, in_channels=3, window_size=112,
        fullatt_block_indexes=[shape.vision_layers - 1],
    )
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common)


def _qwen3_config(shape: QwenShape):
    """A dense ``Qwen3VLConfig``: Qwen2-VL's token layout, q/k-normed attention, interleaved M-RoPE, DeepStack."""
    from transformers import Qwen3VLConfig

    tok = qwen_tokenizer(shape.tokenizer)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    head_dim = shape.head_dim or shape.text_hidden // shape.text_heads
    half = head_dim // 2  # the interleaved sections (t, h, w) cover head_dim / 2 frequencies
    section = [half - 2 * (half // 3), half // 3, half // 3]
    deepstack = shape.deepstack_blocks
    if deepstack is None:
        deepstack = tuple(range(min(shape.vision_layers, shape.text_layers - 1)))
    text = dict(
        vocab_size=max(len(tok), shape.vocab_size), hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate, tie_word_embeddings=shape.tie_embeddings,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                         "mrope_interleaved": True},
    )
    vision = dict(
        depth=shape.vision_layers, hidden_size=shape.vision_hidden, out_hidden_size=shape.text_hidden,
        intermediate_size=shape.vision_intermediate or 2 * shape.vision_hidden, num_heads=shape.vision_heads,
        patch_size=shape.patch_size, spatial_merge_size=shape.merge_size, temporal_patch_size=2, in_channels=3,
        num_position_embeddings=576, deepstack_visual_indexes=list(deepstack),
    )
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=shape.tie_embeddings,
                         image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"])


def build_tiny_qwen(
    version: str = "qwen2_vl", seed: int = 0, shape: QwenShape | None = None, attn_implementation: str = "sdpa"
):
    """A seeded random Qwen2-VL (``version="qwen2_vl"``), Qwen2.5-VL (``"qwen2_5_vl"``) or Qwen3-VL (``"qwen3_vl"``)
    and its processor."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    shape = _default_shape(version, shape)
    config = qwen_config(version, shape)
    cls = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration}[version]
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, qwen_processor(version, shape)


def build_tiny_model(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """Build one of :data:`TINY_MODEL_NAMES` or :data:`SHAPE_MODEL_NAMES` (random weights) by name.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name == "tiny-random-llava":
        return build_tiny_llava(seed, attn_implementation=attn_implementation)
    if name == "tiny-random-llava-next":
        return build_tiny_llava_next(seed, attn_implementation=attn_implementation)
    if name == "tiny-random-qwen2-vl":
        return build_tiny_qwen("qwen2_vl", seed, attn_implementation=attn_implementation)
    if name == "tiny-random-qwen2.5-vl":
        return build_tiny_qwen("qwen2_5_vl", seed, attn_implementation=attn_implementation)
    if name == "tiny-random-gemma3":
        from crop.models.tiny_gemma3 import build_tiny_gemma3

        return build_tiny_gemma3(seed, attn_implementation=attn_implementation)
    if name == "tiny-random-qwen3-vl":
        return build_tiny_qwen("qwen3_vl", seed, attn_implementation=attn_implementation)
    if name == "tiny-random-llava-onevision":
        from crop.models.tiny_llava_onevision import build_tiny_llava_onevision

        return build_tiny_llava_onevision(seed, attn_implementation=attn_implementation)
    if name == "tiny-random-internvl":
        from crop.models.tiny_internvl import build_tiny_internvl

        return build_tiny_internvl(seed, attn_implementation=attn_implementation)
    if name == "llava-shape-0.5b":
        return build_tiny_llava(seed, shape=LLAVA_SHAPE_05B, attn_implementation=attn_implementation)
    if name == "qwen3-vl-shape-2b":
        return build_tiny_qwen("qwen3_vl", seed, shape=QWEN3_VL_SHAPE_2B, attn_implementation=attn_implementation)
    raise ValueError(f"unknown random model {name!r}; known: {', '.join(TINY_MODEL_NAMES + SHAPE_MODEL_NAMES)}")
