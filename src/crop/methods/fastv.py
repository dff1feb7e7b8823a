"""FastV: drop the visual tokens the last prompt token attends to least, once, inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crop.methods.attention import AttentionScoredMethod, BaselineConfigMixin
from crop.methods.base import METHODS, TopKSelection


@dataclass
class FastVConfig(BaselineConfigMixin):
    """Configuration of FastV.

    Args:
        keep_tokens: visual tokens per image that survive layer ``layer``; ``None`` keeps
            ``1 - drop`` of them (the paper's default prunes half).
        layer: K, the first layer that runs without the dropped tokens (the paper's K = 2);
            the ranking uses layer K-1's attention.
        drop: share of the visual tokens dropped when ``keep_tokens`` is ``None`` (the paper's R).

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layer: int = 2
    drop: float = 0.5
    method_name: ClassVar[str] = "fastv"

    def __post_init__(self) -> None:
        self._check_keep(self.keep_tokens)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (FastV ranks with layer K-1's attention), got {self.layer!r}")
        if isinstance(self.drop, bool) or not isinstance(self.drop, (int, float)) or not 0 <= self.drop < 1:
            raise ValueError(f"drop must be a number in [0, 1) (some visual tokens must survive), got {self.drop!r}")


@METHODS.register("fastv")
class FastV(TopKSelection, AttentionScoredMethod):
    """FastV: keep the visual tokens the last prompt token attends to most at layer K-1; drop the rest at K.

    Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024 (arXiv 2403.06764).
    Official code read: github.com/pkunlp-icler/FastV at commit d1659729b5bf1be225e99ee15783deeea80f63b1,
    ``src/transformers/src/transformers/models/llama/modeling_llama.py`` (``LlamaModel.forward``,
    L717-790: layer K-1's attention of the last token, averaged over heads, top ``ATTENTION_RANK``
    image tokens kept in the in-place variant) and the llava-hf copy (L970-1082: the same rule with
    ``round(N * (1 - R))`` kept).
    Stage: inside the LLM, once. Layers ``0..K-1`` see every token; at the input of layer K
    each image keeps the ``keep_tokens`` visual tokens that received the most attention from
    the last prompt token at layer K-1, averaged over heads. Text tokens are never dropped;
    kept tokens keep their positions; layers >= K cache only the kept tokens.

    Deviations from the paper's code: the attention row is recomputed from layer K-1's
    captured queries/keys instead of ``output_attentions`` (same numbers, SDPA stays on);
    batches and several images per prompt are supported (one ranking per image, against that
    image's own tokens); the budget is a count per image (``keep_tokens``) rather than a ratio
    unless ``keep_tokens`` is ``None``. Config: :class:`FastVConfig`.
    """

    name = "fastv"
    config_class = FastVConfig
    config: FastVConfig


    def kept_after_stage(self, n_in):
        budget = self.config.keep_tokens
        return n_in - int(n_in * self.config.drop) if budget is None else min(budget, n_in)

    def scores(self, stage, hidden, layer_kwargs):
        return self.last_token_scores(stage, hidden, layer_kwargs)

    def keep_count(self, image, stage, n):
        return self.kept_after_stage(n)
