"""CROP's trained PLC: the region's tokens as anchors + a trained compressor's tokens, before the LLM.

Per image, ``keep_tokens`` tokens reach the LLM: ``A`` anchors ``X_r`` (the region's own tokens at
full resolution, chosen and trimmed/grown as CROP-ILP chooses its tokens) and ``M`` tokens made
by a trained :class:`crop.compressor.RegionCompressor` whose queries read the tokens outside the
anchors (or all of them). Every token is placed at its source in the image's span (anchors at
their own position, a compressed token at the token it draws most from), sorted, so LLaVA's
sequence order and Qwen's M-RoPE positions follow one rule; LLaVA-NeXT's row newlines go with
the rows that hold a source. Config: :class:`crop.config.CropPLCTrainedConfig`.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from crop.compressor import (
    RegionCompressor,
    compressor_flops,
    grid_coordinates,
    load_compressor,
    read_compressor_config,
)
from crop.config import CropPLCTrainedConfig
from crop.methods.base import METHODS, PreLLMMethod
from crop.models.base import CompressedImage, ImageSpan

logger = logging.getLogger(__name__)

DEFAULT_COMPRESSOR = Path(__file__).resolve().parent.parent / "embedded" / "weights" / "plc-compressor"


def split_budget(config: CropPLCTrainedConfig, max_queries: int) -> tuple[int, int]:
    """``(anchors A, compressed M)`` for the config's ``keep_tokens``: ``A + M == keep_tokens``.

    Raises:
        ValueError: without ``keep_tokens``, or when the compressor makes too few tokens without anchors.
    """
    keep = config.keep_tokens
    if keep is None:
        raise ValueError("the trained PLC needs keep_tokens (anchors + compressed tokens per image)")
    if not config.anchors:
        count = keep
    else:
        count = max(1, round(config.context_share * keep))
    if count > max_queries:
        if not config.anchors:
            raise ValueError(f"without anchors every one of the {keep} tokens is compressed, but this compressor "
                             f"makes at most {max_queries}; train one with more queries or lower keep_tokens")
        count = max_queries
    return keep - count, count


@METHODS.register("crop-plc-trained")
class CropPLCTrained(PreLLMMethod):
    """CROP's trained pre-LLM compression: region anchors + learnable-query tokens.

    Paper: Contextual Region-Oriented Visual Token Pruning, EMNLP 2025 (arXiv 2505.21233),
    section 3 (PLC with learnable queries; the region's tokens kept as anchors, Table 6). The
    paper's compressor and recipe were not released; ours is described in :mod:`crop.compressor`
    and trained by ``crop train plc`` (the answerer frozen). Stage: before the LLM.
    """

    name = "crop-plc-trained"
    config_class = CropPLCTrainedConfig
    config: CropPLCTrainedConfig
    uses_region = True

    def __init__(self, adapter, config) -> None:
        super().__init__(adapter, config)
        self._compressor: RegionCompressor | None = None
        self.compressor_meta: dict = {}

    @property
    def compressor(self) -> RegionCompressor:
        """The trained compressor, loaded on first use (planning a budget needs no weights).

        Raises:
            ValueError: if there is none at the config's folder, or it belongs to another answerer.
        """
        if self._compressor is None:
            folder = self.config.compressor or DEFAULT_COMPRESSOR
            try:
                compressor, meta = load_compressor(folder)
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None
            dim = self.adapter.text_config.hidden_size
            if compressor.config.dim != dim:
                raise ValueError(f"the compressor in {folder} makes {compressor.config.dim}-dim tokens but this "
                                 f"model's LLM reads {dim}-dim ones: a compressor belongs to the answerer it was "
                                 "trained for")
            self._compressor = compressor.to(next(self.adapter.model.parameters()).device)
            self.compressor_meta = meta
            _warn_on_other_setting(folder, meta, self.config)
        return self._compressor


    def compress_image(self, features, span, box, image_index):
        return compress_with(self.compressor, self.adapter, self.config, features, span, box)

    def selection_flops(self, seq_len, n_in):
        """The compressor's forward for one image of ``n_in`` tokens (:func:`crop.compressor.compressor_flops`).

        Anchors are chosen by the region rule and cost nothing; the ``M`` compressed tokens cost
        the keys over every token, the query-key products, the softmax, the mix and the MLP.
        """
        if self._compressor is not None:
            config = self._compressor.config
        else:  # planning a budget: the sizes are enough
            try:
                config = read_compressor_config(self.config.compressor or DEFAULT_COMPRESSOR)
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None
        _, count = split_budget(self.config, config.max_queries)
        return compressor_flops(config, n_in, count)


def _warn_on_other_setting(folder, meta: dict, config: CropPLCTrainedConfig) -> None:
    """Warn when the config's split or queries differ from those the compressor was trained with.

    A compressor trained without anchors, or with queries over all tokens, still runs under
    another setting, but its tokens were never trained for it: the answers may silently degrade.
    """
    trained = meta.get("method", {})
    differ = [f"{key}={getattr(config, key)!r} (trained with {trained[key]!r})"
              for key in ("anchors", "attend", "context_share") if key in trained and trained[key] != getattr(config, key)]
    if differ:
        logger.warning("the compressor in %s runs with %s: pass the setting it was trained with "
                       "(--option KEY=VALUE) unless this is deliberate", folder, ", ".join(differ))


def compress_with(compressor: RegionCompressor, adapter, config: CropPLCTrainedConfig, features: torch.Tensor,
                  span: ImageSpan, box) -> tuple[CompressedImage, list[int]]:
    """One image through the trained PLC (differentiable in the compressor; used by the method and its training).

    Args:
        compressor: the trained (or training) compressor.
        adapter: the model's adapter (its ``select`` picks the anchors).
        config: the method's config.
        features: ``(span.length, D)`` the image's features as the LLM would receive them.
        span: the image's span.
        box: the region.

    Returns:
        The compressed image and the span positions of the anchors.
    """
    n_anchor, count = split_budget(config, compressor.config.max_queries)
    visual = span.visual_positions().to(features.device)  # (V,) span positions of the visual tokens
    anchors = adapter.select(span, box, n_anchor).to(features.device) if n_anchor > 0 else \
        torch.empty(0, dtype=torch.long, device=features.device)  # (A,) span positions
    is_anchor = torch.isin(visual, anchors)  # (V,)
    # "outside": the queries read what the anchors do not already give (everything when there are none)
    outside = config.attend == "outside" and bool(is_anchor.any()) and not bool(is_anchor.all())
    attend = ~is_anchor if outside else None
    coords = grid_coordinates([(g.rows, g.cols) for g in span.token_grids])  # (V, 2) grid after grid, row-major
    # to the visual (span) order; the same order except where a grid's rows are not contiguous (InternVL's tiles)
    coords = coords[torch.cat([g.positions() for g in span.token_grids]).argsort()].to(features.device)  # (V, 2)
    made, weights = compressor(features[visual], coords, count, attend)  # (M, D), (M, V)
    made_source = visual[weights.argmax(dim=-1)]  # (M,) the token each one draws most from
    sources = torch.cat([anchors, made_source])  # (A + M,)
    tokens = torch.cat([features[anchors], made])  # (A + M, D)
    structure = span.structure_positions(sources.cpu()).to(features.device)  # (s,) newlines of live rows
    source = torch.cat([sources, structure])
    order = torch.argsort(source, stable=True)  # anchors before a compressed token drawn from the same spot
    image = CompressedImage(torch.cat([tokens, features[structure]])[order], source[order],
                            structure=int(structure.numel()),
                            mixing=partial(_compressor_mixing, span.length, anchors, visual, weights.detach(),
                                           structure, order))
    return image, anchors.tolist()


def _compressor_mixing(length: int, anchors: torch.Tensor, visual: torch.Tensor, weights: torch.Tensor,
                       structure: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``(A + M + s, length)`` what each token of :func:`compress_with` is made of, in its token order.

    Anchors and structure tokens are one-hot on themselves; a compressed token has the
    compressor's attention weights over the visual tokens it read (its MLP comes after the mix).
    """
    device = weights.device
    eye = torch.eye(length, device=device)
    made = torch.zeros(weights.shape[0], length, device=device)
    made[:, visual] = weights.float()  # (M, length)
    return torch.cat([eye[anchors], made, eye[structure]])[order]
