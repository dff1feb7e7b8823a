"""A seeded random InternVL3-shaped model (``tiny-random-internvl``), its tokenizer and processor, built in code.

Real geometry: 448 px tiles of 14 px patches (32 x 32) pixel-shuffled by 0.5 into 16 x 16 =
256 tokens per tile, dynamic tiling (``crop_to_patches``, 1 to 4 tiles) plus a thumbnail, the
``<img><IMG_CONTEXT>...</img>`` prompt layout and a Qwen2 LM; tiny widths, random weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crop.models.internvl import internvl_image_only_processor_class
from crop.models.tokenizers import gpt2_byte_alphabet

INTERNVL_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
"""InternVL's named image tokens, as its hub tokenizers declare them (``extra_special_tokens``)."""

INTERNVL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The Qwen-style chat turns InternVL3 uses; an image is one ``<IMG_CONTEXT>`` the processor expands."""


def internvl_byte_tokenizer():
    """A Qwen2 byte-level tokenizer with InternVL's image tokens and Qwen's chat tokens.

    Returns:
        A ``Qwen2Tokenizer`` whose ``start_image_token``, ``end_image_token``,
        ``context_image_token`` and ``video_token`` (and their ``*_id``) are set, as the stock
        ``InternVLProcessor`` reads them; eos ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(gpt2_byte_alphabet())}, merges=[], unk_token=None,
                         bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=dict(INTERNVL_IMAGE_TOKENS))
    tok.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tok


@dataclass(frozen=True)
class InternVLShape:
    """Sizes of an InternVL3-shaped model (InternViT + pixel shuffle + 2-layer projector + Qwen2 LM)."""

    tile_px: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    # InternVL3 allows 1 to 12 tiles; up to 4 keeps tiny prompts short: 400x300 -> one tile (256 tokens),
    # 336x500 -> 2 high x 1 wide + thumbnail (768), so a batch mixes both layouts
    min_tiles: int = 1
    max_tiles: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128


def internvl_processor(shape: InternVLShape = InternVLShape()):
    """The image-only InternVL processor (PIL ``GotOcr2ImageProcessorPil``, dynamic tiles) for ``shape``."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(size={"height": shape.tile_px, "width": shape.tile_px},
                                               crop_to_patches=True, min_patches=shape.min_tiles,
                                               max_patches=shape.max_tiles)
    tokens = (shape.tile_px // shape.patch_size) ** 2 * shape.downsample_ratio ** 2
    return internvl_image_only_processor_class()(image_processor=image_processor, tokenizer=internvl_byte_tokenizer(),
                                                 image_seq_length=int(tokens), chat_template=INTERNVL_CHAT_TEMPLATE)


def internvl_config(shape: InternVLShape = InternVLShape()):
    """An ``InternVLConfig`` for ``shape`` sized to :func:`internvl_byte_tokenizer`."""
    from transformers import InternVLConfig

    tok = internvl_byte_tokenizer()
    vision = dict(hidden_size=shape.vision_hidden, num_hidden_layers=shape.vision_layers,
                  num_attention_heads=shape.vision_heads, intermediate_size=2 * shape.vision_hidden,
                  image_size=shape.tile_px, patch_size=shape.patch_size)
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=shape.text_hidden,
                intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers,
                num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads,
                max_position_embeddings=8192, bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    tokens = (shape.tile_px // shape.patch_size) ** 2 * shape.downsample_ratio ** 2
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                          image_seq_length=int(tokens), downsample_ratio=shape.downsample_ratio,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")


def build_tiny_internvl(seed: int = 0, shape: InternVLShape = InternVLShape(), attn_implementation: str = "sdpa"):
    """A seeded random ``InternVLForConditionalGeneration`` and its processor.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import InternVLForConditionalGeneration

    config = internvl_config(shape)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, internvl_processor(shape)
