"""Processor classes CROP builds itself, for checkpoints and code-built models alike.

Qwen2-VL's and Qwen2.5-VL's stock processors also want a video processor, which needs
torchvision (never installed here); without one ``AutoProcessor`` falls back to the bare
tokenizer. :func:`qwen_image_only_processor_class` makes the image-only variant that the tiny
and embedded Qwen models (:mod:`crop.models.tiny`) and real Qwen checkpoints
(:mod:`crop.models.loading`) are served with.
"""

from __future__ import annotations

from typing import Any


def qwen_image_only_processor_class(base: type[Any]) -> type[Any]:
    """A subclass of a Qwen processor class ``base`` that needs no video processor (which would need torchvision).

    Args:
        base: ``Qwen2VLProcessor`` or ``Qwen2_5_VLProcessor``.

    Returns:
        ``<base>ImageOnly``, built with ``image_processor``, ``tokenizer`` and ``chat_template``.
    """
    from transformers.processing_utils import ProcessorMixin

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{base.__name__}ImageOnly"
    return ImageOnly
