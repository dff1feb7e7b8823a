"""crop's LLaVA-1.5 for vLLM: the stock model, with each request's image tokens pruned before the LLM.

The same three steps as :mod:`crop.vllm_plugin.qwen2_vl`, on vLLM's own LLaVA classes
(``vllm/model_executor/models/llava.py``, vllm 0.32), each a method of a mixin put in front of them:

- the multimodal processor reads the request's ``crop`` options and keeps them as one small tensor
  per image (:meth:`CropRequest.encode`), and gives each image as many ``<image>`` placeholders as
  tokens will reach the LLM (:func:`crop.vllm_plugin.plan.planned_count` on the image's square
  token grid: 24 x 24 for CLIP ViT-L/14-336);
- the model's ``embed_multimodal`` runs the stock tower and projector and hands the LLM
  :func:`crop.vllm_plugin.plan.compress_grid` of each image's tokens.

Positions: LLaVA's language model has 1-D RoPE and vLLM numbers the prompt's tokens 0, 1, 2, ...
as they stand, so a pruned image's kept tokens get consecutive positions and the text after it
follows at once. crop's Hugging Face LLaVA adapter does the same (:mod:`crop.models.llava`:
compressed prompts get compact positions), so the two paths agree; keeping the full image's
positions would need a change in vLLM's runner. Pixtral-style LLaVA checkpoints keep vLLM's stock
classes (their images have no fixed square grid here).

Without ``crop`` options a request is the stock model's, token for token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from crop.vllm_plugin.torchvision_free import serve_pil_processor_modules

serve_pil_processor_modules()

from vllm.model_executor.models.llava import (  # noqa: E402  (after the stand-ins above)
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptReplacement  # noqa: E402

from crop.vllm_plugin.compressing import check_compressor, server_compressor  # noqa: E402
from crop.vllm_plugin.plan import CropRequest, compress_grid, planned_count  # noqa: E402
from crop.vllm_plugin.processing import CROP_FIELD, CropRequestProcessor  # noqa: E402
from crop.vllm_plugin.processors import checkpoint_processor  # noqa: E402

if TYPE_CHECKING:
    _VllmClass = Any
else:
    _VllmClass = object



def _side(tokens: int) -> int:
    """The side of a square token grid of ``tokens`` tokens (LLaVA-1.5's image is one square grid)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"crop's LLaVA expects a square token grid per image, got {tokens} tokens")
    return side


class CropLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info: the checkpoint's processor without the ``crop`` options, and each image's grid side."""

    def get_hf_processor(self, **kwargs: object) -> Any:
        processor = checkpoint_processor(str(self.ctx.model_config.model), self.get_hf_config().model_type)
        if getattr(processor, "patch_size", 0) is None:  # as vLLM's own: a processor_config.json without it
            processor.patch_size = self.get_vision_encoder_info().get_patch_size()
        return processor

    def grid_side(self) -> int:
        size = self.get_image_size_with_most_features()
        return _side(self.get_num_image_tokens(image_width=size.width, image_height=size.height))


class CropLlavaMultiModalProcessor(CropRequestProcessor, LlavaMultiModalProcessor):
    """LLaVA's multimodal processor: reads each request's ``crop`` options and gives its images the
    placeholders of their pruned token count."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        token = self.info.get_hf_config().image_token_index
        side = self.info.grid_side()

        def pruned(item_idx: int) -> list[int]:
            request = CropRequest.decode(out_mm_kwargs["image"][item_idx][CROP_FIELD].data)
            return [token] * planned_count(request, side, side)

        return [PromptReplacement(modality="image", target=[token], replacement=pruned)]

    def placeholder_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_index)

    def full_image_tokens(self, image: Any) -> int:
        return self.info.grid_side() ** 2  # one square grid, whatever the image's size

    def check_request(self, request: CropRequest) -> None:
        """The trained PLC runs here when the server's compressor fits this model's LLM."""
        if request.method == "crop-plc-trained":
            check_compressor(int(self.info.get_hf_config().get_text_config().hidden_size))


class CropLlavaModel(_VllmClass):
    """Mixin for vLLM's LLaVA model: its images reach the LLM pruned as each request asks."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        requests = kwargs.pop(CROP_FIELD, None)
        embeds = super().embed_multimodal(**kwargs)  # (images, rows*cols, D) or one (rows*cols, D) per image
        if requests is None or len(embeds) == 0:
            return embeds
        rows_of = [torch.as_tensor(r) for r in requests] if isinstance(requests, (list, tuple)) \
            else list(torch.as_tensor(requests))
        out = []
        for image, row in zip(embeds, rows_of, strict=True):
            side = _side(image.shape[0])
            request = CropRequest.decode(row)
            compressor = server_compressor(image.device, image.dtype) if request.method == "crop-plc-trained" else None
            out.append(compress_grid(request, image, side, side, compressor).tokens)  # (M, D)
        return tuple(out)


def _info(ctx: Any) -> Any:
    """crop's processing info for a CLIP/SigLIP LLaVA, vLLM's own for a Pixtral-style one."""
    info = _build_llava_or_pixtral_hf_info(ctx)
    return CropLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _processor(info: Any, dummy_inputs: Any) -> Any:
    """crop's multimodal processor for :class:`CropLlavaProcessingInfo`, vLLM's own otherwise."""
    if isinstance(info, CropLlavaProcessingInfo):
        return CropLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class CropLlavaForConditionalGeneration(CropLlavaModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with crop's per-request pruning."""
