"""CROP's region selection before the LLM: the region's visual tokens only, from layer 0 (ILP at K = 0).

CROP's ILP keeps every token for layers ``0..K-1`` and only the region's tokens after; this
keeps the region's tokens from the start, so the vision features of the rest never reach the
LLM. It is what an engine that cannot prune inside its LLM can run (vLLM: every layer of a
request shares one KV-cache length; see :mod:`crop.vllm_plugin`), and it lets the Hugging Face
path be compared with it: the same selection rule as ILP (:meth:`crop.models.base.VLMAdapter.select`,
the budget grown or trimmed as in :mod:`crop.ops.selection`), the same kept tokens, no context
tokens (PLC adds pooled ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crop.config import ConfigMixin, check_grid, check_keep_tokens, check_trim
from crop.methods._compose import compose
from crop.methods.base import METHODS, PreLLMMethod


@dataclass
class CropRegionConfig(ConfigMixin):
    """Configuration of CROP's region pruning before the LLM.

    Args:
        keep_tokens: visual tokens per image that reach the LLM; ``None`` keeps exactly the
            region's tokens. Larger regions are trimmed, smaller ones grown.
        grid: side of the region grid the localizer answers on (8 in the paper).
        trim: ``"center"`` or ``"stride"``, as in :class:`crop.config.CropILPConfig`.

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    grid: int = 8
    trim: str = "center"
    method_name: ClassVar[str] = "crop-region"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_grid(self.grid)
        check_trim(self.trim)


@METHODS.register("crop-region")
class CropRegion(PreLLMMethod):
    """CROP's region tokens only, before the LLM (ILP's selection at layer 0).

    Paper: Contextual Region-Oriented Visual Token Pruning, EMNLP 2025 (arXiv 2505.21233); the
    paper prunes after layer K (ILP) or compresses before the LLM (PLC); this is ILP's selection
    applied before the LLM, named here so it can be compared with both. Stage: before the LLM.
    Config: :class:`CropRegionConfig`.
    """

    name = "crop-region"
    config_class = CropRegionConfig
    config: CropRegionConfig
    uses_region = True

    def compress_image(self, features, span, box, image_index):
        keep = self.adapter.select(span, box, self.config.keep_tokens, trim=self.config.trim)  # (k,) span positions
        keep = keep.to(features.device)
        return compose(span, features, features[keep], keep), keep.tolist()
