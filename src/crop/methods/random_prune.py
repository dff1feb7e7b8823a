"""Random baseline: a seeded uniform choice of ``keep_tokens`` visual tokens, before the LLM (``random``) or at layer K (``random-inner``)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_keep_tokens, check_layer
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, InnerLLMMethod, PreLLMMethod
from crop.models.base import ImageSpan


@dataclass
class RandomConfig(ConfigMixin):
    """Config of the random baseline before the LLM (``random``).

    Args:
        keep_tokens: visual tokens kept per image; ``None`` keeps every token.
        seed: the base seed; each image draws with ``seed`` + a number derived from its own
            prompt (:func:`sample_seed`), so its draw does not depend on the batch around it.

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    seed: int = 0
    method_name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")


@dataclass
class RandomInnerConfig(RandomConfig):
    """Config of the random baseline inside the LLM (``random-inner``): the same draw, dropped at layer K.

    Args:
        keep_tokens: visual tokens per image that survive layer ``layer``.
        layer: the pruning layer K (>= 1).
        seed: as :class:`RandomConfig`.
    """

    layer: int = 2
    method_name: ClassVar[str] = "random-inner"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer)


def sample_seed(inputs, span: ImageSpan, image_in_sample: int) -> int:
    """A seed offset from the image's own prompt: its sample's real (unpadded) token ids and its place there.

    The same prompt gives the same draw alone or anywhere in a batch (left padding is skipped),
    and different questions about the same image draw differently.
    """
    ids = inputs["input_ids"][span.sample]  # (L,)
    mask = inputs.get("attention_mask")
    if mask is not None:
        ids = ids[mask[span.sample].bool()]
    return (zlib.crc32(ids.to(torch.int64).cpu().numpy().tobytes()) + 7919 * image_in_sample) % (2**31)


def _image_seeds(inputs, spans: list[ImageSpan], base: int) -> list[int]:
    """``base`` + :func:`sample_seed` for every image of a batch."""
    seen: dict[int, int] = {}
    seeds = []
    for span in spans:
        index = seen.get(span.sample, 0)
        seen[span.sample] = index + 1
        seeds.append(base + sample_seed(inputs, span, index))
    return seeds


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


@METHODS.register("random")
class RandomPrune(PreLLMMethod):
    """Random: keep a seeded uniform random subset of keep_tokens visual tokens per image, before the LLM.

    The sanity baseline of the token-pruning literature (FastV, SparseVLM and VisionZip all
    compare with it): a method worth using must beat it at the same budget. Stage: before the
    LLM (the prompt is rebuilt around the kept tokens); :class:`RandomInnerConfig` selects
    :class:`RandomPruneInner` (registered as ``random-inner``) instead. Each image draws with a
    seed derived from ``seed`` and its own prompt (:func:`sample_seed`), so a run is
    reproducible and a batch equals one-by-one runs. Config: :class:`RandomConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`RandomConfig`.
    """

    name = "random"
    config_class = RandomConfig
    config: RandomConfig


    def prepare(self, inputs, spans, boxes):
        self._seeds = _image_seeds(inputs, spans, self.config.seed)
        return super().prepare(inputs, spans, boxes)

    def compress_image(self, features, span, box, image_index):
        budget = self.config.keep_tokens
        if budget is None or budget >= span.visual_tokens:
            return keep_all(span, features)
        keep = random_keep(span, budget, self._seeds[image_index]).to(features.device)  # (k,)
        return compose(span, features, features[keep], keep), keep.tolist()


@METHODS.register("random-inner")
class RandomPruneInner(InnerLLMMethod):
    """The random baseline inside the LLM: every token until layer K, then text + the drawn tokens.

    Same draw as :class:`RandomPrune` (the same per-image seeds), applied where CROP's
    ILP prunes, so it is ILP's budget-matched control. Stage: inside the LLM, once, at layer K
    (``config.layer``). Config: :class:`RandomInnerConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`RandomInnerConfig`.
    """

    name = "random-inner"
    config_class = RandomInnerConfig
    config: RandomInnerConfig


    def keep_before_forward(self, inputs, spans, boxes):
        seeds = _image_seeds(inputs, spans, self.config.seed)
        return [random_keep(span, self.config.keep_tokens, seed) for span, seed in zip(spans, seeds, strict=True)]
