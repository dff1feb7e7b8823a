"""A seeded random LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) at tiny width, real geometry.

The geometry is the stock ``llava-hf/llava-onevision-qwen2-*-ov-hf`` one: a SigLIP tower on 384 px
tiles of 14 px patches (27 x 27 = 729 tokens per tile, no [CLS], ``vision_feature_layer=-1``,
``"full"`` selection), the 36 ``image_grid_pinpoints`` up to 2304 x 2304 px, AnyRes-Max-9
downsampling, one ``image_newline`` per high-resolution row, and a Qwen2 LM with 1-D RoPE. Only
the widths and depths are tiny, so the answers are gibberish by construction. The image processor
is the PIL one (``LlavaOnevisionImageProcessorPil``; torchvision must stay out).
"""

from __future__ import annotations

from typing import Any

import torch

from crop.models.tokenizers import qwen_byte_tokenizer

LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML with one ``<image>`` line per image, as the OneVision checkpoints' template renders a single image."""

TILE_PX = 384
PATCH_PX = 14
VISION_ASPECT_RATIO = "anyres_max_9"


def llava_onevision_tokenizer():
    """The code-built Qwen2 byte tokenizer plus OneVision's ``<image>`` and ``<video>`` placeholders."""
    tok = qwen_byte_tokenizer()
    tok.add_tokens(["<image>", "<video>"], special_tokens=True)
    return tok


def llava_onevision_image_only_processor_class() -> type[Any]:
    """``LlavaOnevisionProcessor`` without a video processor (the stock one needs torchvision, never installed here).

    Returns:
        ``LlavaOnevisionProcessorImageOnly``, built with ``image_processor``, ``tokenizer``, the
        processor's own fields (``num_image_tokens``, ``vision_feature_select_strategy``,
        ``vision_aspect_ratio``) and ``chat_template``; images are processed exactly as the stock class does.
    """
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class LlavaOnevisionProcessorImageOnly(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio=VISION_ASPECT_RATIO, **kwargs):
            # the stock __init__ sets these fields, then insists on a video processor: set them here instead
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token, self.video_token = image_token, video_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
            self.vision_aspect_ratio = vision_aspect_ratio
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return LlavaOnevisionProcessorImageOnly


def llava_onevision_processor():
    """An image-only OneVision processor with the PIL image processor (stock geometry, SigLIP's 0.5 mean/std)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE_PX, "width": TILE_PX}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    side = TILE_PX // PATCH_PX
    return llava_onevision_image_only_processor_class()(
        image_processor=image_processor,
        tokenizer=llava_onevision_tokenizer(),
        num_image_tokens=side * side,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )


def llava_onevision_config(vocab_size: int, image_token_id: int, video_token_id: int, eos: int, pad: int):
    """A ``LlavaOnevisionConfig``: stock geometry (SigLIP 384/14, default pinpoints, anyres_max_9), tiny widths."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE_PX, patch_size=PATCH_PX, vision_use_head=False)
    text = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                       bos_token_id=None, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=VISION_ASPECT_RATIO,
    )


def build_tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa"):
    """A seeded random ``LlavaOnevisionForConditionalGeneration`` and its processor.

    Args:
        seed: torch seed for the weights.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = llava_onevision_processor()
    tok = processor.tokenizer
    config = llava_onevision_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"),
                                    tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, processor


def load_llava_onevision_processor(spec: str):
    """A OneVision checkpoint's processor, image-only: its image processor (PIL backend), tokenizer and chat template.

    The stock ``LlavaOnevisionProcessor`` builds a video processor, which needs torchvision, so
    ``AutoProcessor.from_pretrained`` fails on a hub checkpoint here; this reads the same files
    (``preprocessor_config.json``, ``processor_config.json``, the tokenizer, the chat template)
    into :func:`llava_onevision_image_only_processor_class`.

    Args:
        spec: a checkpoint folder or hub id.
    """
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    processor_dict, _ = ProcessorMixin.get_processor_dict(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec)
    fields = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token", "video_token")
    return llava_onevision_image_only_processor_class()(
        image_processor=AutoImageProcessor.from_pretrained(spec), tokenizer=tokenizer,
        chat_template=processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None),
        **{k: processor_dict[k] for k in fields if k in processor_dict},
    )
