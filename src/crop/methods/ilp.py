"""Inner-LLM pruning guided by the region (ILP, CROP paper section 3)."""

from __future__ import annotations

from crop.config import CropILPConfig
from crop.methods.base import METHODS, InnerLLMMethod


@METHODS.register("crop-ilp")
class CropILP(InnerLLMMethod):
    """CROP's inner-LLM pruning: every token for layers < K, then text + the region's visual tokens.

    Paper: Contextual Region-Oriented Visual Token Pruning, EMNLP 2025 (arXiv 2505.21233),
    section 3 (ILP). Stage: inside the LLM, once, at layer K (``config.layer``, default 2).
    Training-free. The selection is known before the forward (the localizer's region mapped
    onto the token grid, trimmed or grown to ``keep_tokens`` by :mod:`crop.ops.selection`), so
    kept tokens keep their original positions and the first K layers' cache stays complete.
    Config: :class:`crop.config.CropILPConfig`.
    """

    name = "crop-ilp"
    config_class = CropILPConfig
    config: CropILPConfig
    uses_region = True


    def keep_before_forward(self, inputs, spans, boxes):
        keep = [self.adapter.select(span, box, self.config.keep_tokens, self.config.trim)
                for span, box in zip(spans, boxes, strict=True)]
        self._current_stats().region_tokens = [int(k.numel()) for k in keep]
        return keep
