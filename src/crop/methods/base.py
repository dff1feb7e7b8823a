"""The method protocol: every pruning method (CROP and the baselines) is one small class.

A method is built from a model's adapter and its config, attaches instance-level hooks if it
acts inside the LLM, and turns each batch of processor inputs into the inputs to run
(``prepare``), recording its token accounting in :class:`PruneStats`. Methods register under
a lower-case name in :data:`METHODS`; :func:`method_for` finds the class for a config.

Two shared bases cover the stages:

- :class:`PreLLMMethod`: choose/merge each image's features before the LLM; the prompt's
  placeholders are rebuilt by the adapter;
- :class:`InnerLLMMethod`: drop visual tokens at one or more decoder layers, through
  :class:`crop.methods.inner_llm.InnerLLMPruner` hooks; selections known up front (CROP's region)
  or chosen from what the model computed at that layer (attention, hidden states).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from crop.config import NoPruningConfig
from crop.methods.inner_llm import InnerLLMPruner, Rotary
from crop.models.base import CompressedImage, ImageSpan, VLMAdapter
from crop.regions import GridBox
from crop.registry import Registry


@dataclass
class PruneStats:
    """Token accounting of one prepared batch (one entry per image unless noted).

    Attributes:
        visual_tokens_in: visual tokens the vision tower produced.
        visual_tokens_kept: per stage, visual tokens that went on: ``"llm_input"`` (reached
            the LLM) and, for inner-LLM pruning, ``"after_layer_K"`` (survived layer K).
        equivalent_tokens: the layer-weighted average of visual tokens over the LLM's layers
            (the FastV / PyramidDrop convention, so single- and multi-stage methods compare).
        region_tokens: tokens kept at full resolution because of the region (CROP).
        boxes: the region used for each image (the full image for region-free methods).
        token_grids: ``(rows, cols)`` of each image's token grid.
        full_resolution: per image, span indices of the tokens kept at full resolution
            (inner pruning: the survivors of the last stage; PLC: the region share). Filled
            for stages decided before the forward; selections made inside the model are
            recorded when the forward runs.
        kept_per_stage: inner pruning: per stage (``"after_layer_K"``), per image, the span
            indices that survived it (what the layer's hook really kept).
        self_localized: per image, True when ``boxes`` holds a region the method found itself
            inside the forward (CROP-self), on the model's view of the image, rather than the
            box it was given.
    """

    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_kept: dict[str, list[int]] = field(default_factory=dict)
    equivalent_tokens: list[float] = field(default_factory=list)
    region_tokens: list[int] = field(default_factory=list)
    boxes: list[GridBox] = field(default_factory=list)
    token_grids: list[tuple[int, int]] = field(default_factory=list)
    full_resolution: list[list[int]] = field(default_factory=list)
    kept_per_stage: dict[str, list[list[int]]] = field(default_factory=dict)
    self_localized: list[bool] = field(default_factory=list)

    @classmethod
    def start(cls, spans: Sequence[ImageSpan], boxes: Sequence[GridBox]) -> PruneStats:
        """Stats of unpruned images: everything in, everything kept."""
        return cls(visual_tokens_in=[s.visual_tokens for s in spans],
                   visual_tokens_kept={"llm_input": [s.visual_tokens for s in spans]},
                   equivalent_tokens=[float(s.visual_tokens) for s in spans],
                   region_tokens=[0 for _ in spans], boxes=list(boxes),
                   token_grids=[(s.rows, s.cols) for s in spans],
                   full_resolution=[s.visual_positions().tolist() for s in spans],
                   self_localized=[False for _ in spans])


def visual_counts_per_layer(n_in: int, stages: Sequence[tuple[int, int]], num_layers: int) -> list[int]:
    """Visual tokens entering each layer: ``n_in`` until each ``(layer, kept)`` stage, then its count."""
    counts, current, boundary = [], n_in, sorted(stages)
    for layer in range(num_layers):
        while boundary and boundary[0][0] <= layer:
            current = boundary.pop(0)[1]
        counts.append(current)
    return counts


def equivalent_tokens(n_in: int, stages: Sequence[tuple[int, int]], num_layers: int) -> float:
    """Layer-weighted visual tokens: :func:`visual_counts_per_layer` averaged over layers."""
    return sum(visual_counts_per_layer(n_in, stages, num_layers)) / num_layers


class PruningMethod(ABC):
    """One pruning method applied to one model.

    Args:
        adapter: the model's adapter (all model knowledge goes through it).
        config: the method's config dataclass.

    Class attributes:
        name: the registry name (the same as ``config_class.method_name``).
        config_class: the config dataclass that selects this method (one class per method).
        uses_region: whether the method follows the localizer's region (CROP) or ignores it.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Any]] = type(None)
    uses_region: ClassVar[bool] = False

    def __init__(self, adapter: VLMAdapter, config: Any) -> None:
        self.adapter = adapter
        self.config = config

    def planned_counts(self, n_in: int) -> list[int] | None:
        """Visual tokens of an image of ``n_in`` tokens entering each decoder layer, as this config plans them.

        What the budget solver and the FLOPs accounting predict before running: one count per
        LM layer; the equivalent tokens are their mean. ``None`` when the count depends on the
        data (e.g. CROP without a budget keeps the region's tokens). The default: a pre-LLM
        method keeps ``keep_tokens`` from layer 0.
        """
        keep = getattr(self.config, "keep_tokens", None)
        if keep is None:
            return None
        return [min(keep, n_in)] * self.adapter.num_layers

    def selection_flops(self, seq_len: int, n_in: int) -> int:
        """Analytic FLOPs of the method's own selection for one image in a prompt of ``seq_len`` tokens.

        Part of every method's cost in the results (the localizer is counted separately).
        The default is 0: a choice known before the forward (CROP's region, random) or
        computed from what the model already produced (FastV's captured row costs
        ``O(heads * head_dim * seq_len)``, negligible next to a layer) costs nothing extra.
        """
        return 0

    def attach(self) -> None:  # noqa: B027  (pre-LLM methods have no hooks)
        """Register hooks on the model instance (nothing for pre-LLM-only methods)."""

    def detach(self) -> None:  # noqa: B027
        """Remove every hook :meth:`attach` registered; safe to call twice."""

    @abstractmethod
    def prepare(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                boxes: list[GridBox]) -> tuple[dict[str, Any], PruneStats]:
        """The inputs to run for this batch, and its token accounting.

        Args:
            inputs: processor output.
            spans: every image's visual-token span (from the adapter).
            boxes: one region per image (the full image when none was given).
        """


class NoPruning(PruningMethod):
    """The unpruned model (the reference every method is compared with)."""

    name = "none"
    config_class = NoPruningConfig
    config: NoPruningConfig


    def planned_counts(self, n_in):
        return [n_in] * self.adapter.num_layers

    def prepare(self, inputs, spans, boxes):
        return dict(inputs), PruneStats.start(spans, boxes)


class PreLLMMethod(PruningMethod):
    """Base of methods that act on each image's features before the LLM.

    Subclasses implement :meth:`compress_image`; :meth:`encode` says what they need from the
    vision side (the features by default). The base runs the per-image loop, records the stats
    and has the adapter rebuild the prompt (placeholders, positions) around the result; a budget
    that keeps every token returns the stock inputs untouched (bit-identical logits).
    """

    def encode(self, inputs: Mapping[str, Any]) -> list[Any]:
        """Per image, what :meth:`compress_image` receives (default: its ``(length, D)`` features)."""
        return self.adapter.encode_images(inputs)

    def keeps_everything(self, spans: list[ImageSpan]) -> bool:
        """Whether this batch keeps every visual token (then nothing is encoded or rebuilt)."""
        keep = getattr(self.config, "keep_tokens", None)
        return keep is not None and all(keep >= s.visual_tokens for s in spans)

    @abstractmethod
    def compress_image(self, encoded: Any, span: ImageSpan, box: GridBox,
                       image_index: int) -> tuple[CompressedImage, list[int]]:
        """One image (what :meth:`encode` gave for it) -> what reaches the LLM, and the span indices kept at full resolution."""

    def prepare(self, inputs, spans, boxes):
        stats = PruneStats.start(spans, boxes)
        if self.keeps_everything(spans):
            return dict(inputs), stats
        images, full_res = [], []
        try:
            for i, (span, box, encoded) in enumerate(zip(spans, boxes, self.encode(inputs), strict=True)):
                image, kept = self.compress_image(encoded, span, box, i)
                images.append(image)
                full_res.append(kept)
            rebuilt = self.adapter.compressed_inputs(inputs, spans, images)
        finally:
            self.adapter.release_encoded()  # prepared or refused: the handle keeps nothing of this batch
        stats.visual_tokens_kept["llm_input"] = [im.visual_tokens for im in images]
        stats.equivalent_tokens = [float(im.visual_tokens) for im in images]
        stats.full_resolution = full_res
        if self.uses_region:
            stats.region_tokens = [len(k) for k in full_res]
        return rebuilt, stats


class InnerLLMMethod(PruningMethod):
    """Base of methods that drop visual tokens at decoder layers (one pruner per stage layer).

    Subclasses give :meth:`stage_layers` and either :meth:`keep_before_forward` (selection known
    from the inputs) or :meth:`select_at_layer` (selection from what the model computed).
    """

    def __init__(self, adapter: VLMAdapter, config: Any) -> None:
        super().__init__(adapter, config)
        self.layers = adapter.decoder_layers()
        self.pruners = self._make_pruners()
        self.relay = adapter.layer_feature_relay(self.origin_leaving)  # in-LM vision features (Qwen3-VL DeepStack)
        self._spans: list[ImageSpan] = []
        self._stats: PruneStats | None = None

    def stage_layers(self) -> list[int]:
        """Decoder layers at whose input visual tokens are dropped (increasing)."""
        return [int(self.config.layer)]

    def kept_after_stage(self, n_in: int) -> int | None:
        """Visual tokens a single-stage method keeps after its layer for an image of ``n_in`` (``None``: data-dependent)."""
        keep = getattr(self.config, "keep_tokens", None)
        return None if keep is None else min(keep, n_in)

    def planned_counts(self, n_in: int) -> list[int] | None:
        layers = self.stage_layers()
        if len(layers) != 1:
            raise NotImplementedError(f"{type(self).__name__} has several stages: override planned_counts")
        kept = self.kept_after_stage(n_in)
        if kept is None:
            return None
        return [n_in] * layers[0] + [kept] * (self.adapter.num_layers - layers[0])

    def pruner_rotary(self) -> Rotary | None:
        """The rotary function pruners renumber positions with (see :class:`InnerLLMPruner`); ``None`` keeps them."""
        return None

    def _make_pruners(self) -> list[InnerLLMPruner]:
        """One pruner per stage layer, after checking the layers against the model's depth."""
        depth = len(self.layers)
        for k in self.stage_layers():
            if not 1 <= k < depth:
                raise ValueError(f"layer {k} is outside the model's depth: pruning needs 1 <= layer <= "
                                 f"{depth - 1} for this {depth}-layer language model")
        return [InnerLLMPruner(self.layers, k, eager=self.adapter.uses_eager_attention, rotary=self.pruner_rotary(),
                               padding_mask=self.adapter.uses_flash_attention,
                               layer_rotary=self.adapter.layer_rotary_embedding)
                for k in self.stage_layers()]

    def move_stages(self) -> None:
        """Rebuild the pruners after :meth:`stage_layers` changed (a budget that picks its own layers)."""
        attached = any(p._handles for p in self.pruners)
        for pruner in self.pruners:
            pruner.detach()
        self.pruners = self._make_pruners()
        if attached:
            for pruner in self.pruners:
                pruner.attach()

    def attach(self) -> None:
        for pruner in self.pruners:
            pruner.attach()
        if self.relay is not None:
            self.relay.attach()

    def detach(self) -> None:
        if self.relay is not None:
            self.relay.detach()
        for pruner in self.pruners:
            pruner.detach()

    def keep_before_forward(self, inputs, spans: list[ImageSpan], boxes: list[GridBox]) -> list[torch.Tensor] | None:
        """Per image, span indices kept after the (single) stage, if known from the inputs; else ``None``."""
        return None

    def select_at_layer(self, stage: int, hidden: torch.Tensor, layer_kwargs: dict,
                        candidates: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Choose, at stage ``stage``, which candidate visual slots survive (per image).

        Args:
            stage: index into :meth:`stage_layers`.
            hidden: ``(B, L, D)`` hidden states entering the stage's layer.
            layer_kwargs: that layer's keyword arguments (positions, mask, cache).
            candidates: per sample, per image, the sequence slots (positions in ``hidden``) of
                the image's surviving visual tokens, in span order.

        Returns:
            Per image (in span order), indices into its ``candidates`` entry to keep.
        """
        raise NotImplementedError(f"{type(self).__name__} selects before the forward")

    def prepare(self, inputs, spans, boxes):
        stats = PruneStats.start(spans, boxes)
        self._spans, self._stats = spans, stats
        batch, prompt_len = inputs["input_ids"].shape
        keep = self.keep_before_forward(inputs, spans, boxes)
        if keep is not None:
            if len(self.pruners) != 1:
                raise ValueError("selections known before the forward need a single stage")
            self._record(0, [k.tolist() for k in keep])
            self.pruners[0].arm(self._prompt_keep(inputs, spans, keep), prompt_len)
        else:
            for stage, pruner in enumerate(self.pruners):
                pruner.arm(selector=self._selector(stage), batch=batch)
        return dict(inputs), stats

    # -- internals -----------------------------------------------------------------------------

    def _prompt_keep(self, inputs, spans: list[ImageSpan], keep: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, prompt positions surviving: all non-visual ones + the kept visual ones (+ their structure)."""
        mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)  # (B, L)
        for span, chosen in zip(spans, keep, strict=True):
            mask[span.sample, span.start:span.start + span.length] = False
            mask[span.sample, span.start + chosen] = True
            mask[span.sample, span.start + span.structure_positions(chosen)] = True
        return [row.nonzero().squeeze(1) for row in mask]

    def _current_stats(self) -> PruneStats:
        """The stats of the batch being run (what :meth:`prepare` returned), filled in as stages decide.

        Raises:
            RuntimeError: if no batch was prepared.
        """
        if self._stats is None:
            raise RuntimeError(f"{type(self).__name__} has no prepared batch: call handle.prepare(inputs) first")
        return self._stats

    def _record(self, stage: int, kept: list[list[int]]) -> None:
        """Record the survivors of ``stage`` (span indices per image) in the stats."""
        stats = self._current_stats()
        layer = self.stage_layers()[stage]
        stats.visual_tokens_kept[f"after_layer_{layer}"] = [len(k) for k in kept]
        stats.kept_per_stage[f"after_layer_{layer}"] = kept
        stats.full_resolution = kept
        stages = [(self.stage_layers()[s], stats.visual_tokens_kept[f"after_layer_{self.stage_layers()[s]}"])
                  for s in range(stage + 1)]
        stats.equivalent_tokens = [
            equivalent_tokens(n_in, [(lay, counts[i]) for lay, counts in stages], len(self.layers))
            for i, n_in in enumerate(stats.visual_tokens_in)]

    def slot_origin(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` the prompt position of each slot of the sequence entering stage ``stage`` (-1 on padding slots).

        Each earlier stage's kept index points into the sequence *that* stage received, so they
        are composed in order, from the prefill's positions on.
        """
        batch, seq_len, _ = hidden.shape
        length = seq_len if stage == 0 else self.pruners[0].prefilled().prefill_len
        origin = torch.arange(length, device=hidden.device).expand(batch, -1)  # (B, L0)
        for prev in (p.prefilled() for p in self.pruners[:stage]):
            origin = origin.gather(1, prev.kept_slots())  # (B, Lk)
            if prev.valid is not None:
                origin = origin.masked_fill(~prev.valid, -1)
        return origin  # (B, L)

    def origin_leaving(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` the prompt position of each slot of the sequence leaving decoder layer ``layer`` (-1 on padding).

        The sequence as every stage at or before ``layer`` left it (see :meth:`slot_origin`).
        """
        return self.slot_origin(sum(k <= layer for k in self.stage_layers()), hidden)

    def _selector(self, stage: int):
        """The deferred selection for ``stage``: maps surviving visual slots, asks the method, returns positions."""

        def select(hidden: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
            origin = self.slot_origin(stage, hidden)  # (B, L) prompt position of each slot, -1 on padding
            candidates: list[list[torch.Tensor]] = [[] for _ in range(hidden.shape[0])]
            span_index: list[torch.Tensor] = []
            for span in self._spans:
                visual = span.start + span.visual_positions().to(hidden.device)  # (V,) original positions
                row = origin[span.sample]  # (L,)
                slots = torch.isin(row, visual).nonzero().squeeze(1)  # (v,) slots still holding this image's tokens
                candidates[span.sample].append(slots)
                span_index.append(row[slots] - span.start)
            chosen = self.select_at_layer(stage, hidden, layer_kwargs, candidates)
            flat_slots = [c for per_sample in candidates for c in per_sample]
            kept_slots: list[list[torch.Tensor]] = [[] for _ in range(hidden.shape[0])]
            kept_span: list[list[int]] = []
            for span, slots, idx, pick in zip(self._spans, flat_slots, span_index, chosen, strict=True):
                pick = pick.to(slots.device)
                kept_slots[span.sample].append(slots[pick])
                kept_span.append(idx[pick].sort().values.tolist())
            self._record(stage, kept_span)
            keep = []
            for b in range(hidden.shape[0]):
                drop = torch.zeros(hidden.shape[1], dtype=torch.bool, device=hidden.device)
                for slots in candidates[b]:
                    drop[slots] = True
                for slots in kept_slots[b]:
                    drop[slots] = False
                valid = origin[b] >= 0
                keep.append((~drop & valid).nonzero().squeeze(1))
            return keep

        return select


class TopKSelection(ABC):
    """Mixin for inner-LLM methods that keep each image's top-scored visual tokens (FastV, PyramidDrop).

    The method supplies :meth:`scores` (one score per sequence slot, per sample) and
    :meth:`keep_count` (how many of an image's candidates survive a stage); this does the
    per-image loop, keep-all and the top-k, so a scoring method is two small functions
    (the pattern of NVIDIA/kvpress's ``ScorerPress``).
    """

    @abstractmethod
    def scores(self, stage: int, hidden: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
        """Per sample, ``(L,)`` scores of every slot entering the stage's layer (higher = kept first)."""

    @abstractmethod
    def keep_count(self, image: int, stage: int, n: int) -> int:
        """Visual tokens image ``image`` (batch order) keeps at ``stage`` out of its ``n`` candidates."""

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        rows = self.scores(stage, hidden, layer_kwargs)  # per sample: (L,)
        out, image = [], 0
        for b, per_sample in enumerate(candidates):
            for slots in per_sample:
                n, keep = slots.numel(), self.keep_count(image, stage, slots.numel())
                image += 1
                if keep >= n:
                    out.append(torch.arange(n))
                    continue
                out.append(rows[b][slots.to(rows[b].device)].topk(keep).indices.cpu())  # (keep,) into slots
        return out


class MethodRegistry(Registry[type[PruningMethod]]):
    """The method registry: names -> method classes, and each method's config class -> its method.

    Registering checks that the class's ``name`` and its config's ``method_name`` agree with
    the registered name and that no other method uses the same config class, so a config
    always selects exactly one method.
    """

    def __init__(self) -> None:
        super().__init__("method")
        self._by_config: dict[type, type[PruningMethod]] = {}

    def register(self, name: str):
        add_name = super().register(name)

        def add(cls: type[PruningMethod]) -> type[PruningMethod]:
            config_cls = cls.config_class
            if cls.name != name or getattr(config_cls, "method_name", None) != name:
                raise ValueError(f"method {name!r}: the class's name ({cls.name!r}) and its config's method_name "
                                 f"({getattr(config_cls, 'method_name', None)!r}) must both be {name!r}")
            if config_cls in self._by_config:
                raise ValueError(f"config class {config_cls.__name__} already selects method "
                                 f"{self._by_config[config_cls].name!r}")
            add_name(cls)
            self._by_config[config_cls] = cls
            return cls

        return add

    def for_config(self, config: Any) -> type[PruningMethod]:
        """The method class that ``config``'s class selects.

        Raises:
            ValueError: if no registered method takes this config class.
        """
        cls = self._by_config.get(type(config))
        if cls is None:
            raise ValueError(f"{type(config).__name__} is not a method config; known configs: "
                             f"{', '.join(sorted(c.__name__ for c in self._by_config))}")
        return cls


METHODS = MethodRegistry()
