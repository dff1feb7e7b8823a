"""HoloV: spread the budget over spatial crops by their attention (holistic), keep each crop's most attended tokens, before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.config import ConfigMixin, check_keep_tokens
from crop.methods._compose import compose, keep_all
from crop.methods.base import METHODS, PreLLMMethod
from crop.models.base import CompressedImage, ImageSpan, VisionSaliency, VLMAdapter

OVERFLOWS = ("pad", "fill")
ORDERS = ("official", "image")
PAD_SOURCE = -1  # a zero padding token's CompressedImage.source: it stands for no image token
ATTENTION_SCALE = 1e3  # the official ``patch_attn * 1e3`` (a constant: it only weighs against the 1e-6 guards)
EPS = 1e-6  # the official ``esp``: in the feature norm, the variance rescaling and the crop weights
# the official Qwen2.5-VL script's crop count: max(1, int(QWEN_CROPS_PER_TOKEN * tokens / keep)) (16 at 64 of 576)
QWEN_CROPS_PER_TOKEN = 1024 / 576


@dataclass
class HoloVConfig(ConfigMixin):
    """Config of HoloV (defaults: the official LLaVA-1.5 rule; see :class:`HoloV`).

    Args:
        keep_tokens: visual tokens per image that reach the LLM (the official
            ``new_image_token_num``); ``None`` keeps every token.
        regions: the number of crops the image's visual tokens are cut into (the official
            ``num_patches``: 16 on LLaVA-1.5). ``None``: the official Qwen2.5-VL script's
            budget-dependent count ``max(1, int(1024 / 576 * tokens / keep_tokens))``
            (16 / 8 / 5 crops at 64 / 128 / 192 of 576).
        alpha: weight of the similarity-variance term in a token's score (official ``0.09``,
            the ``alpha`` of the LLaVA code and ``beta`` of the Qwen2.5-VL code); ``>= 0``.
        overflow: what happens to budget a crop cannot use (allocated more tokens than it holds).
            ``"pad"`` (official): it is lost and the image is padded with zero tokens up to
            ``keep_tokens``; only where the adapter lets tokens be laid out freely (LLaVA-1.5),
            elsewhere ``"fill"`` is used. ``"fill"``: the image's most attended tokens not yet kept
            take it, so every token reaching the LLM is an image token.
        order: ``"official"``: crop after crop; a crop kept whole in position order, the others
            by decreasing attention; padding (or fill) last; at consecutive LM positions. Only
            LLaVA-1.5 (one plain grid, 1-D positions) can take it, the others always use
            ``"image"``: the kept tokens in image order (padding, if any, after them).

    Raises:
        ValueError: on an invalid field.
    """

    keep_tokens: int | None = 64
    regions: int | None = 16
    alpha: float = 0.09
    overflow: str = "pad"
    order: str = "official"
    method_name: ClassVar[str] = "holov"

    def __post_init__(self) -> None:
        check_keep_tokens(self.keep_tokens)
        if self.regions is not None and (isinstance(self.regions, bool) or not isinstance(self.regions, int)
                                         or self.regions < 1):
            raise ValueError(f"regions must be an int >= 1 or None, got {self.regions!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.overflow not in OVERFLOWS:
            raise ValueError(f"unknown overflow {self.overflow!r}; choose one of {', '.join(OVERFLOWS)}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")

    def crops(self, tokens: int, keep: int) -> int:
        """How many crops an image of ``tokens`` visual tokens is cut into at a budget of ``keep`` (non-empty ones)."""
        wanted = self.regions if self.regions is not None else max(1, int(QWEN_CROPS_PER_TOKEN * tokens / keep))
        return min(wanted, tokens)


def crop_sizes(tokens: int, crops: int) -> list[int]:
    """Sizes of the ``crops`` consecutive crops of ``tokens`` tokens: the first ``tokens % crops`` one larger.

    The official split (``utils.py`` L32-50): runs of ``tokens // crops`` tokens in sequence
    order, the remainder spread one token each over the first crops.
    """
    size, extra = divmod(tokens, crops)
    return [size + (c < extra) for c in range(crops)]


def holov_select(tokens: torch.Tensor, attention: torch.Tensor, keep: int, crops: int, alpha: float = 0.09,
                 overflow: str = "pad") -> torch.Tensor:
    """The HoloV choice of ``keep`` of an image's visual tokens, in the official output order.

    1. The ``n`` tokens are cut into ``crops`` runs of consecutive tokens (:func:`crop_sizes`).
    2. In a crop of ``m >= 2`` tokens, token ``i`` scores
       ``s_i = 1e3 a_i + alpha * v_i * mean(1e3 |a|) / (mean |v| + 1e-6)``, where ``a`` is the
       attention and ``v_i`` the variance of token ``i``'s row of the crop's cosine-similarity matrix
       with a zeroed diagonal (``sum_j (S_ij - mean_i)^2 / (m - 1)``, ``mean_i`` the mean of its
       ``m - 1`` off-diagonal entries; the zero diagonal counts in the sum, as in the official code).
       The crop's score is the mean of its ``s_i``; a one-token crop scores its raw attention.
    3. The budget is split by the crops' shares of the total score: ``floor(w_c * keep)`` each,
       one more for the ``keep - sum`` crops of largest share.
    4. A crop given at least its size keeps all its tokens (position order), the others their
       most attended tokens (by decreasing attention). Budget a crop could not use is lost:
       ``overflow="pad"`` pads with ``-1`` (zero tokens), ``"fill"`` gives it to the most attended
       tokens left (by decreasing attention).

    Everything stays on the tokens' device: no value is read back to the host.

    Args:
        tokens: ``(n, D)`` the visual tokens as the LLM receives them (similarities are computed
            on them, in fp32).
        attention: ``(n,)`` how much attention each receives (the official [CLS] attention).
        keep: tokens to output, ``1 <= keep < n``.
        crops: crops to cut the tokens into, ``1 <= crops <= n``.
        alpha: weight of the similarity-variance term.
        overflow: ``"pad"`` or ``"fill"``.

    Returns:
        ``(keep,)`` indices into ``range(n)`` in the official output order (crop after crop), ``-1``
        for a padding slot (only with ``overflow="pad"``, always last).

    Raises:
        ValueError: on ``keep``/``crops`` out of range or an unknown ``overflow``.
    """
    n, device = tokens.shape[0], tokens.device
    if not 1 <= keep < n or not 1 <= crops <= n:
        raise ValueError(f"need 1 <= keep < n and 1 <= crops <= n, got keep={keep}, crops={crops}, n={n}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"unknown overflow {overflow!r}; choose one of {', '.join(OVERFLOWS)}")
    size, extra = divmod(n, crops)
    width = size + (extra > 0)
    crop = torch.arange(crops, device=device)  # (C,)
    sizes = size + (crop < extra).long()  # (C,)
    starts = crop * size + crop.clamp(max=extra)  # (C,)
    slot = torch.arange(width, device=device)  # (W,)
    valid = slot < sizes[:, None]  # (C, W) the crop's own tokens (a short crop's last slot is padding)
    index = (starts[:, None] + slot).clamp(max=n - 1)  # (C, W) token index of each slot
    att = attention.to(device, torch.float32)[index] * valid  # (C, W)

    x = tokens.float()[index]  # (C, W, D)
    unit = x / (x.norm(dim=-1, keepdim=True) + EPS)  # (C, W, D)
    pair = valid[:, :, None] & valid[:, None, :]  # (C, W, W) both slots real
    off = pair & ~torch.eye(width, dtype=torch.bool, device=device)  # (C, W, W) and not the diagonal
    sim = (unit @ unit.transpose(1, 2)) * off  # (C, W, W) S with a zeroed diagonal, within the crop
    rows = (sizes - 1).clamp(min=1).float()[:, None]  # (C, 1) the official ``valid_entries``
    mean = sim.sum(-1) / rows  # (C, W)
    var = ((sim - mean[..., None]) ** 2 * pair).sum(-1) / rows  # (C, W) the diagonal's zero included
    count = sizes.float()  # (C,)
    scaled = att * ATTENTION_SCALE  # (C, W)
    rescale = (scaled.abs().sum(1) / count) / ((var.abs() * valid).sum(1) / count + EPS)  # (C,)
    score = scaled + alpha * var * rescale[:, None]  # (C, W) per-token scores
    crop_score = (score * valid).sum(1) / count  # (C,)
    crop_score = torch.where(sizes > 1, crop_score, att[:, 0])  # a one-token crop: its raw attention

    weight = crop_score / (crop_score.sum() + EPS)  # (C,)
    given = (weight * keep).floor().long()  # (C,)
    by_weight = torch.sort(weight, descending=True, stable=True).indices  # (C,)
    weight_rank = torch.empty_like(by_weight).scatter_(0, by_weight, crop)  # (C,) 0 = largest share
    given = given + (weight_rank < keep - given.sum()).long()  # the remainder: one each, largest shares first
    take = torch.minimum(given, sizes)  # (C,) tokens the crop really keeps
    whole = given >= sizes  # (C,) kept whole, in position order

    ranked = torch.sort(att.masked_fill(~valid, -torch.inf), dim=1, descending=True, stable=True).indices  # (C, W)
    att_rank = torch.empty_like(ranked).scatter_(1, ranked, slot.expand(crops, -1))  # (C, W) 0 = most attended
    chosen = valid & (att_rank < take[:, None])  # (C, W)
    within = torch.where(whole[:, None], slot, att_rank)  # (C, W) order inside the crop
    key = crop[:, None] * width + within  # (C, W) chosen slots first, crop after crop
    past = crops * width
    if overflow == "fill":  # then the rest by decreasing attention, so the first ``keep`` fill the budget
        by_att = torch.sort(attention.to(device, torch.float32), descending=True, stable=True).indices  # (n,)
        global_rank = torch.empty_like(by_att).scatter_(0, by_att, torch.arange(n, device=device))  # (n,)
        rest = past + global_rank[index]
    else:
        rest = torch.full_like(key, past)
    key = torch.where(chosen, key, torch.where(valid, rest, past + n))  # (C, W)
    order = torch.sort(key.flatten(), stable=True).indices[:keep]  # (keep,) slots in output order
    picked = index.flatten()[order]  # (keep,)
    if overflow == "pad":
        picked = torch.where(chosen.flatten()[order], picked, PAD_SOURCE)  # lost budget: padding, last
    return picked


def _pad_mixing(length: int, source: torch.Tensor) -> torch.Tensor:
    """``(M, length)`` one-hot rows on each token's source; a padding token (``PAD_SOURCE``) has a zero row."""
    real = source >= 0  # (M,)
    weights = torch.zeros(source.numel(), length, device=source.device)  # (M, length)
    weights[real.nonzero().squeeze(1), source[real]] = 1.0
    return weights


@METHODS.register("holov")
class HoloV(PreLLMMethod):
    """HoloV: allocate the budget across spatial crops by their attention, keep each crop's most attended tokens.

    Paper: Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic
    Context Retention" (HoloV, NeurIPS 2025, arXiv 2510.02912). Stage: before the LLM,
    training-free, question-independent. Official code: github.com/obananas/HoloV at commit
    1d2e65e961e698ff0e7d5bb4625489177dd9deba; the defaults follow its LLaVA-1.5 path:

    * ``llava/model/multimodal_encoder/clip_encoder.py`` L35-63: the vision tower returns the
      ``mm_vision_select_layer`` (-2) hidden states and that layer's attention, [CLS] row over the
      patches (eager ``output_attentions``, softmax over [CLS] + patches);
    * ``llava/model/llava_arch.py`` L141-145: the attention is averaged over heads and the
      features go through the projector; L239: ``HoloV(image_features, image_attns,
      num_patches=16, new_image_token_num=64)`` on the projected features, before the LLM;
    * ``llava/model/utils.py`` L22-151 (:func:`holov_select`): the 576 tokens are cut into 16
      crops of consecutive tokens (L32-50); per crop, each token's score is its attention (x1e3)
      plus ``alpha = 0.09`` times the variance of its row of the crop's cosine-similarity matrix,
      rescaled to the attention's mean magnitude (L67-92); the crop's score is the mean (L95);
      crops get ``floor(share * 64)`` tokens, the remainder one each to the largest shares
      (L103-112); a crop keeps its top-attention tokens, or all of them if given at least its
      size (L115-127); the output is crop after crop, zero-padded up to 64 (L130-146).
      Selection within a crop ranks by attention alone (L126), and as the variance term is
      rescaled per crop to the attention's mean magnitude (L87-89), a crop's score is
      ``1e3 * mean(a) * (1 + alpha * r)`` with ``r = mean(v) / (mean(v) + 1e-6)``, nearly 1 for every
      crop: in the official code the shares follow the crops' mean attention to within the
      ``1e-6`` guard, and the similarity term barely moves them.

    Here the [CLS] attention is recomputed from hooked q/k during the stock vision forward
    (:meth:`VLMAdapter.encode_images_with_saliency`, as for VisionZip), so SDPA stays on.

    Deviations, and why (each an option where it is a choice):

    1. Budget beyond a crop's size (``overflow``): the official code drops it and pads the image
       with zero tokens (L138-143), which crop reproduces on LLaVA-1.5 (``"pad"``: the padding
       tokens have ``source == PAD_SOURCE``, -1, they count as visual tokens reaching the LLM, and
       ``stats.full_resolution`` lists only real tokens). Adapters with a fixed token layout
       (LLaVA-NeXT, Qwen) have no place for a token of no image position, so there the
       surplus goes to the most attended tokens left (``"fill"``, also selectable on LLaVA-1.5).
    2. Order (``order``): official on LLaVA-1.5 (crop after crop, partial crops by decreasing
       attention, consecutive positions); ``"image"`` sorts the kept tokens by position. Other
       adapters always use image order (LLaVA-NeXT's newlines follow their rows; Qwen's M-RoPE
       positions come from each token's own cell).
    3. Budgets other than 64: the official LLaVA code hard-codes 16 crops and 64 tokens; crop
       keeps 16 crops at any budget (``regions``), and ``regions=None`` takes the crop count of
       the official Qwen2.5-VL script (``qwen-model-HoloV/modeling_qwen2_5_vl.py`` L1912-1917:
       ``max(1, int(1024 / 576 * tokens / keep))``; 16 at 64 of 576).
    4. Precision and ties: similarities, variances and scores in fp32 (the official code runs them
       in the model's fp16, its attention is cast to fp16 before the head mean); stable sorts, so
       ties go to the lower position or crop (the official ``topk`` leaves them unspecified). The
       adapter sums the attention over heads where the official code averages it: a constant
       factor that every step but the ``1e-6`` guard of the crop weights cancels.
    5. Qwen2-VL/2.5-VL/3-VL have no [CLS] token: the attention each merged token receives in the
       last full-attention vision block (mean over the image's patches, summed over heads and
       over its ``merge x merge`` patches), VisionZip's substitute here. The official Qwen2.5-VL
       code (``modeling_qwen2_5_vl.py`` L584-612) uses the same signal from the last block
       (mean over heads and queries, averaged over the merged patches) but leaves it in the
       tower's window order while the features are put back in image order (L602-603); crop
       aligns the two. On Qwen3-VL a kept token carries its own DeepStack features.
    6. LLaVA-NeXT: one HoloV per image over all its visual tokens, base view then the unpadded
       high-resolution grid, newlines excluded: the official LLaVA code's concatenation
       (``llava_arch.py`` L169-208, newline commented out), whose batched call on it would
       fail on a ragged batch. Crops are consecutive runs of that order.
    7. Batches: each image on its own, as the official per-row loop (L28); a budget at or above
       an image's visual tokens (or ``None``) keeps the stock inputs (bit-identical).

    Config: :class:`HoloVConfig`.

    Args:
        adapter: the model's adapter.
        config: a :class:`HoloVConfig`.

    Raises:
        ValueError: if the adapter cannot report vision-tower saliency.
    """

    name = "holov"
    config_class = HoloVConfig
    config: HoloVConfig

    def __init__(self, adapter: VLMAdapter, config: HoloVConfig) -> None:
        super().__init__(adapter, config)
        if type(adapter).encode_images_with_saliency is VLMAdapter.encode_images_with_saliency:
            raise ValueError(f"holov needs the vision tower's [CLS] attention (or a substitute), which "
                             f"{type(adapter).__name__} ({adapter.config.model_type}) does not provide")

    def encode(self, inputs):
        return self.adapter.encode_images_with_saliency(inputs)

    def keeps_everything(self, spans):
        budget = self.config.keep_tokens
        return budget is None or all(budget >= s.visual_tokens for s in spans)

    def selection_flops(self, seq_len, n_in):
        """Normalising the ``n_in`` tokens, each crop's cosine-similarity matrix and its row means and variances."""
        keep = self.config.keep_tokens
        if keep is None or keep >= n_in:
            return 0
        width = int(self.adapter.text_config.hidden_size)  # the tokens are projected to the LM's width
        pairs = sum(m * m for m in crop_sizes(n_in, self.config.crops(n_in, keep)))
        return 3 * n_in * width + (2 * width + 6) * pairs + 8 * n_in

    def compress_image(self, encoded: VisionSaliency, span: ImageSpan, box, image_index):
        budget = self.config.keep_tokens
        if budget is None or budget >= span.visual_tokens:  # as keeps_everything
            return keep_all(span, encoded.features)
        features = encoded.features
        device = features.device
        free = encoded.cls_pre_projector is not None and not span.grids  # LLaVA-1.5: tokens laid out freely
        overflow = self.config.overflow if free else "fill"
        visual = span.visual_positions().to(device)  # (V,)
        crops = self.config.crops(span.visual_tokens, budget)
        picked = holov_select(features[visual], encoded.saliency, budget, crops, self.config.alpha,
                              overflow)  # (k,) indices into visual order, -1: padding
        real = picked >= 0  # (k,)
        source = torch.where(real, visual[picked.clamp(min=0)], PAD_SOURCE)  # (k,) span positions
        kept = [p for p in source.sort().values.tolist() if p >= 0]
        if not free:
            ordered = source.sort().values  # (k,) every one real ("fill")
            return compose(span, features, features[ordered], ordered), kept
        if self.config.order == "image":  # real tokens by position, padding (-1) after them
            source = source[torch.sort(torch.where(real, source, span.length)).indices]  # (k,)
        tokens = torch.where((source >= 0)[:, None], features[source.clamp(min=0)], 0)  # (k, D) padding: zeros
        length = span.length
        return CompressedImage(tokens, source, mixing=lambda: _pad_mixing(length, source)), kept
