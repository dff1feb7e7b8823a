"""DART: drop visual tokens that duplicate a few pivot tokens, inside the LLM at layer K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_grid, check_keep_tokens
from crop.methods.base import METHODS, InnerLLMMethod
from crop.ops.similarity import duplication_select

PIVOT_SCORES = ("key_norm", "hidden_norm")


@dataclass
class DARTConfig(ConfigMixin):
    """Config of DART.

    Args:
        keep_tokens: visual tokens per image that survive layer ``layer``; ``None`` keeps all.
        layer: the pruning layer K (>= 1); layers ``< K`` see every token (paper: 2).
        pivots: pivot tokens per image (paper's LLaVA default: 8).
        pivot_score: how pivots are ranked: ``"key_norm"`` (the paper's K-norm: L1 norm of layer
            K's keys, before RoPE) or ``"hidden_norm"`` (L1 norm of the hidden states entering K).
        grid: side of the region grid of the boxes handed to ``prepare`` (this method ignores
            regions; the field lets a pipeline pair it with any localizer, as with CROP).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    layer: int = 2
    pivots: int = 8
    pivot_score: str = "key_norm"
    grid: int = 8
    method_name: ClassVar[str] = "dart"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_grid(self.grid)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (layers before it see every token), got {self.layer!r}")
        if isinstance(self.pivots, bool) or not isinstance(self.pivots, int) or self.pivots < 1:
            raise ValueError(f"pivots must be an int >= 1, got {self.pivots!r}")
        if self.pivot_score not in PIVOT_SCORES:
            raise ValueError(f"unknown pivot_score {self.pivot_score!r}; choose one of {', '.join(PIVOT_SCORES)}")


@METHODS.register("dart")
class DART(InnerLLMMethod):
    """DART: keep the visual tokens least duplicated by a few pivots; drop the rest at layer K.

    Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More" (2025, arXiv 2502.11494). Stage: inside the LLM, once, at the
    input of layer K (default 2); training-free, needs no attention map (so SDPA/Flash stay on).
    Per image: the ``pivots`` visual tokens with the largest L1 norm of layer K's keys are
    pivots (``pivot_score``); the remaining budget is shared between the pivots, each adding
    the not-yet-kept tokens whose hidden states have the lowest cosine similarity to its own
    (:func:`crop.ops.similarity.duplication_select`); exactly ``keep_tokens`` survive (pivots
    included). Kept tokens keep their original positions.

    Deviations from the paper, and why: keys are taken before RoPE (the rotation depends on
    the position, which says nothing about content; it changes the L1 norm only slightly);
    pivots are visual tokens only (the paper's code can also take pivots among the text
    tokens), so the budget counts visual tokens exactly as every other method's does;
    similarities are computed per image, against that image's pivots (the reference code
    handles one image per batch). Config: :class:`DARTConfig`.
    """

    name = "dart"
    config_class = DARTConfig

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
                scores = None  # hidden_norm: duplication_select's default
                if self.config.pivot_score == "key_norm":
                    parts = self.adapter.attention_parts(self.config.layer)
                    with torch.no_grad():
                        keys = parts.k_proj(parts.norm(tokens))  # (v, Hkv*d) layer K's keys, before RoPE
                    scores = keys.float().abs().sum(-1)  # (v,) K-norm
                out.append(duplication_select(tokens, budget, self.config.pivots, pivot_scores=scores))
        return out
