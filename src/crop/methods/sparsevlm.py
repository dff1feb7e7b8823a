"""SparseVLM: text raters rank visual tokens at several LLM layers; the best pruned ones are recycled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from crop.hf_compat import layer_cache
from crop.methods.attention import AttentionScoredMethod, BaselineConfigMixin, scaled_layers, stage_counts
from crop.methods.base import METHODS

# the paper's LLaVA-1.5-7B pruning layers: 2, 6 and 15 of 32
PAPER_STAGE_FRACTIONS = (2 / 32, 6 / 32, 15 / 32)


@dataclass
class SparseVLMConfig(BaselineConfigMixin):
    """Configuration of SparseVLM.

    Args:
        keep_tokens: the budget as the layer-weighted equivalent visual-token count per image,
            merged (recycled) tokens included (see :func:`crop.methods.attention.stage_counts`);
            ``None`` keeps 50 / 25 / 12.5 % after the stages.
        layers: the pruning layers; ``None`` scales the paper's 2/6/15-of-32 to the model's depth.
        ratio: share of the previous stage's visual tokens each stage keeps.
        recycle: tau, the share of each stage's pruned tokens (the best-rated ones) recycled
            into merged tokens; 0 disables recycling.
        merge_share: share of a stage's count given to merged tokens (at least 1 when recycling).
        grid: side of the region grid of the boxes handed to ``prepare`` (ignored: this method
            does not use the region; kept so every config runs through the same pipeline).

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    recycle: float = 0.3
    merge_share: float = 0.1
    grid: int = 8
    method_name: ClassVar[str] = "sparsevlm"

    def __post_init__(self) -> None:
        self._check_keep(self.keep_tokens)
        self._check_grid(self.grid)
        self._check_layers(self.layers)
        self._check_ratio("ratio", self.ratio)
        self._check_ratio("recycle", self.recycle, low_open=False)
        self._check_ratio("merge_share", self.merge_share, low_open=False)


@dataclass
class _Merge:
    """One recycled token: slot ``center`` of sample ``sample`` becomes the mean of ``group`` (slots)."""

    sample: int
    center: int
    group: torch.Tensor


@METHODS.register("sparsevlm")
class SparseVLM(AttentionScoredMethod):
    """SparseVLM: question tokens rate the visual tokens at several LLM layers; the best pruned ones are merged.

    Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", ICML 2025 (arXiv 2410.04417); training-free.
    Stage: inside the LLM at several layers (default the paper's 2/6/15 of 32, scaled to depth).
    At each pruning layer K, with the attention of layer K-1 (head-averaged, recomputed from
    its captured queries/keys, SDPA kept on):

    1. *raters*: the prompt's text tokens (outside every image span) whose mean attention to
       the surviving visual tokens is at least the average over text tokens;
    2. each visual token's score is the raters' mean attention to it; each image keeps its
       best-rated tokens;
    3. *recycling*: of the tokens pruned, the best-rated ``recycle`` share is clustered around
       the best of them (each joins its most cosine-similar centre, on hidden states) and each
       cluster is averaged into one merged token.

    Deviations from the paper, and why:

    - The number kept per stage comes from the budget (:func:`crop.methods.attention.stage_counts`,
      ``keep_tokens`` as the equivalent count) rather than the paper's rank-of-attention rule,
      so every method meets the same budget; merged tokens count toward it.
    - The hooks cannot insert new tokens, so a merged token takes the sequence slot (and the
      rotary position) of its cluster's best-rated pruned token; that slot's hidden state is
      replaced by the cluster mean. The paper's density-peak kNN clustering is replaced by
      "centres = best-rated recycled tokens, nearest centre by cosine similarity".
    - The merged hidden states are written in place into the tensor entering layer K (the
      previous layer's output, so ``output_hidden_states`` shows them); no-cache forwards of
      the same prompt redo the merge from their own hidden states.

    Config: :class:`SparseVLMConfig`.
    """

    name = "sparsevlm"
    config_class = SparseVLMConfig

    @classmethod
    def config_from_options(cls, keep_tokens, options):
        return SparseVLMConfig(keep_tokens=keep_tokens, grid=options.grid)

    def __init__(self, adapter, config) -> None:
        super().__init__(adapter, config)
        self._merges: list[list[_Merge]] = [[] for _ in self.stage_layers()]
        self._merge_handles: list[torch.utils.hooks.RemovableHandle] = []

    def stage_layers(self) -> list[int]:
        if self.config.layers is not None:
            return list(self.config.layers)
        return scaled_layers(PAPER_STAGE_FRACTIONS, self.adapter.num_layers)

    def attach(self) -> None:
        # registered before the pruners' hooks, so a replayed merge happens before the stage's gather
        if not self._merge_handles:
            for stage, k in enumerate(self.stage_layers()):
                self._merge_handles.append(
                    self.layers[k].register_forward_pre_hook(self._replay(stage, k), with_kwargs=True))
        super().attach()

    def detach(self) -> None:
        super().detach()
        for handle in self._merge_handles:
            handle.remove()
        self._merge_handles.clear()

    def prepare(self, inputs, spans, boxes):
        layers = self.stage_layers()
        self._counts = [stage_counts(s.visual_tokens, self.config.keep_tokens, layers, self.adapter.num_layers,
                                     self.config.ratio) for s in spans]  # per image, per stage
        self._merges = [[] for _ in layers]
        return super().prepare(inputs, spans, boxes)

    def planned_counts(self, n_in):
        from crop.methods.pdrop import _per_layer

        layers = self.stage_layers()
        counts = stage_counts(n_in, self.config.keep_tokens, layers, self.adapter.num_layers, self.config.ratio)
        return _per_layer(n_in, layers, counts, self.adapter.num_layers)

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        origin, valid = self.slot_validity(stage, hidden)  # (B, L)
        in_image = torch.zeros_like(valid)  # (B, L) slots inside an image span (visual or structure)
        for span in self._spans:
            row = origin[span.sample]
            in_image[span.sample] |= (row >= span.start) & (row < span.start + span.length)
        text = valid & ~in_image  # (B, L)
        last = self.last_slots(valid)
        queries = [t.nonzero().squeeze(1) if t.any() else last[b] for b, t in enumerate(text)]
        rows = self.attention_rows_at(stage, hidden, layer_kwargs, queries, valid)  # per b: (n_text, L)
        out, image = [], 0
        for b, per_sample in enumerate(candidates):
            attn = rows[b]  # (n_text, L)
            visual = torch.cat(per_sample).to(attn.device) if per_sample else attn.new_zeros(0, dtype=torch.long)
            relevance = attn[:, visual].mean(dim=1) if visual.numel() else attn.new_ones(attn.shape[0])  # (n_text,)
            raters = relevance >= relevance.mean()  # (n_text,) at least one (the max)
            scores = attn[raters].mean(dim=0)  # (L,)
            for slots in per_sample:
                keep = self._counts[image][stage]
                image += 1
                out.append(self._select_image(stage, b, slots, scores[slots.to(scores.device)].cpu(), keep, hidden))
        return out

    def _select_image(self, stage: int, sample: int, slots: torch.Tensor, scores: torch.Tensor, keep: int,
                      hidden: torch.Tensor) -> torch.Tensor:
        """Indices into ``slots`` to keep for one image (rated + merged), recording and applying merges."""
        n = slots.numel()
        if keep >= n:
            return torch.arange(n)
        order = scores.argsort(descending=True, stable=True)  # (v,) best first
        merged = 0
        if self.config.recycle > 0 and keep >= 2:
            recycled = math.ceil(self.config.recycle * (n - keep))
            merged = min(max(1, int(self.config.merge_share * keep + 0.5)), recycled, keep - 1)
        rated = order[:keep - merged]  # (keep - m,)
        if merged == 0:
            return rated
        pool = order[keep - merged:keep - merged + recycled]  # (r,) best-rated pruned tokens
        centers, others = pool[:merged], pool[merged:]  # (m,), (r - m,)
        slots_cpu = slots.cpu()
        feats = nn.functional.normalize(hidden[sample, slots[pool].to(hidden.device)].float(), dim=-1)  # (r, D)
        nearest = (feats[merged:] @ feats[:merged].T).argmax(dim=1).cpu() if others.numel() else \
            torch.zeros(0, dtype=torch.long)  # (r - m,) centre of each other recycled token
        new = []
        for j, c in enumerate(centers.tolist()):
            group = torch.cat([torch.tensor([c]), others[nearest == j]])  # (g,) indices into slots
            new.append(_Merge(sample, int(slots_cpu[c]), slots_cpu[group]))
        _apply(hidden, new)
        self._merges[stage].extend(new)
        return torch.cat([rated, centers])

    def _replay(self, stage: int, layer: int):
        """Pre-hook redoing the stage's merges on later prefills of the same prompt (no-cache generation)."""

        def hook(module, args, kwargs):
            merges = self._merges[stage]
            cache = layer_cache(kwargs)
            prefill = cache is None or cache.get_seq_length(layer) == 0
            if not merges or not prefill:
                return None
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()  # (B, L, D)
            _apply(hidden, merges)
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook


def _apply(hidden: torch.Tensor, merges: list[_Merge]) -> None:
    """Write each merge's cluster mean into its centre slot of ``hidden`` ``(B, L, D)``, in place."""
    means = [hidden[m.sample, m.group.to(hidden.device)].mean(dim=0) for m in merges]  # each (D,)
    for m, mean in zip(merges, means, strict=True):
        hidden[m.sample, m.center] = mean

