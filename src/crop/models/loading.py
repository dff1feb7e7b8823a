"""Loading answerer / localizer models by name: tiny random shapes, the embedded pair, or checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

from crop.errors import CropInputError
from crop.models.tiny import SHAPE_MODEL_NAMES, TINY_MODEL_NAMES, build_tiny_model

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"


def load_model(spec: str, attn_implementation: str = "sdpa", role: str = "answerer"):
    """``(model, processor)`` for a model name, a local checkpoint directory, or a hub id.

    Args:
        spec: ``"embedded"`` (the shipped toy model for ``role``), one of
            :data:`crop.models.tiny.TINY_MODEL_NAMES` or ``SHAPE_MODEL_NAMES`` (random weights),
            a local path, or a hub id.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        role: ``"answerer"`` or ``"localizer"`` (which embedded model ``"embedded"`` means).

    Raises:
        CropInputError: if the model cannot be found or loaded.
    """
    if spec in TINY_MODEL_NAMES or spec in SHAPE_MODEL_NAMES:
        return build_tiny_model(spec, attn_implementation=attn_implementation)
    if spec == EMBEDDED:
        from crop import embedded

        loader = embedded.load_embedded_answerer if role == "answerer" else embedded.load_embedded_localizer
        try:
            model, processor = loader()
        except FileNotFoundError as exc:
            raise CropInputError(str(exc)) from None
        model.set_attn_implementation(attn_implementation)
        return model, processor
    if spec.startswith("tiny-random"):
        raise CropInputError(f"unknown model {spec!r}; tiny random models: {', '.join(TINY_MODEL_NAMES)}")
    return _from_pretrained(spec, attn_implementation)


def _from_pretrained(spec: str, attn_implementation: str):
    """A real checkpoint through the stock transformers auto classes (PIL image processors)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    is_local = Path(spec).exists()
    if not is_local and ("/" not in spec or spec.count("/") > 1 or spec.startswith((".", "/"))):
        raise CropInputError(f"unknown model {spec!r}: not a local path, not a hub id (owner/name), and not one of "
                             f"{EMBEDDED}, {', '.join(TINY_MODEL_NAMES)}")
    try:
        processor = AutoProcessor.from_pretrained(spec)
        model = AutoModelForImageTextToText.from_pretrained(spec, attn_implementation=attn_implementation)
        if getattr(processor, "image_processor", None) is None:
            processor = _image_only_processor(spec, model.config.model_type, processor)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CropInputError(f"could not load model {spec!r}: {first}") from None
    return model.eval(), processor


# Processors whose stock class also wants a video processor (which needs torchvision, never
# installed here): without it AutoProcessor falls back to the bare tokenizer.
_IMAGE_ONLY_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def _image_only_processor(spec: str, model_type: str, tokenizer):
    """The checkpoint's image processor (PIL backend) + ``tokenizer`` in an image-only processor.

    Args:
        spec: the checkpoint path or hub id.
        model_type: ``config.model_type`` of the loaded model.
        tokenizer: what ``AutoProcessor`` returned (the tokenizer alone).

    Raises:
        ValueError: if the model type needs a processor this function does not know how to build.
    """
    import transformers
    from transformers import AutoImageProcessor

    from crop.models.tiny import _qwen_image_only_processor_class

    if model_type not in _IMAGE_ONLY_PROCESSORS:
        raise ValueError(f"its processor has no image processor (model type {model_type!r})")
    base = getattr(transformers, _IMAGE_ONLY_PROCESSORS[model_type])
    return _qwen_image_only_processor_class(base)(image_processor=AutoImageProcessor.from_pretrained(spec),
                                                  tokenizer=tokenizer, chat_template=tokenizer.chat_template)
