"""CROP-self: CROP's ILP with the region taken from the answerer's own early attention (no localizer model).

CROP's cost is a second VLM that finds the region. Attention-based pruners (FastV) already read
where the text looks in the first layers but keep a scattered set of tokens; CROP's thesis is
that a contiguous region is better. CROP-self combines them, inside one prefill:

1. layers ``0..K-1`` run on the whole prompt, as in ILP; the queries/keys of those layers (or of
   layer K-1 alone) are captured by instance-level hooks (:class:`crop.methods.attention.QKCapture`,
   SDPA stays on);
2. at the input of layer K, the attention rows of the text after the image (every text token, or
   the last one) over the image's visual tokens are recomputed from the captures, averaged over
   heads, queries and layers, and summed per region-grid cell;
3. one contiguous box is chosen from the cell masses (:func:`crop.ops.attention_box.best_box`);
4. ILP keeps that box's tokens at layer K with the same budget policy as with a localizer's box
   (:mod:`crop.ops.selection`: trim or grow to ``keep_tokens``), and drops the rest.

The box lives on the view the model sees (for LLaVA-1.5 the centre crop of a non-square image);
it is recorded in the stats (:attr:`PruneStats.boxes`, flagged in :attr:`PruneStats.self_localized`).

Not done for PLC: PLC compresses before the LLM, so its box must be known before layer 0; the
answerer's attention exists only once the LLM has run, which would take a second pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from crop.config import CropILPConfig, CropSelfConfig
from crop.methods.attention import AttentionScoredMethod, QKCapture, attention_rows
from crop.methods.base import METHODS
from crop.methods.names import canonical_name
from crop.ops.attention_box import best_box, cell_mass


@METHODS.register("crop-self")
class CropSelf(AttentionScoredMethod):
    """CROP-ILP whose region is the box the answerer's own attention before layer K points at.

    Paper: the CROP paper (EMNLP 2025, arXiv 2505.21233) asks for training-free localizers in its
    limitations; this is our answer to it, not a method of the paper (see the module docstring).
    Stage: inside the LLM, once, at layer K, like ILP. Cost: the captured attention rows and the
    box search, counted in :meth:`selection_flops`; no localizer. Config: :class:`CropSelfConfig`.
    """

    name = "crop-self"
    config_class = CropSelfConfig
    config: CropSelfConfig

    def __init__(self, adapter, config) -> None:
        super().__init__(adapter, config)
        if config.attention_layers == "all":  # pool the attention of every layer before K
            self.captures = [QKCapture(adapter.attention_parts(k)) for k in range(config.layer)]


    def prepare(self, inputs, spans, boxes):
        prepared = super().prepare(inputs, spans, boxes)
        self._current_stats().self_localized = [True for _ in spans]
        return prepared

    def selection_flops(self, seq_len, n_in):
        """The recomputed attention rows (per-head q/k norms where the layer has them, RoPE, query-key products,
        softmax) per captured layer.

        The queries are the text tokens after the image (``"text"``) or the last one; the box
        search over the ``G^4`` boxes of the grid is a few thousand additions and is left out.
        """
        parts = self.captures[0].parts
        queries = 1 if self.config.queries == "last" else max(seq_len - n_in, 1)
        key_values = seq_len * parts.kv_heads * parts.head_dim  # key elements (all slots)
        query_values = queries * parts.heads * parts.head_dim  # query elements (the query slots)
        norms = 4 * (query_values * (parts.q_norm is not None) + key_values * (parts.k_norm is not None))  # RMSNorm
        rope = 3 * key_values + 3 * query_values
        scores = 2 * queries * seq_len * parts.heads * parts.head_dim
        softmax = 5 * queries * seq_len * parts.heads
        return len(self.captures) * (norms + rope + scores + softmax)

    def query_slots(self, valid: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the slots whose attention counts: the last real one, or every real one after the last image."""
        if self.config.queries == "last":
            return self.last_slots(valid)
        positions = torch.arange(valid.shape[1], device=valid.device)  # (L,)
        out = []
        for b, row in enumerate(valid):
            ends = [s.start + s.length for s in self._spans if s.sample == b]
            after = positions >= max(ends, default=0)
            slots = positions[row & after]
            out.append(slots if slots.numel() else self.last_slots(valid[b:b + 1])[0])
        return out

    def token_weights(self, hidden: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
        """Per sample, ``(L,)`` the attention each slot received: mean over heads, query slots and captured layers."""
        _, valid = self.slot_validity(0, hidden)  # (B, L)
        queries = self.query_slots(valid)
        cos, sin = layer_kwargs["position_embeddings"]  # (B|1, L, d) each; the same tables at every layer
        total = [torch.zeros(hidden.shape[1], device=hidden.device) for _ in queries]
        with torch.no_grad():
            for capture in self.captures:
                q, k = capture.take(hidden.shape[1])  # (B, L, H*d), (B, L, Hkv*d)
                rows = attention_rows(capture.parts, q, k, cos, sin, queries, valid)  # per b: (n_b, L)
                for b, r in enumerate(rows):
                    total[b] += r.mean(dim=0)
        return [t / len(self.captures) for t in total]

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        weights = self.token_weights(hidden, layer_kwargs)  # per sample: (L,)
        cfg, stats, out, image = self.config, self._current_stats(), [], 0
        for b, per_sample in enumerate(candidates):
            for slots in per_sample:
                span = self._spans[image]
                grids = [(g.rows, g.cols) for g in span.token_grids]
                visual = span.visual_positions()  # (V,) sorted span positions, the candidates' order
                slot_weights = weights[b][slots.to(weights[b].device)]  # (V,) candidates' order
                # cell_mass reads the grids one after the other, each row-major: the span order except where a
                # grid's rows are not contiguous in the span (InternVL's stitched tiles); reordered only then
                # (the positions are host tensors: the check costs no device sync)
                in_grids = torch.cat([g.positions() for g in span.token_grids])  # (V,) span positions, grid order
                if not torch.equal(in_grids, visual):
                    grid_order = torch.searchsorted(visual, in_grids)  # (V,)
                    slot_weights = slot_weights[grid_order.to(slot_weights.device)]
                mass = cell_mass(slot_weights, grids, cfg.grid)  # (G, G)
                box = best_box(mass, cfg.rule, cfg.price, cfg.share)
                chosen = self.adapter.select(span, box, cfg.keep_tokens, cfg.trim)  # (k,) span positions
                out.append(torch.searchsorted(visual, chosen.cpu()))  # (k,) indices into the candidates
                stats.boxes[image] = box
                stats.region_tokens[image] = int(chosen.numel())
                image += 1
        return out


def self_localized_name(method: str) -> str:
    """What ``method`` runs as when the localizer is ``self``: the one home of that rule.

    CROP's ILP becomes CROP-self (the answerer's own attention before layer K picks the box);
    CROP-self stays itself; region-free methods run unchanged (they never read the box).

    Raises:
        ValueError: for a method that needs the region before the LLM runs (CROP's PLC), which
            the answerer's own attention cannot give without a second pass; or an unknown name.
    """
    name = canonical_name(method)
    if name == CropILPConfig.method_name:
        return CropSelfConfig.method_name
    if name != CropSelfConfig.method_name and METHODS.get(name).uses_region:
        raise ValueError(f"{name} needs the region before the LLM runs, but the 'self' localizer finds it inside the "
                         "answerer's prefill (a second pass would be needed); use another localizer, or crop-ilp / "
                         "crop-self with --localizer self")
    return name


def for_self_localizer(config: Any, choices: Mapping[str, Any] | None = None) -> Any:
    """The config to run when the localizer is ``self`` (:func:`self_localized_name` applied to a config).

    An ILP config becomes the CROP-self config with the same budget, layer, grid and trim, plus
    ``choices`` (e.g. ``{"rule": "share"}``); a CROP-self config takes ``choices``; other
    configs are returned unchanged.

    Raises:
        ValueError: as :func:`self_localized_name`.
    """
    target = self_localized_name(config.method_name)
    if isinstance(config, CropILPConfig) and target == CropSelfConfig.method_name:
        return CropSelfConfig.from_ilp(config, **dict(choices or {}))
    if isinstance(config, CropSelfConfig) and choices:
        return dataclasses.replace(config, **choices)
    return config
