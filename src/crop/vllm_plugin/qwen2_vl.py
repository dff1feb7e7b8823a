"""crop's Qwen2-VL and Qwen2.5-VL for vLLM: the stock models, with each request's images pruned before the LLM.

Three hook points of vLLM's own Qwen2-VL (``vllm/model_executor/models/qwen2_vl.py``, vllm 0.32;
Qwen2.5-VL's classes derive from them), each a method of a mixin put in front of vLLM's class:

- the multimodal processor reads the request's ``crop`` options (``mm_processor_kwargs``), keeps
  them as one small tensor per image (:meth:`CropRequest.encode`, a batched field vLLM carries to
  the model and hashes with the image), and gives each image as many placeholders as tokens will
  reach the LLM (:func:`crop.vllm_plugin.plan.planned_sources`), so the scheduler and the KV cache
  are sized for the pruned prompt;
- the model's ``embed_multimodal`` runs the stock vision tower and hands the LLM
  :func:`crop.vllm_plugin.plan.compress_grid` of each image's tokens;
- ``get_mrope_input_positions`` gives every token that reaches the LLM the M-RoPE position of its
  source token and the text after an image the position it has in the full prompt, as crop's
  Hugging Face adapter does (:mod:`crop.models.qwen2_vl`).

Without ``crop`` options a request is the stock model's, token for token. The processor is crop's
image-only one (:mod:`crop.models.processors`): the stock one needs torchvision for its video
processor, which is not installed here, so this model serves images only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crop.vllm_plugin.torchvision_free import serve_pil_processor_modules

serve_pil_processor_modules()

from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402  (after the stand-in above)
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptReplacement  # noqa: E402

from crop.vllm_plugin.plan import CropRequest, compress_grid, planned_sources  # noqa: E402
from crop.vllm_plugin.processing import CROP_FIELD, CropRequestProcessor  # noqa: E402
from crop.vllm_plugin.processors import checkpoint_processor  # noqa: E402

if TYPE_CHECKING:  # the mixins sit in front of vLLM classes, which the type checker may not see
    _VllmClass = Any
else:
    _VllmClass = object



class CropProcessingInfo(_VllmClass):
    """Mixin for a Qwen processing info: crop's image-only processor, images only."""

    def get_hf_processor(self, **kwargs: object) -> Any:
        return checkpoint_processor(str(self.ctx.model_config.model), self.get_hf_config().model_type)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}  # no video processor to ask about videos


def _grid(item: Any, merge: int) -> tuple[int, int]:
    """``(rows, cols)`` of an image item's merged token grid."""
    t, h, w = (int(v) for v in item["image_grid_thw"].data.tolist())
    return h // merge, w // merge


class CropMultiModalProcessor(CropRequestProcessor):
    """Mixin for a Qwen multimodal processor: reads each request's ``crop`` options and gives its images the
    placeholders of their pruned token count."""

    IMAGES_FIELD = "image_grid_thw"

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        token = self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor().image_token]

        def pruned(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            rows, cols = _grid(item, merge)
            return [token] * int(planned_sources(CropRequest.decode(item[CROP_FIELD].data), rows, cols).numel())

        return [PromptReplacement(modality="image", target=[token], replacement=pruned)]

    def placeholder_token_id(self) -> int:
        return int(self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor().image_token])

    def full_image_tokens(self, image: Any) -> int:
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        grid = self.info.get_hf_processor().image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
        return int(grid[0].prod()) // (merge * merge)


class CropModel(_VllmClass):
    """Mixin for a Qwen model: its images reach the LLM pruned as each request asks (see the module docstring)."""

    def embed_multimodal(self, **kwargs: object) -> Any:
        requests = kwargs.pop(CROP_FIELD, None)
        embeds = super().embed_multimodal(**kwargs)  # per image: (rows*cols, D)
        if requests is None:
            return embeds
        merge = int(self.config.vision_config.spatial_merge_size)
        grids = torch.as_tensor(kwargs["image_grid_thw"]).reshape(-1, 3).tolist()
        rows_of = [torch.as_tensor(r) for r in requests] if isinstance(requests, (list, tuple)) \
            else list(torch.as_tensor(requests))
        out = []
        for image, (_, h, w), row in zip(embeds, grids, rows_of, strict=True):
            out.append(compress_grid(CropRequest.decode(row), image, h // merge, w // merge).tokens)  # (M, D)
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """``(3, L)`` positions of the pruned prompt and the M-RoPE delta for generated tokens.

        Each token that reaches the LLM takes the (t, h, w) position of its source token in the
        full grid; the text after an image starts where it would after the full grid
        (``max(rows, cols)`` after the image's start), as in transformers' ``get_rope_index``.
        """
        merge = int(self.config.vision_config.spatial_merge_size)
        parts: list[np.ndarray] = []
        consumed, next_pos = 0, 0  # prompt tokens placed so far; the next text position
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"crop's Qwen2-VL serves images only, got {feature.modality}")
            text = feature.mm_position.offset - consumed
            parts.append(np.broadcast_to(np.arange(text) + next_pos, (3, text)))
            start = next_pos + text
            rows, cols = _grid(feature.data, merge)
            source = planned_sources(CropRequest.decode(feature.data[CROP_FIELD].data), rows, cols).numpy()  # (M,)
            parts.append(np.stack([np.full_like(source, start), start + source // cols, start + source % cols]))
            consumed = feature.mm_position.offset + len(source)
            next_pos = start + max(rows, cols)
        tail = len(input_tokens) - consumed
        parts.append(np.broadcast_to(np.arange(tail) + next_pos, (3, tail)))
        positions = np.concatenate(parts, axis=1)  # (3, L)
        return torch.from_numpy(positions.astype(np.int64)), int(positions.max() + 1 - len(input_tokens))


class CropQwen2VLProcessingInfo(CropProcessingInfo, Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info, crop's processor."""


class CropQwen2VLMultiModalProcessor(CropMultiModalProcessor, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's multimodal processor, placeholders of the pruned images."""


@MULTIMODAL_REGISTRY.register_processor(CropQwen2VLMultiModalProcessor, info=CropQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class CropQwen2VLForConditionalGeneration(CropModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with crop's per-request pruning."""


class CropQwen2_5_VLProcessingInfo(CropProcessingInfo, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info, crop's processor."""


class CropQwen2_5_VLMultiModalProcessor(CropMultiModalProcessor, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's multimodal processor, placeholders of the pruned images."""


@MULTIMODAL_REGISTRY.register_processor(CropQwen2_5_VLMultiModalProcessor, info=CropQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class CropQwen2_5_VLForConditionalGeneration(CropModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with crop's per-request pruning."""
