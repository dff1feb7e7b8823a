"""DART: drop visual tokens that duplicate a few pivot tokens, inside the LLM at layer K."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from crop.methods.base import METHODS, InnerLLMMethod
from crop.methods.pool import check_grid, check_keep_tokens, config_from_dict
from crop.ops.similarity import duplication_select


@dataclass
class DARTConfig:
    """Config of DART.

    Args:
        keep_tokens: visual tokens per image that survive layer ``layer``; ``None`` keeps all.
        layer: the pruning layer K (>= 1); layers ``< K`` see every token (paper: 2).
        pivots: pivot tokens per image (paper's LLaVA default: 8).
        grid: side of the region grid of the boxes handed to ``prepare`` (this method ignores
            regions; the field lets a pipeline pair it with any localizer, as with CROP).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    layer: int = 2
    pivots: int = 8
    grid: int = 8
    method_name: ClassVar[str] = "dart"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_grid(self.grid)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (layers before it see every token), got {self.layer!r}")
        if isinstance(self.pivots, bool) or not isinstance(self.pivots, int) or self.pivots < 1:
            raise ValueError(f"pivots must be an int >= 1, got {self.pivots!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DARTConfig:
        """Build from :meth:`to_dict` output (unknown keys raise ``ValueError``)."""
        return config_from_dict(cls, data)


@METHODS.register("dart")
class DART(InnerLLMMethod):
    """DART: keep the visual tokens least duplicated by a few pivots; drop the rest at layer K.

    Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More" (2025, arXiv 2502.11494). Stage: inside the LLM, once, at the
    input of layer K (default 2); training-free, needs no attention map (so SDPA/Flash stay on).
    Per image: the ``pivots`` visual tokens with the largest L1 norm are pivots; the remaining
    budget is shared between the pivots, each adding the not-yet-kept tokens with the lowest
    cosine similarity to it (:func:`crop.ops.similarity.duplication_select`); exactly
    ``keep_tokens`` survive (pivots included). Kept tokens keep their original positions.

    Deviations from the paper, and why: the paper's default ranks pivots by the norm of the
    layer's *keys* ("K-norm") and its code can also take pivots among the text tokens; we rank
    by the L1 norm of the hidden states entering layer K (the keys are a model-specific
    projection inside the layer, the hidden states are what the method protocol hands every
    inner-LLM method) and take visual pivots only, so the budget counts visual tokens exactly
    as every other method's does. Similarities are computed per image, against that image's
    pivots (the reference code handles one image per batch). Config: :class:`DARTConfig`.
    """

    name = "dart"

    @classmethod
    def config_from_options(cls, keep_tokens, options):
        return DARTConfig(keep_tokens=keep_tokens, layer=options.layer, grid=options.grid)

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        budget = self.config.keep_tokens
        out = []
        for b, per_sample in enumerate(candidates):
            for slots in per_sample:
                if budget is None or budget >= slots.numel():
                    out.append(torch.arange(slots.numel(), device=slots.device))
                    continue
                tokens = hidden[b, slots]  # (v, D) this image's visual hidden states at layer K
                out.append(duplication_select(tokens, budget, self.config.pivots))
        return out
