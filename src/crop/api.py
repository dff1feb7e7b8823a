"""The one reversible entry point: ``apply_crop(model, config)`` -> :class:`CropHandle`.

Typical use::

    with apply_crop(model, CropConfig(method="ilp", keep_tokens=64)) as crop:
        batch = crop.prepare(processor(images=img, text=prompt, return_tensors="pt"), [GridBox(2, 2, 5, 5)])
        out = model.generate(**batch, max_new_tokens=16)
        print(crop.stats.visual_tokens_kept)

``prepare`` maps each image's region onto its visual tokens and returns the inputs to run
(unchanged for ILP, which prunes inside the LLM through hooks; rebuilt with fewer visual
tokens for PLC). Leaving the ``with`` block (or ``remove()``) detaches every hook: the
model is then bit-identical to one CROP never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crop.config import CropConfig
from crop.methods import plc
from crop.methods.ilp import InnerLLMPruner
from crop.models.base import VLMAdapter, get_adapter
from crop.regions import GridBox


@dataclass
class PruneStats:
    """Token accounting of one prepared prompt (one entry per image unless noted).

    Attributes:
        visual_tokens_in: visual tokens the vision tower produced.
        visual_tokens_kept: per stage, visual tokens that went on: ``"llm_input"`` (reached
            the LLM) and, for ILP, ``"after_layer_K"`` (survived layer K).
        region_tokens: tokens the region (after budget trimming/growth) covers at full resolution.
        boxes: the region used for each image.
        token_grids: ``(rows, cols)`` of each image's token grid.
        full_resolution: per image, row-major indices of the tokens kept at full resolution
            (ILP: the survivors of layer K; PLC: the region share, the rest is pooled).
    """

    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_kept: dict[str, list[int]] = field(default_factory=dict)
    region_tokens: list[int] = field(default_factory=list)
    boxes: list[GridBox] = field(default_factory=list)
    token_grids: list[tuple[int, int]] = field(default_factory=list)
    full_resolution: list[list[int]] = field(default_factory=list)


class CropHandle:
    """CROP applied to one model instance; remove it with :meth:`remove` or by leaving ``with``.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: what to do.
        adapter: the model's adapter (found from ``model.config.model_type`` if omitted).
    """

    def __init__(self, model: nn.Module, config: CropConfig, adapter: VLMAdapter | None = None) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter or get_adapter(model)
        self.stats: PruneStats | None = None
        self._pruner: InnerLLMPruner | None = None
        if config.method == "ilp":
            layers = self.adapter.decoder_layers()
            if config.layer >= len(layers):
                raise ValueError(f"layer {config.layer} is outside the model's depth: ILP needs 1 <= layer <= "
                                 f"{len(layers) - 1} for this {len(layers)}-layer language model")
            self._pruner = InnerLLMPruner(layers, config.layer, eager=self.adapter.uses_eager_attention)
            self._pruner.attach()

    def prepare(self, inputs: Mapping[str, Any], boxes: Sequence[GridBox | None]) -> dict[str, Any]:
        """Map regions to visual tokens and return the inputs to run the model on.

        Args:
            inputs: processor output for a batch (``input_ids``, ``attention_mask``, pixels ...).
            boxes: one region per image, in the order the images appear; ``None`` = full image.

        Returns:
            Keyword arguments for ``model(**...)`` or ``model.generate(**...)``.

        Raises:
            ValueError: if the number of boxes does not match the images, or a box is on another grid.
        """
        spans = self.adapter.image_spans(inputs)
        if len(boxes) != len(spans):
            raise ValueError(f"got {len(boxes)} boxes for {len(spans)} images in the batch")
        regions = [GridBox.full(self.config.grid) if b is None else b for b in boxes]
        for box in regions:
            if box.grid != self.config.grid:
                raise ValueError(f"box {box} is on a {box.grid}x{box.grid} grid but the config says {self.config.grid}")
        stats = PruneStats(visual_tokens_in=[s.visual_tokens for s in spans], boxes=regions,
                           token_grids=[(s.rows, s.cols) for s in spans],
                           full_resolution=[s.visual_positions().tolist() for s in spans])
        budget = self.config.keep_tokens
        if self.config.method == "plc":
            out, spans, images, region_keep = plc.compress(self.adapter, inputs, regions, budget, self.config.pool)
            stats.visual_tokens_kept["llm_input"] = [im.visual_tokens for im in images]
            stats.full_resolution = [k.tolist() for k in region_keep]
            stats.region_tokens = [len(k) for k in stats.full_resolution]
            self.stats = stats
            return out
        out = dict(inputs)
        stats.visual_tokens_kept["llm_input"] = list(stats.visual_tokens_in)
        if self.config.method == "none":
            stats.region_tokens = list(stats.visual_tokens_in)
            self.stats = stats
            return out
        keep = self._ilp_keep(inputs, spans, regions, budget, stats)
        if self._pruner is None:
            raise RuntimeError("this CropHandle was removed; apply CROP again")
        self._pruner.arm(keep, int(inputs["input_ids"].shape[1]))
        self.stats = stats
        return out

    def _ilp_keep(self, inputs: Mapping[str, Any], spans, regions, budget, stats: PruneStats) -> list[torch.Tensor]:
        """Per sample, the prompt positions that survive layer K: every non-visual one + the selected visual ones."""
        ids = inputs["input_ids"]  # (B, L)
        keep_mask = torch.ones_like(ids, dtype=torch.bool)  # (B, L)
        kept_counts = []
        stats.full_resolution = []
        for span, box in zip(spans, regions, strict=True):
            chosen = self.adapter.select(span, box, budget)  # indices within the span
            keep_mask[span.sample, span.start:span.start + span.length] = False
            keep_mask[span.sample, span.start + chosen] = True
            keep_mask[span.sample, span.start + span.structure_positions(chosen)] = True  # e.g. newlines of kept rows
            kept_counts.append(int(chosen.numel()))
            stats.full_resolution.append(chosen.tolist())
        stats.visual_tokens_kept[f"after_layer_{self.config.layer}"] = kept_counts
        stats.region_tokens = kept_counts
        return [row.nonzero().squeeze(1) for row in keep_mask]

    def remove(self) -> None:
        """Detach every hook; safe to call twice."""
        if self._pruner is not None:
            self._pruner.detach()
            self._pruner = None

    def __enter__(self) -> CropHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_crop(model: nn.Module, config: CropConfig | None = None) -> CropHandle:
    """Apply CROP to ``model`` (in place, reversibly) and return the handle.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: defaults to ``CropConfig()`` (ILP at layer 2, the region's tokens only).

    Returns:
        A :class:`CropHandle`; use its ``prepare`` before each forward/generate call.
    """
    return CropHandle(model, config or CropConfig())
