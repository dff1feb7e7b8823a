"""The processor step every crop model in vLLM shares: read the request's ``crop`` options, tag each image with them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig

from crop.errors import CropInputError
from crop.vllm_plugin.localizing import LocalizingProcessor
from crop.vllm_plugin.plan import CropRequest, random_seeds

CROP_FIELD = "crop_request"
"""The per-image tensor field holding the request's crop options (:meth:`CropRequest.encode`)."""


class CropRequestProcessor(LocalizingProcessor):
    """Mixin for a vLLM multimodal processor: the request's options become one ``CROP_FIELD`` row per image.

    The options are the server's default (``--mm-processor-kwargs``) under the request's own
    fields, as vLLM merges them; bad ones raise ``CropInputError`` and fail that request alone.
    Hooked at ``_apply_hf_processor_main`` (not ``_call_hf_processor``: Qwen3-VL's processor calls
    the HF processor itself). ``IMAGES_FIELD`` names the processor output with one row per image.
    """

    IMAGES_FIELD: ClassVar[str] = "pixel_values"

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        kwargs = dict(hf_kwargs)
        kwargs.pop("crop", None)
        request = CropRequest.parse(self.info.ctx.get_merged_mm_kwargs(hf_kwargs).get("crop"))
        self.check_request(request)
        out = super()._apply_hf_processor_main(mm_items, kwargs)
        images = out.get(self.IMAGES_FIELD)
        if images is not None:
            out[CROP_FIELD] = torch.stack([request.encode(i) for i in range(len(images))])  # (images, 10)
        return out

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        """For ``random``: each image's seed from the prompt (:func:`random_seeds`), put into the options first.

        In the options, the seeds enter vLLM's cache key of the processed images, so the same image in
        another prompt draws again, as it would on crop's Hugging Face path.
        """
        options = self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs).get("crop")
        if isinstance(options, Mapping) and options.get("method") == "random":
            items = inputs.mm_data_items.get("image")
            images = [items.get(i) for i in range(items.get_count())] if items is not None else []
            base = options.get("seed", 0)
            if isinstance(base, bool) or not isinstance(base, int) or base < 0:
                raise CropInputError(f"seed must be an integer >= 0, got {base!r}")
            seeds = random_seeds(list(inputs.prompt), self.placeholder_token_id(),
                                 [self.full_image_tokens(image) for image in images], base)
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs,
                                                                         "crop": {**options, "seeds": seeds}})
        return super().apply(inputs, timing_ctx)

    def placeholder_token_id(self) -> int:
        """The id of the token that stands for an image in the prompt vLLM tokenized."""
        raise NotImplementedError

    def full_image_tokens(self, image: Any) -> int:
        """How many visual tokens the unpruned model gives ``image`` (a PIL image)."""
        raise NotImplementedError

    def check_request(self, request: CropRequest) -> None:
        """Refuse (``CropInputError``, one line) what this model cannot serve; the trained PLC by default."""
        if request.method == "crop-plc-trained":
            raise CropInputError("crop-plc-trained is served for LLaVA-1.5 only: its compressed tokens' positions depend "
                                 "on the image features, and vLLM fixes this model's M-RoPE positions before the "
                                 "vision tower runs")

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Any:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[CROP_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields
