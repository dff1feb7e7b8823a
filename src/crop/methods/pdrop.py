"""PyramidDrop: drop a share of the visual tokens at the end of each of several LLM stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.methods.attention import AttentionScoredMethod, BaselineConfigMixin, scaled_layers, stage_counts
from crop.methods.base import METHODS

# the paper's LLaVA-1.5-7B schedule: stages end after layers 8, 16 and 24 of 32
PAPER_STAGE_FRACTIONS = (8 / 32, 16 / 32, 24 / 32)


@dataclass
class PDropConfig(BaselineConfigMixin):
    """Configuration of PyramidDrop.

    Args:
        keep_tokens: the budget as the layer-weighted *equivalent* visual-token count per image
            (see :func:`crop.methods.attention.stage_counts`); ``None`` keeps the paper's
            50 / 25 / 12.5 % after the three stages.
        layers: the stage layers (tokens are dropped at their input); ``None`` scales the
            paper's 8/16/24-of-32 to the model's depth.
        ratio: lambda, the share of the previous stage's visual tokens each stage keeps.
        grid: side of the region grid of the boxes handed to ``prepare`` (ignored: this method
            does not use the region; kept so every config runs through the same pipeline).

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    grid: int = 8
    method_name: ClassVar[str] = "pdrop"

    def __post_init__(self) -> None:
        self._check_keep(self.keep_tokens)
        self._check_grid(self.grid)
        self._check_layers(self.layers)
        self._check_ratio("ratio", self.ratio)


@METHODS.register("pdrop")
class PyramidDrop(AttentionScoredMethod):
    """PyramidDrop: at each of several LLM stages keep lambda of the visual tokens the last token attends to most.

    Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247).
    Stage: inside the LLM, several times. The LM is cut into stages (default: at 1/4, 1/2 and
    3/4 of its depth, the paper's layers 8/16/24 of 32); at the input of each stage layer every
    image keeps ``ratio`` (lambda, default 0.5) of the previous stage's visual tokens, ranked by
    the attention of the last instruction token (the prompt's last token) computed with that
    layer's own norm, query/key projections and rotary positions, averaged over heads, as the
    paper's lightweight attention does (so, as there, each stage pays one extra q/k projection
    of the sequence; it is part of the measured prefill time). Text tokens are never dropped;
    kept tokens keep their positions.

    Budget: ``keep_tokens`` is the layer-weighted equivalent count, so PDrop at 64 costs about
    what a method keeping 64 tokens in every layer costs. The first stage's count ``n1`` is
    chosen so that ``(l1 * N_in + sum_s (l_{s+1} - l_s) * n1 * ratio**s) / depth ~= keep_tokens``;
    when the stage layers cannot meet the budget (the layers before the first stage alone cost
    more), ``keep_tokens`` survive the first stage instead, and the larger equivalent count is
    reported in ``PruneStats.equivalent_tokens`` as always.

    Deviations: the paper also trains with PDrop and tunes lambda / layers per budget; here it is
    training-free with a fixed lambda and the budget solved for ``n1``; the attention is
    recomputed from the layer's projections (no ``output_attentions``); batches and several
    images per prompt work (each image ranked against its own tokens). Config: :class:`PDropConfig`.
    """

    name = "pdrop"
    config_class = PDropConfig
    capture_before = False

    @classmethod
    def config_from_options(cls, keep_tokens, options):
        return PDropConfig(keep_tokens=keep_tokens, grid=options.grid)

    def stage_layers(self) -> list[int]:
        if self.config.layers is not None:
            return list(self.config.layers)
        return scaled_layers(PAPER_STAGE_FRACTIONS, self.adapter.num_layers)

    def prepare(self, inputs, spans, boxes):
        layers = self.stage_layers()
        self._counts = [stage_counts(s.visual_tokens, self.config.keep_tokens, layers, self.adapter.num_layers,
                                     self.config.ratio) for s in spans]  # per image, per stage
        return super().prepare(inputs, spans, boxes)

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        _, valid = self.slot_validity(stage, hidden)  # (B, L)
        rows = self.attention_rows_at(stage, hidden, layer_kwargs, self.last_slots(valid), valid)  # per b: (1, L)
        out, image = [], 0
        for b, per_sample in enumerate(candidates):
            for slots in per_sample:
                n, keep = slots.numel(), self._counts[image][stage]
                image += 1
                if keep >= n:
                    out.append(torch.arange(n))
                    continue
                scores = rows[b][0, slots.to(rows[b].device)]  # (v,)
                out.append(scores.topk(keep).indices.cpu())
        return out
