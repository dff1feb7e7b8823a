"""VisionZip: dominant tokens by vision-tower [CLS] attention + a few merged contextual tokens, before the LLM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_grid, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, PreLLMMethod, PruneStats
from crop.models.base import CompressedImage, ImageSpan, VLMAdapter
from crop.ops.similarity import merge_into_targets, spread_indices


@dataclass
class VisionZipConfig(ConfigMixin):
    """Config of VisionZip.

    Args:
        keep_tokens: visual tokens per image that reach the LLM (dominant + contextual);
            ``None`` keeps every token.
        contextual_ratio: share of ``keep_tokens`` spent on contextual (merged) tokens; the
            paper's splits 54+10 / 108+20 / 162+30 (at 64 / 128 / 192) are all ``10/64``.
        grid: side of the region grid of the boxes handed to ``prepare`` (this method ignores
            regions; the field lets a pipeline pair it with any localizer, as with CROP).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    contextual_ratio: float = 10 / 64
    grid: int = 8
    method_name: ClassVar[str] = "visionzip"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        check_grid(self.grid)
        if isinstance(self.contextual_ratio, bool) or not isinstance(self.contextual_ratio, (int, float)) \
                or not 0 <= self.contextual_ratio < 1:
            raise ValueError(f"contextual_ratio must be a number in [0, 1), got {self.contextual_ratio!r}")

    def split(self, budget: int) -> tuple[int, int]:
        """``(dominant, contextual)`` token counts for ``budget`` (at least one dominant token)."""
        contextual = min(round(budget * self.contextual_ratio), budget - 1)
        return budget - contextual, contextual


def visionzip_image(span: ImageSpan, features: torch.Tensor, saliency: torch.Tensor, keys: torch.Tensor,
                    dominant: int, contextual: int, pre: torch.Tensor | None = None,
                    project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[CompressedImage, list[int]]:
    """One image's VisionZip compression.

    Args:
        span: the image's span.
        features: ``(span.length, D)`` its features as the LLM would receive them.
        saliency: ``(V,)`` [CLS] attention (or substitute) per visual token (visual-position order).
        keys: ``(V, K)`` the visual tokens' keys in the same vision layer.
        dominant: tokens kept as they are (highest saliency; ties by position).
        contextual: merged tokens made from all the others.
        pre: ``(V, P)`` the visual tokens before the projector: contextual tokens are merged
            there and then projected (``None``: merge ``features`` themselves).
        project: maps ``(c, P)`` merged tokens to ``(c, D)`` (needed with ``pre``).

    Returns:
        ``(image, dominant span positions)``; ``dominant + contextual`` visual tokens reach the LLM.
    """
    device = features.device
    visual = span.visual_positions().to(device)  # (V,)
    order = torch.argsort(saliency.to(device), descending=True, stable=True)
    dom = order[:dominant].sort().values  # (d,) indices into visual order
    rest_mask = torch.ones(visual.numel(), dtype=torch.bool, device=device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().squeeze(1)  # (V - d,)
    tokens, source = [features[visual[dom]]], [visual[dom]]
    if contextual > 0 and rest.numel() > 0:
        targets = spread_indices(rest.numel(), contextual).to(device)  # (c,) indices into rest
        space = features[visual[rest]] if pre is None else pre.to(device)[rest]  # (V - d, D or P)
        merged, _ = merge_into_targets(space, keys.to(device)[rest], targets)  # (c, D or P)
        if pre is not None:
            merged = project(merged.to(pre.dtype)).to(features.dtype)  # (c, D)
        tokens.append(merged)
        source.append(visual[rest[targets]])  # each contextual token sits where its target token was
    return compose(span, features, torch.cat(tokens), torch.cat(source)), visual[dom].tolist()


@METHODS.register("visionzip")
class VisionZip(PreLLMMethod):
    """VisionZip: keep the tokens the vision tower's [CLS] attends to most, merge the rest into a few.

    Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models" (CVPR 2025, arXiv 2412.04467). Stage: before the LLM, training-free (the paper's
    optional projector fine-tuning is not done). Per image: the ``dominant`` visual tokens with
    the highest [CLS] attention (summed over heads) in the vision layer LLaVA takes its
    features from (``vision_feature_layer``, -2) are kept as they are; the others are merged
    into ``contextual`` tokens: targets spread evenly over them, every other token joins the
    target whose key (head-averaged) is most similar
    (:func:`crop.ops.similarity.merge_into_targets`). As in the paper, merging happens before
    the projector (on CLIP features; Qwen: the merger's normed 2x2-patch inputs) and the merged
    tokens are then projected. Attention, keys and projector inputs are captured by transient
    hooks during the stock vision forward (:meth:`VLMAdapter.encode_images_with_saliency`), so
    SDPA stays on.

    Deviations, and why: (1) a contextual token is the plain mean of its group (target
    included), where the reference code adds the target to the mean of the others; (2) each
    contextual token takes the position of its target token and tokens reach the LLM in image
    order (the paper appends contextual tokens after dominant ones); (3) the [CLS] token itself
    is never passed on (LLaVA's "default" feature selection drops it; the reference code can
    keep it as an extra dominant token); (4) LLaVA-NeXT: one top-k and one merge over base view
    + high-res grid (per-tile [CLS] scores) rather than a per-tile budget; (5) Qwen2-VL/2.5-VL
    have no [CLS] token: the substitute ranking is the attention each merged token receives
    (mean over the image's patches, summed over heads) in the last full-attention vision block,
    with keys averaged over its 2x2 patches (:mod:`crop.models.qwen_vision_attention`); the
    paper has no Qwen variant.
    Config: :class:`VisionZipConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`VisionZipConfig`.

    Raises:
        ValueError: if the adapter cannot report vision-tower saliency.
    """

    name = "visionzip"
    config_class = VisionZipConfig

    def __init__(self, adapter: VLMAdapter, config: VisionZipConfig) -> None:
        super().__init__(adapter, config)
        if type(adapter).encode_images_with_saliency is VLMAdapter.encode_images_with_saliency:
            raise ValueError(f"visionzip needs the vision tower's [CLS] attention (or a substitute), which "
                             f"{type(adapter).__name__} ({adapter.config.model_type}) does not provide; "
                             "it supports llava, llava_next, qwen2_vl and qwen2_5_vl")

    @classmethod
    def config_from_options(cls, keep_tokens, options):
        return VisionZipConfig(keep_tokens=keep_tokens, grid=options.grid)

    def compress_image(self, features, span, box, image_index):
        raise NotImplementedError("VisionZip compresses in prepare (it needs the vision tower's saliency too)")

    def prepare(self, inputs, spans, boxes):
        stats = PruneStats.start(spans, boxes)
        budget = self.config.keep_tokens
        if budget is None or all(budget >= s.visual_tokens for s in spans):
            return dict(inputs), stats  # nothing to drop: the stock inputs, bit-identical
        images, full_res = [], []
        for span, seen in zip(spans, self.adapter.encode_images_with_saliency(inputs), strict=True):
            if budget >= span.visual_tokens:
                image, kept = keep_all(span, seen.features)
            else:
                image, kept = visionzip_image(span, seen.features, seen.saliency, seen.keys, *self.config.split(budget),
                                              pre=seen.pre_projector, project=self.adapter.project_features)
            images.append(image)
            full_res.append(kept)
        stats.visual_tokens_kept["llm_input"] = [im.visual_tokens for im in images]
        stats.equivalent_tokens = [float(im.visual_tokens) for im in images]
        stats.full_resolution = full_res
        return self.adapter.compressed_inputs(inputs, spans, images), stats
