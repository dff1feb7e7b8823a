"""VisionZip: dominant tokens by vision-tower [CLS] attention + a few merged contextual tokens, before the LLM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, PreLLMMethod
from crop.models.base import CompressedImage, ImageSpan, VisionSaliency, VLMAdapter
from crop.ops.similarity import merge_into_targets, spread_indices

MERGES = ("official", "mean")
ORDERS = ("official", "image")
CLS_SOURCE = -1  # the [CLS] token's CompressedImage.source: it has no placeholder, it comes "before" the grid
_NEEDS_PROJECT = "visionzip_image needs `project` to map pre-projector tokens (pre, cls) to features"


@dataclass
class VisionZipConfig(ConfigMixin):
    """Config of VisionZip (defaults: the official LLaVA-1.5 rule).

    Args:
        keep_tokens: visual tokens per image that reach the LLM (dominant + contextual, the
            [CLS] token counted among the dominant ones when it is passed on); ``None`` keeps
            every token.
        contextual_ratio: share of ``keep_tokens`` spent on contextual (merged) tokens. ``10/64``
            gives 54+10 at 64 (the official README's ``visionzip(model, dominant=54,
            contextual=10)``), and 108+20 / 162+30 at 128 / 192, the splits of the paper's
            tables (those two are not in the official repository).
        keep_cls: pass the vision tower's [CLS] token on as one of the dominant tokens (official);
            ``False``: only patches (crop's earlier behaviour). Ignored where the adapter hands
            over no [CLS] (LLaVA-NeXT, Qwen2-VL/2.5-VL).
        merge: ``"official"``: a contextual token is its target plus the mean of the tokens
            merged into it; ``"mean"``: the mean of the group, target included (crop's earlier
            behaviour).
        order: ``"official"``: [CLS], dominant patches in position order, contextual tokens in
            target order, at consecutive LM positions; ``"image"``: image order, each
            contextual token at its target's position (crop's earlier behaviour). Only images
            whose adapter hands over the [CLS] token (LLaVA-1.5) can take the official order;
            the others always use image order (see :class:`VisionZip`).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    contextual_ratio: float = 10 / 64
    keep_cls: bool = True
    merge: str = "official"
    order: str = "official"
    method_name: ClassVar[str] = "visionzip"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        if isinstance(self.contextual_ratio, bool) or not isinstance(self.contextual_ratio, (int, float)) \
                or not 0 <= self.contextual_ratio < 1:
            raise ValueError(f"contextual_ratio must be a number in [0, 1), got {self.contextual_ratio!r}")
        if not isinstance(self.keep_cls, bool):
            raise ValueError(f"keep_cls must be a bool, got {self.keep_cls!r}")
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; choose one of {', '.join(MERGES)}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")

    def split(self, budget: int) -> tuple[int, int]:
        """``(dominant, contextual)`` token counts for ``budget`` (at least one dominant token).

        ``dominant`` includes the [CLS] token when it is passed on (official: ``dominant=54``
        keeps [CLS] + 53 patches).
        """
        contextual = min(round(budget * self.contextual_ratio), budget - 1)
        return budget - contextual, contextual


def _target_plus_member_mean(space: torch.Tensor, assignment: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The official contextual tokens: ``c_j = x[T_j] + mean(x[i] for non-targets i assigned to j)``.

    A target nothing joined stays as it is (the official ``counts.clamp(min=1)``).

    Args:
        space: ``(n, D)`` the tokens merged.
        assignment: ``(n,)`` position in ``targets`` each token joined (``merge_into_targets``).
        targets: ``(c,)`` distinct indices into ``range(n)``.

    Returns:
        ``(c, D)`` in target order, in ``space``'s dtype (computed in fp32).
    """
    n, device = space.shape[0], space.device
    others = torch.ones(n, dtype=torch.bool, device=device)
    others[targets] = False
    others = others.nonzero().squeeze(1)  # (n - c,) the tokens merged into a target
    member = torch.zeros(targets.numel(), n, device=device)  # (c, n)
    member[assignment[others], others] = 1.0
    x = space.float()  # (n, D)
    mean = (member @ x) / member.sum(1, keepdim=True).clamp(min=1)  # (c, D)
    return (x[targets] + mean).to(space.dtype)


def _projector(project: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``project``, for pre-projector tokens (``pre``, ``cls``) that must go through it.

    Raises:
        ValueError: if it was not given.
    """
    if project is None:
        raise ValueError(_NEEDS_PROJECT)
    return project


def visionzip_image(span: ImageSpan, features: torch.Tensor, saliency: torch.Tensor, keys: torch.Tensor,
                    dominant: int, contextual: int, pre: torch.Tensor | None = None,
                    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    cls: torch.Tensor | None = None, merge: str = "official",
                    order: str = "image") -> tuple[CompressedImage, list[int]]:
    """One image's VisionZip compression.

    Args:
        span: the image's span.
        features: ``(span.length, D)`` its features as the LLM would receive them.
        saliency: ``(V,)`` [CLS] attention (or substitute) per visual token (visual-position order).
        keys: ``(V, K)`` the visual tokens' keys in the same vision layer.
        dominant: tokens kept as they are: [CLS] (if ``cls`` is given) and the patches of
            highest saliency (ties by position).
        contextual: merged tokens made from all the other patches.
        pre: ``(V, P)`` the visual tokens before the projector: contextual tokens are merged
            there and then projected (``None``: merge ``features`` themselves).
        project: maps ``(m, P)`` pre-projector tokens to ``(m, D)`` (needed with ``pre`` or ``cls``).
        cls: ``(P,)`` the [CLS] token before the projector, to pass on first (``None``: patches only).
        merge: ``"official"`` (target + mean of its members) or ``"mean"`` (mean of the group).
        order: ``"official"``: tokens reach the LLM as [CLS], dominant patches (position
            order), contextual tokens (target order); needs a plain grid whose LM positions
            are sequence order. ``"image"``: sorted by source (span position; contextual
            tokens sit at their target's position, [CLS] first).

    Returns:
        ``(image, dominant span positions)``; ``dominant + contextual`` visual tokens reach the
        LLM. ``image.source`` is the span position of each token's source (contextual: its
        target; [CLS]: ``CLS_SOURCE`` = -1, it has no placeholder).

    Raises:
        ValueError: on an unknown ``merge``/``order``, the official order on a multi-grid span,
            or ``pre``/``cls`` without ``project``.
    """
    if merge not in MERGES or order not in ORDERS:
        raise ValueError(f"merge must be one of {MERGES} and order one of {ORDERS}, got {merge!r}, {order!r}")
    if order == "official" and span.grids:
        raise ValueError("the official VisionZip order needs one plain token grid (1-D positions); use order='image'")
    if (pre is not None or cls is not None) and project is None:
        raise ValueError(_NEEDS_PROJECT)
    device = features.device
    visual = span.visual_positions().to(device)  # (V,)
    patches = dominant - (cls is not None)  # official: dominant_num = dominant - 1 patches besides [CLS]
    ranked = torch.argsort(saliency.to(device), descending=True, stable=True)
    dom = ranked[:patches].sort().values  # (d,) indices into visual order
    rest_mask = torch.ones(visual.numel(), dtype=torch.bool, device=device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().squeeze(1)  # (V - d,) position order, as the official boolean-mask filter
    token_parts, source_parts = [features[visual[dom]]], [visual[dom]]
    if cls is not None:
        token_parts.insert(0, _projector(project)(cls[None]).to(features.dtype))  # (1, D)
        source_parts.insert(0, torch.tensor([CLS_SOURCE], device=device))
    groups: tuple[torch.Tensor, torch.Tensor] | None = None  # (assignment, targets) of the merge
    if contextual > 0 and rest.numel() > 0:
        targets = spread_indices(rest.numel(), contextual).to(device)  # (c,) indices into rest
        space = features[visual[rest]] if pre is None else pre.to(device)[rest]  # (V - d, D or P)
        merged, assignment = merge_into_targets(space, keys.to(device)[rest], targets)  # (c, D or P), (V - d,)
        groups = (assignment, targets)
        if merge == "official":
            merged = _target_plus_member_mean(space, assignment, targets)  # (c, D or P)
        if pre is not None:
            merged = _projector(project)(merged.to(pre.dtype)).to(features.dtype)  # (c, D)
        token_parts.append(merged)
        source_parts.append(visual[rest[targets]])  # each contextual token is sourced at its target token
    tokens, source = torch.cat(token_parts), torch.cat(source_parts)  # (k, D), (k,)
    mixing = partial(_visionzip_mixing, span.length, cls is not None, visual[dom], visual[rest], groups, merge)
    if order == "official":
        image = CompressedImage(tokens, source, mixing=mixing)
    else:
        image = compose(span, features, tokens, source, mixing=mixing)
    return image, visual[dom].tolist()


def _visionzip_mixing(length: int, cls: bool, dominant: torch.Tensor, rest: torch.Tensor,
                      groups: tuple[torch.Tensor, torch.Tensor] | None, merge: str) -> torch.Tensor:
    """``(k, length)`` what each VisionZip token is made of, rows in :func:`visionzip_image`'s token order.

    [CLS] (no span position) has a zero row; a dominant patch is one-hot on itself; a contextual
    token has its merge's weights over its group: ``official``, one on its target plus the mean
    over the others that joined it; ``mean``, the mean over the whole group.
    """
    device = dominant.device
    parts = [torch.zeros(int(cls), length, device=device), torch.eye(length, device=device)[dominant]]
    if groups is not None:
        assignment, targets = groups  # (n,) target slot of each merged token, (c,) targets (indices into rest)
        c, n = targets.numel(), rest.numel()
        member = torch.zeros(c, n, device=device)  # (c, n) group membership over the merged tokens
        member[assignment, torch.arange(n, device=device)] = 1.0
        if merge == "official":
            member[torch.arange(c, device=device), targets] = 0.0
            weights = member / member.sum(1, keepdim=True).clamp(min=1)  # mean over the others
            weights[torch.arange(c, device=device), targets] = 1.0  # plus the target itself
        else:
            weights = member / member.sum(1, keepdim=True)
        contextual = torch.zeros(c, length, device=device)
        contextual[:, rest] = weights  # (c, length)
        parts.append(contextual)
    return torch.cat(parts)


@METHODS.register("visionzip")
class VisionZip(PreLLMMethod):
    """VisionZip: keep the tokens the vision tower's [CLS] attends to most, merge the rest into a few.

    Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models" (CVPR 2025, arXiv 2412.04467). Stage: before the LLM, training-free (the paper's
    optional projector fine-tuning is not done). Official code: github.com/dvlab-research/VisionZip
    at commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02; the defaults follow its LLaVA-1.5 path:

    * ``visionzip/main.py`` L5-7: ``dominant`` counts the [CLS] token (``dominant - 1`` patches);
    * ``visionzip/utils.py`` L10-89, L122-124, L191: eager CLIP attention of ``layers[-2]``
      (LLaVA's ``vision_feature_layer``) returns its attention and the head-averaged raw keys;
    * ``visionzip/clip_encoder.py`` L42-85: score = [CLS] row of that layer's attention over
      the patches, summed over heads (softmax over all tokens, [CLS] included); [CLS] + top
      ``dominant - 1`` patches kept in position order; the other patches (position order)
      merge into ``contextual`` tokens: targets every ``max(1, n // contextual)``-th of them
      (:func:`crop.ops.similarity.spread_indices`), every other one joins the target of
      highest cosine between L2-normalised keys (first maximum;
      :func:`crop.ops.similarity.merge_into_targets`), ``c_j = h[T_j] + mean(h[i], i in G_j)``
      on the layer's hidden states (``hidden_states[-2]``, before the projector); output
      ``[CLS, dominant patches, contextual tokens]``;
    * ``visionzip/llava_arch.py`` L31-35: the projector runs on all of them, and they enter
      the LLM in that order at consecutive positions.

    Here, attention, keys, [CLS] features and projector inputs are captured by transient hooks
    during the stock vision forward (:meth:`VLMAdapter.encode_images_with_saliency`), so SDPA
    stays on; dominant patches reuse the stock projected features (the projector is per-token).
    The [CLS] token has no placeholder: its ``source`` is ``CLS_SOURCE`` (-1), distinct from every
    span position; LLaVA gives the rebuilt prompt compact 1-D positions (sequence order), so no
    adapter reads it, and ``stats.full_resolution`` lists the dominant patches only.

    Deviations, and why:

    1. Precision: the [CLS] softmax is recomputed from the hooked q/k in fp32 and cosines use
       fp32 ``F.normalize`` (with eps); merging runs in fp32. The official code does all of it
       in the model dtype (fp16, eager) without eps, so near-ties may flip in top-k/argmax.
    2. Tie-breaking: a stable sort (the lower position wins); the official ``topk`` leaves
       ties unspecified.
    3. Guards: a budget >= the image's visual tokens keeps the stock inputs (bit-identical, so
       no [CLS]); ``contextual`` is clipped to ``budget - 1`` and to the tokens left (the official
       code divides by zero at ``contextual=0`` and fails when fewer tokens than targets remain).
    4. LLaVA-NeXT: one budget per image, one top-k and one merge over base view + high-res
       grid (per-tile [CLS] scores), no [CLS] passed on and image order (newlines follow their
       rows, positions are the packed layout). The official code gives every tile its own
       ``dominant + contextual`` and re-sorts (``llava_arch.py`` L42-80); ours keeps
       ``keep_tokens`` per image, like every other method here.
    5. Qwen2-VL/2.5-VL have no [CLS] token: the substitute ranking is the attention each merged
       token receives (mean over the image's patches, summed over heads) in the last
       full-attention vision block, with keys averaged over its 2x2 patches
       (:mod:`crop.models.qwen_vision_attention`); merging on the merger's normed inputs; image
       order, because M-RoPE positions come from each token's source cell. The paper has no
       Qwen variant.
    6. Batches: each image is compressed on its own, which is what the official batched tensor
       path computes row by row; any batch (several images, padding) works, while the official
       list path fails (``hidden_states_save`` unassigned, ``clip_encoder.py`` L85).

    ``VisionZipConfig(keep_cls=False, merge="mean", order="image")`` reproduces crop's earlier
    variant. Config: :class:`VisionZipConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`VisionZipConfig`.

    Raises:
        ValueError: if the adapter cannot report vision-tower saliency.
    """

    name = "visionzip"
    config_class = VisionZipConfig
    config: VisionZipConfig

    def __init__(self, adapter: VLMAdapter, config: VisionZipConfig) -> None:
        super().__init__(adapter, config)
        if type(adapter).encode_images_with_saliency is VLMAdapter.encode_images_with_saliency:
            raise ValueError(f"visionzip needs the vision tower's [CLS] attention (or a substitute), which "
                             f"{type(adapter).__name__} ({adapter.config.model_type}) does not provide; "
                             "every adapter crop ships provides one (see `crop methods` and docs/models.md)")


    def encode(self, inputs):
        return self.adapter.encode_images_with_saliency(inputs)

    def keeps_everything(self, spans):
        budget = self.config.keep_tokens
        return budget is None or all(budget >= s.visual_tokens for s in spans)

    def compress_image(self, encoded: VisionSaliency, span, box, image_index):
        budget = self.config.keep_tokens
        if budget is None or budget >= span.visual_tokens:  # no budget keeps every token (as keeps_everything)
            return keep_all(span, encoded.features)
        # the adapter hands over [CLS] only where tokens may be freely ordered (LLaVA-1.5)
        free = encoded.cls_pre_projector is not None and not span.grids
        dominant, contextual = self.config.split(budget)
        return visionzip_image(
            span, encoded.features, encoded.saliency, encoded.keys, dominant, contextual,
            pre=encoded.pre_projector, project=self.adapter.project_features,
            cls=encoded.cls_pre_projector if self.config.keep_cls else None,
            merge=self.config.merge, order=self.config.order if free else "image")
