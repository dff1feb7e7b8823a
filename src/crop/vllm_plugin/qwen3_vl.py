"""crop's Qwen3-VL for vLLM: the Qwen2-VL plugin's three steps (:mod:`crop.vllm_plugin.qwen2_vl`) on vLLM's Qwen3-VL.

DeepStack needs nothing of its own here: vLLM's Qwen3-VL tower returns, per image token, its
features and its DeepStack features concatenated along the hidden axis (``(n, D * (1 + levels))``,
``vllm/model_executor/models/qwen3_vl.py``, vllm 0.32), and the model splits them after the
embedding step. Pruning that tensor's rows therefore hands every kept token exactly its own
DeepStack features, and pooling it (``crop-plc``'s context, ``pool``) gives a pooled token its
block's mean of them: what crop's Hugging Face Qwen3-VL path does (:meth:`crop.models.base.CompressedImage.carry`
with PLC's and pooling's mean weights). Positions are Qwen2-VL's (each kept token at its source
cell; the text after an image where it would be after the full grid), as in transformers' and
vLLM's Qwen3-VL for images.
"""

from __future__ import annotations

from typing import Any

from crop.vllm_plugin.torchvision_free import serve_pil_processor_modules

serve_pil_processor_modules()

from vllm.model_executor.models.qwen3_vl import (  # noqa: E402  (after the stand-ins above)
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from crop.vllm_plugin.qwen2_vl import CropModel, CropMultiModalProcessor, CropProcessingInfo  # noqa: E402


class CropQwen3VLProcessingInfo(CropProcessingInfo, Qwen3VLProcessingInfo):
    """Qwen3-VL's processing info, crop's image-only processor."""

    def get_supported_mm_processor_kwargs(self) -> Any:
        # Qwen3-VL's own adds video fields to the processor's video scope; the image-only processor has none
        return super(Qwen3VLProcessingInfo, self).get_supported_mm_processor_kwargs()


class CropQwen3VLMultiModalProcessor(CropMultiModalProcessor, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's multimodal processor, placeholders of the pruned images."""


@MULTIMODAL_REGISTRY.register_processor(CropQwen3VLMultiModalProcessor, info=CropQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class CropQwen3VLForConditionalGeneration(CropModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with crop's per-request pruning."""
