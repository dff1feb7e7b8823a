"""Processor classes CROP builds itself, and how a checkpoint's processor is loaded, for checkpoints and code-built models alike.

Qwen2-VL's and Qwen2.5-VL's stock processors also want a video processor, which needs
torchvision (never installed here). A checkpoint in the hub layout names the stock class
(``"processor_class": "Qwen2_5_VLProcessor"`` in its ``preprocessor_config.json``), so
``AutoProcessor.from_pretrained`` raises an ``ImportError`` for the video processor before any
image is seen. :func:`load_checkpoint_processor` then serves the checkpoint with the image-only
variant that :func:`qwen_image_only_processor_class` makes: the checkpoint's own image processor
(PIL backend), tokenizer and chat template. The tiny and embedded Qwen models
(:mod:`crop.models.tiny`) are built with the same class.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# model type -> the stock processor class whose image-only variant serves it when torchvision is missing
IMAGE_ONLY_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                         "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor",
                         "internvl": "InternVLProcessor", "llava_onevision": "LlavaOnevisionProcessor"}


def qwen_image_only_processor_class(base: type[Any]) -> type[Any]:
    """A subclass of a Qwen processor class ``base`` that needs no video processor (which would need torchvision).

    Args:
        base: ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` or ``Qwen3VLProcessor``.

    Returns:
        ``<base>ImageOnly``, built with ``image_processor``, ``tokenizer`` and ``chat_template``.
    """
    from transformers.processing_utils import ProcessorMixin

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            # Qwen3-VL's processor reads these (its video path wraps frames in them); Qwen2's ignore them
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{base.__name__}ImageOnly"
    return ImageOnly


def load_checkpoint_processor(spec: str, model_type: str | None = None):
    """The processor of a checkpoint (a local folder or a hub id), image-only where the stock one needs torchvision.

    Args:
        spec: the checkpoint path or hub id.
        model_type: ``config.model_type`` of the checkpoint (default: read from its config).

    Returns:
        What ``AutoProcessor`` builds; for Qwen2-VL / Qwen2.5-VL without torchvision, the
        :func:`qwen_image_only_processor_class` variant of the stock class built from the
        checkpoint's image processor, tokenizer and chat template.

    Raises:
        ImportError: if the processor needs a missing package and no image-only variant exists.
        ValueError: if the processor has no image processor and the model type has no image-only variant.
    """
    from transformers import AutoConfig, AutoProcessor

    if model_type is None:
        model_type = str(AutoConfig.from_pretrained(spec).model_type)
    try:
        processor = AutoProcessor.from_pretrained(spec)
    except (ImportError, ValueError) as exc:
        # The stock Qwen processor builds its video processor first, and that class refuses to exist
        # without torchvision: the error comes before the image-only fallback below could run
        # (InternVL's auto class reports it as a ValueError naming torchvision).
        if model_type not in IMAGE_ONLY_PROCESSORS or "torchvision" not in str(exc).lower():
            raise
        logger.info("%s: the stock %s needs torchvision for its video processor; serving images only", spec,
                    IMAGE_ONLY_PROCESSORS[model_type])
        return image_only_processor(spec, model_type)
    if getattr(processor, "image_processor", None) is None:  # some versions fall back to the bare tokenizer
        return image_only_processor(spec, model_type, tokenizer=getattr(processor, "tokenizer", processor))
    if model_type == "gemma3":  # the stock one reads a flat image list as one prompt's: take one per prompt marker
        from crop.models.tiny_gemma3 import gemma3_batch_processor

        return gemma3_batch_processor(processor)
    return processor


def image_only_processor(spec: str, model_type: str, tokenizer=None):
    """The checkpoint's image processor (PIL backend without torchvision) + tokenizer in an image-only processor.

    Args:
        spec: the checkpoint path or hub id.
        model_type: ``config.model_type`` of the checkpoint.
        tokenizer: the checkpoint's tokenizer if already loaded (else ``AutoTokenizer`` loads it).

    Returns:
        An instance of the image-only variant of the model type's stock processor class, with the
        checkpoint's chat template (``chat_template.jinja``, ``chat_template.json`` or the
        tokenizer's, in that order of preference, as ``AutoProcessor`` resolves them).

    Raises:
        ValueError: if the model type has no image-only processor variant.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    if model_type not in IMAGE_ONLY_PROCESSORS:
        raise ValueError(f"its processor has no image processor (model type {model_type!r})")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    processor_dict, _ = ProcessorMixin.get_processor_dict(spec)
    chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if model_type == "llava_onevision":  # its own image-only variant (crop.models.tiny_llava_onevision)
        from crop.models.tiny_llava_onevision import load_llava_onevision_processor

        return load_llava_onevision_processor(spec)
    if model_type == "internvl":  # its own image-only variant (crop.models.internvl), images + <IMG_CONTEXT> runs
        from crop.models.internvl import internvl_image_only_processor_class

        return internvl_image_only_processor_class()(
            image_processor=AutoImageProcessor.from_pretrained(spec), tokenizer=tokenizer, chat_template=chat_template,
            image_seq_length=int(processor_dict.get("image_seq_length", 256)))
    base = getattr(transformers, IMAGE_ONLY_PROCESSORS[model_type])
    return qwen_image_only_processor_class(base)(image_processor=AutoImageProcessor.from_pretrained(spec),
                                                 tokenizer=tokenizer, chat_template=chat_template)


# The video processor entry of a hub Qwen2-VL / Qwen2.5-VL checkpoint (keys of
# hf-tiny-v2/tiny-random-Qwen2_5_VLForConditionalGeneration video_preprocessor_config.json @ e05c980),
# filled from the image processor's own sizes.
def _qwen_video_processor_dict(image_processor_dict: dict[str, Any]) -> dict[str, Any]:
    keys = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
            "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")
    video = {k: image_processor_dict[k] for k in keys if k in image_processor_dict}
    video.update(do_sample_frames=False, max_frames=768, min_frames=4, return_metadata=False,
                 video_processor_type="Qwen2VLVideoProcessor")
    return dict(sorted(video.items()))


def save_hub_layout(processor, path: str | Path, processor_class: str, processor_kwargs: dict[str, Any] | None = None,
                    video: bool = False) -> list[str]:
    """Write a processor's files the way hub checkpoints hold them, naming the stock processor class.

    The files are those of ``llava-hf/llava-1.5-7b-hf`` and ``Qwen/Qwen2.5-VL-7B-Instruct``:
    ``preprocessor_config.json`` (the image processor's fields, its stock ``image_processor_type``
    and ``processor_class``), ``processor_config.json`` (the processor's own fields, when it has
    any), ``chat_template.json``, ``video_preprocessor_config.json`` (Qwen) and the tokenizer's
    files with ``processor_class`` in ``tokenizer_config.json``. Loading them needs the same
    code path as a downloaded checkpoint, stock class names included.

    Args:
        processor: a processor with ``image_processor``, ``tokenizer`` and ``chat_template``.
        path: the checkpoint folder (created if missing).
        processor_class: the stock class name written into the files, e.g. ``"LlavaProcessor"``.
        processor_kwargs: the processor's own saved fields (LLaVA: ``patch_size``,
            ``vision_feature_select_strategy``, ...); none if ``None``.
        video: also write the stock video processor's ``video_preprocessor_config.json`` (Qwen).

    Returns:
        The names of the files written, sorted.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    written = set(processor.tokenizer.save_pretrained(str(path)))
    tokenizer_config = path / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text())
    config["processor_class"] = processor_class
    tokenizer_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    image = processor.image_processor.to_dict()
    image.pop("_processor_class", None)
    # the PIL class saves the stock type name already; written explicitly so the file never names a backend class
    image["image_processor_type"] = type(processor.image_processor).__name__.removesuffix("Pil")
    image["processor_class"] = processor_class
    size = image.get("size") or {}
    if image["image_processor_type"] == "Qwen2VLImageProcessor" and {"shortest_edge", "longest_edge"} <= set(size):
        # Qwen hub files name the pixel bounds as min_pixels / max_pixels (transformers 5 reads either)
        image.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    files = {"preprocessor_config.json": image, "chat_template.json": {"chat_template": processor.chat_template}}
    if processor_kwargs:
        files["processor_config.json"] = {**processor_kwargs, "processor_class": processor_class}
    if video:
        files["video_preprocessor_config.json"] = {**_qwen_video_processor_dict(image),
                                                   "processor_class": processor_class}
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return sorted({Path(f).name for f in written} | set(files))
