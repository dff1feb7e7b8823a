"""Random baseline: a seeded uniform choice of ``keep_tokens`` visual tokens, before the LLM (``random``) or at layer K (``random-inner``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crop.config import ConfigMixin, check_grid, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, InnerLLMMethod, PreLLMMethod
from crop.models.base import ImageSpan, VLMAdapter

STAGES = ("pre", "inner")


@dataclass
class RandomConfig(ConfigMixin):
    """Config of the random baseline.

    Args:
        keep_tokens: visual tokens kept per image; ``None`` keeps every token.
        stage: ``"pre"`` drops tokens before the LLM (the prompt is rebuilt); ``"inner"`` keeps
            every token for layers ``< layer`` and drops them at ``layer`` (like CROP's ILP).
        layer: the pruning layer K of the ``"inner"`` stage (ignored for ``"pre"``).
        seed: image ``i`` of a batch draws its tokens with a generator seeded ``seed + i``.
        grid: side of the region grid of the boxes handed to ``prepare`` (this method ignores
            regions; the field lets a pipeline pair it with any localizer, as with CROP).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    stage: str = "pre"
    layer: int = 2
    seed: int = 0
    grid: int = 8

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_grid(self.grid)
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @property
    def method_name(self) -> str:
        """The registered method this config selects: ``random`` (before the LLM) or ``random-inner``."""
        return "random" if self.stage == "pre" else "random-inner"


def random_keep(span: ImageSpan, budget: int | None, seed: int) -> torch.Tensor:
    """Span positions of ``budget`` visual tokens drawn uniformly without replacement.

    Args:
        span: the image's span.
        budget: tokens to keep (``None`` or ``>=`` the image's tokens keeps all).
        seed: the generator seed (the same seed and span always give the same choice).

    Returns:
        Sorted ``(k,)`` span positions.
    """
    visual = span.visual_positions()  # (V,)
    if budget is None or budget >= visual.numel():
        return visual
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(visual.numel(), generator=generator)[:budget]  # (k,)
    return visual[pick].sort().values


def _check_stage(config: RandomConfig, stage: str, cls: type) -> None:
    if config.stage != stage:
        raise ValueError(f"{cls.__name__} runs stage {stage!r} but the config says {config.stage!r}; "
                         "use method_for(config) to pick the class")


@METHODS.register("random")
class RandomPrune(PreLLMMethod):
    """Random: keep a seeded uniform random subset of keep_tokens visual tokens per image, before the LLM.

    The sanity baseline of the token-pruning literature (FastV, SparseVLM and VisionZip all
    compare with it): a method worth using must beat it at the same budget. Stage: before the
    LLM (the prompt is rebuilt around the kept tokens); ``RandomConfig(stage="inner")`` selects
    :class:`RandomPruneInner` (registered as ``random-inner``) instead. Image ``i`` of a batch
    draws with seed ``seed + i``, so a run is reproducible and a batch equals one-by-one runs
    with seeds ``seed, seed + 1, ...``. Config: :class:`RandomConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`RandomConfig` with ``stage="pre"``.
    """

    name = "random"

    def __init__(self, adapter: VLMAdapter, config: RandomConfig) -> None:
        _check_stage(config, "pre", type(self))
        super().__init__(adapter, config)

    @classmethod
    def config_from_options(cls, keep_tokens, options):
        return RandomConfig(keep_tokens=keep_tokens, stage="pre", layer=options.layer, seed=options.seed,
                            grid=options.grid)

    def compress_image(self, features, span, box, image_index):
        budget = self.config.keep_tokens
        if budget is None or budget >= span.visual_tokens:
            return keep_all(span, features)
        keep = random_keep(span, budget, self.config.seed + image_index).to(features.device)  # (k,)
        return compose(span, features, features[keep], keep), keep.tolist()


@METHODS.register("random-inner")
class RandomPruneInner(InnerLLMMethod):
    """The random baseline inside the LLM: every token until layer K, then text + the drawn tokens.

    Same draw as :class:`RandomPrune` (seed ``seed + i`` for image ``i``), applied where CROP's
    ILP prunes, so it is ILP's budget-matched control. Stage: inside the LLM, once, at layer K
    (``config.layer``). Config: :class:`RandomConfig` with ``stage="inner"``.

    Args:
        adapter: the model's adapter.
        config: a :class:`RandomConfig` with ``stage="inner"``.
    """

    name = "random-inner"

    def __init__(self, adapter: VLMAdapter, config: RandomConfig) -> None:
        _check_stage(config, "inner", type(self))
        super().__init__(adapter, config)

    @classmethod
    def config_from_options(cls, keep_tokens, options):
        return RandomConfig(keep_tokens=keep_tokens, stage="inner", layer=options.layer, seed=options.seed,
                            grid=options.grid)

    def keep_before_forward(self, inputs, spans, boxes):
        return [random_keep(span, self.config.keep_tokens, self.config.seed + i) for i, span in enumerate(spans)]
