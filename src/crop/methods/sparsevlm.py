"""SparseVLM: text raters rank visual tokens at several LLM layers; the best pruned ones are recycled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from crop.hf_compat import layer_cache
from crop.methods.attention import AttentionScoredMethod, BaselineConfigMixin
from crop.methods.base import METHODS, visual_counts_per_layer

# the official code prunes the *output* of layers 2, 6 and 15 of LLaVA-1.5-7B's 32 with each
# layer's own attention: our stage layers (dropped at their input) are 3, 7 and 16
OFFICIAL_LAYERS = (2, 6, 15)
OFFICIAL_DEPTH = 32
OFFICIAL_TOKENS = 576
# score.py's v1 ``sparse_token_dict``: rated tokens kept after each stage (merged tokens not included)
OFFICIAL_TABLES: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
DEFAULT_LABEL = 192  # RETAIN_TOKN's default
POSITIONS = ("auto", "renumber", "keep")


@dataclass
class SparseVLMConfig(BaselineConfigMixin):
    """Configuration of SparseVLM (the official v1.5 rule, see :class:`SparseVLM`).

    Args:
        keep_tokens: the budget, as the official logger's equivalent visual-token count per image
            (:func:`official_equivalent`, merged tokens included); ``None`` runs the official
            default (``RETAIN_TOKN=192``). 64 / 96 / 128 / 192 of 576 run the official tables;
            other budgets and image sizes follow :func:`sparsevlm_schedule`.
        layers: the stage layers (tokens dropped at their input; ranked with the attention of the
            layer before); ``None`` is the official 2/6/15-of-32 + 1, scaled to the model's depth.
            At most three (one per table column; fewer use the last columns).
        recycle: tau, the share of each stage's pruned tokens recycled: ``int(tau * P) + 1`` of
            them (the best-rated); 0 disables recycling.
        cluster_size: recycled tokens per merged token: ``int(R / cluster_size) + 1`` clusters.
        positions: ``"renumber"`` (the official v1 code: positions 0..L'-1 after each stage, merged
            tokens placed after the kept visual tokens), ``"keep"`` (original positions, each merged
            token in the sequence slot of its cluster's centre), or ``"auto"``: renumber on 1-D
            RoPE models (LLaVA, LLaVA-NeXT), keep on M-RoPE ones (Qwen2-VL/2.5-VL).

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    recycle: float = 0.3
    cluster_size: int = 10
    positions: str = "auto"
    method_name: ClassVar[str] = "sparsevlm"

    def __post_init__(self) -> None:
        self._check_keep(self.keep_tokens)
        self._check_layers(self.layers)
        if self.layers is not None and len(self.layers) > len(OFFICIAL_LAYERS):
            raise ValueError(f"SparseVLM's tables have {len(OFFICIAL_LAYERS)} stages; got layers={self.layers!r}")
        self._check_ratio("recycle", self.recycle, low_open=False)
        if isinstance(self.cluster_size, bool) or not isinstance(self.cluster_size, int) or self.cluster_size < 1:
            raise ValueError(f"cluster_size must be a positive int, got {self.cluster_size!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")


# -- the schedule (pure arithmetic) ------------------------------------------------------------


def recycled_counts(v: int, k: int, recycle: float = 0.3, cluster_size: int = 10) -> tuple[int, int]:
    """``(R, C)``: tokens recycled and merged tokens made when ``k`` of ``v`` visual tokens are kept.

    The official rule: of the ``P = v - k`` pruned, ``R = int(tau * P) + 1`` are recycled into
    ``C = int(R / 10) + 1`` merged tokens (``(0, 0)`` when nothing is pruned or tau is 0).
    """
    pruned = v - k
    if pruned <= 0 or recycle <= 0:
        return 0, 0
    recycled = min(int(pruned * recycle) + 1, pruned)
    return recycled, min(int(recycled / cluster_size) + 1, recycled)


def stage_totals(n_in: int, rated: Sequence[int], recycle: float = 0.3, cluster_size: int = 10) -> list[int]:
    """Visual tokens after each stage, merged included, for the rated counts ``rated`` (official ``min(n, v-1)``)."""
    totals, v = [], n_in
    for n in rated:
        k = min(n, v - 1)
        v = k + recycled_counts(v, k, recycle, cluster_size)[1]
        totals.append(v)
    return totals


def official_equivalent(n_in: int, totals: Sequence[int], stage_layers: Sequence[int], num_layers: int) -> float:
    """The official logger's "Equal Tokens": the pruning layer (``K - 1``) already counted with the pruned count.

    ``(2 * 576 + 4 * n1 + 9 * n2 + 17 * n3) / 32`` for LLaVA-1.5-7B (merged tokens included in ``n``).
    """
    starts = [k - 1 for k in stage_layers]
    bounds = starts[1:] + [num_layers]
    return (starts[0] * n_in + sum((end - start) * n for start, end, n in zip(starts, bounds, totals,
                                                                                strict=True))) / num_layers


def default_layers(num_layers: int) -> tuple[list[int], list[int]]:
    """``(stage layers, table column of each)``: the official 2/6/15 of 32 scaled to the depth, plus one.

    Layers that coincide after rounding are merged (the later table column wins).
    """
    layers: dict[int, int] = {}
    for column, official in enumerate(OFFICIAL_LAYERS):
        layer = min(max(int(official * num_layers / OFFICIAL_DEPTH + 0.5) + 1, 1), num_layers - 1)
        layers[layer] = column
    return sorted(layers), [layers[k] for k in sorted(layers)]


def sparsevlm_schedule(n_in: int, keep_tokens: int | None, stage_layers: Sequence[int], num_layers: int,
                       columns: Sequence[int] | None = None, recycle: float = 0.3,
                       cluster_size: int = 10) -> tuple[list[int], list[int]] | None:
    """``(rated, totals)`` per stage for one image: rated tokens kept, and visual tokens after it (merged included).

    The rule:

    - ``keep_tokens >= n_in``: ``None``, keep everything (no stage prunes or merges);
    - the budget read for 576 tokens, ``b = keep_tokens * 576 / n_in`` (``None``: 192);
    - ``b`` one of the official labels (64, 96, 128, 192): that table's counts times ``n_in / 576``
      (the table itself at 576 tokens);
    - otherwise the nearest label's table times ``n_in / 576``, all counts scaled by one factor
      ``f`` (rounded, at least 1) chosen so that :func:`official_equivalent` is closest to
      ``keep_tokens``.

    Args:
        n_in: the image's visual tokens.
        keep_tokens: the equivalent budget, or ``None``.
        stage_layers: the stage layers (the pruning layers + 1).
        num_layers: the LM's depth.
        columns: the table column of each stage (default: the last ``len(stage_layers)``).

    Raises:
        ValueError: when even one token per stage costs more than ``keep_tokens``.
    """
    if n_in == 0:
        return [0] * len(stage_layers), [0] * len(stage_layers)
    if keep_tokens is not None and keep_tokens >= n_in:
        return None
    if columns is None:
        columns = list(range(len(OFFICIAL_LAYERS) - len(stage_layers), len(OFFICIAL_LAYERS)))
    label = DEFAULT_LABEL if keep_tokens is None else keep_tokens * OFFICIAL_TOKENS / n_in
    nearest = min(OFFICIAL_TABLES, key=lambda t: (abs(t - label), t))
    base = [OFFICIAL_TABLES[nearest][c] * n_in / OFFICIAL_TOKENS for c in columns]

    def plan(f: float) -> tuple[list[int], list[int], float]:
        rated = [max(1, int(f * c + 0.5)) for c in base]
        totals = stage_totals(n_in, rated, recycle, cluster_size)
        return rated, totals, official_equivalent(n_in, totals, stage_layers, num_layers)

    if keep_tokens is None or label in OFFICIAL_TABLES:  # no budget: DEFAULT_LABEL, an official label
        rated, totals, _ = plan(1.0)
        return rated, totals
    target = float(keep_tokens)
    if plan(0.0)[2] > target:
        raise ValueError(f"SparseVLM cannot meet keep_tokens={keep_tokens} equivalent tokens for an image of {n_in} "
                         f"tokens in a {num_layers}-layer LM: one token per stage already costs {plan(0.0)[2]:.1f}")
    lo, hi = 0.0, n_in / min(base) + 1.0  # at hi every stage keeps v - 1
    for _ in range(60):  # the equivalent does not decrease with f
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if plan(mid)[2] <= target else (lo, mid)
    below, above = plan(lo), plan(hi)
    best = below if target - below[2] <= above[2] - target else above
    return best[0], best[1]


# -- density-peak clustering (the official utils.cluster_and_merge) ---------------------------


def density_peak_clusters(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x`` ``(R, D)`` into ``clusters`` groups (the official ``cluster_and_merge``'s rule).

    Euclidean distances over ``sqrt(D)``; local density ``exp(-mean of the squared distances to
    the k = clusters nearest (self included))``; each token's distance to the nearest denser
    token (the largest distance for the densest); the ``clusters`` tokens with the largest
    ``density * distance`` are the centres (in that order); every token joins its nearest centre
    and each centre its own cluster. The official 1e-6 random density jitter (a tie-breaker) is
    left out, so the result is deterministic. Everything stays on ``x``'s device.

    Returns:
        ``(centres (C,), assign (R,))``: the centres' indices into ``x`` in centre order, and the
        cluster (index into ``centres``) of every token.
    """
    dim = x.shape[1]
    xf = x.float()  # (R, D)
    dist = torch.cdist(xf[None], xf[None])[0] / dim ** 0.5  # (R, R)
    nearest = dist.topk(clusters, dim=-1, largest=False).values  # (R, C) self included
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # (R,)
    denser = density[None, :] > density[:, None]  # (R, R) [i, j]: j is denser than i
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values  # (R,)
    centres = (parent * density).topk(clusters).indices  # (C,)
    assign = dist[centres].argmin(dim=0)  # (R,) nearest centre
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


def cluster_members(centres: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cluster's members as one padded matrix, without reading the cluster sizes back to the host.

    Args:
        centres: ``(C,)`` the centres' indices (see :func:`density_peak_clusters`).
        assign: ``(R,)`` each token's cluster.

    Returns:
        ``(order, member)``, both ``(C, R)``: row ``c`` of ``order`` lists indices into the ``R``
        tokens, cluster ``c``'s centre first, then its other members in increasing index, then
        the other tokens; ``member`` marks the entries that belong to the cluster.
    """
    tokens = torch.arange(assign.numel(), device=assign.device)  # (R,)
    mine = assign[None, :] == torch.arange(centres.numel(), device=assign.device)[:, None]  # (C, R)
    rank = torch.where(tokens[None, :] == centres[:, None], 0, torch.where(mine, 1, 2))  # (C, R) centre, member, other
    order = rank.argsort(dim=1, stable=True)  # (C, R)
    return order, rank.gather(1, order) < 2


def cluster_and_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DPC-kNN clustering of ``x`` ``(R, D)`` into ``clusters`` groups, each merged into its mean.

    The official ``cluster_and_merge`` (see :func:`density_peak_clusters`); a merged token is the
    sum of its members over ``(count + 1e-6)``. For inspection: the member lists are read back
    to the host (the method itself uses :func:`density_peak_clusters` and :func:`cluster_members`).

    Returns:
        ``(merged (C, D), members)``: the merged tokens in centre order and, per cluster, the
        indices into ``x`` it merges (its centre first).
    """
    centres, assign = density_peak_clusters(x, clusters)
    order, member = cluster_members(centres, assign)  # (C, R) each
    members = [order[c][member[c]] for c in range(clusters)]
    sums = torch.zeros(clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)  # (C, D)
    counts = torch.bincount(assign, minlength=clusters).to(x.dtype)  # (C,)
    return sums / (counts[:, None] + 1e-6), members


@dataclass
class _Merge:
    """One merged token of sample ``sample``: the mean of slots ``group`` written into slot ``center``.

    ``origin`` / ``group_origin``: the prompt positions those slots came from (what the stats
    report: a merged token is listed under its centre slot's origin). The host-side view of a
    :class:`_MergeSet` entry, for inspection and tests.
    """

    sample: int
    center: int
    group: torch.Tensor
    origin: int = -1
    group_origin: torch.Tensor | None = None


@dataclass
class _MergeSet:
    """One stage's merged tokens, batched on the model's device: built and applied without host round trips.

    Attributes:
        sample: ``(M,)`` batch row of each merged token.
        center: ``(M,)`` the slot its mean is written into (its cluster's centre).
        members: ``(M, G)`` the slots it averages, centre first (padding repeats the centre).
        valid: ``(M, G)`` False on padding.
        origin: ``(M,)`` prompt position of the centre slot.
        member_origin: ``(M, G)`` prompt positions of the members (-1 on padding).
        image: per merged token, its image (index in span order); known on the host, in blocks.
    """

    sample: torch.Tensor
    center: torch.Tensor
    members: torch.Tensor
    valid: torch.Tensor
    origin: torch.Tensor
    member_origin: torch.Tensor
    image: list[int]

    def __len__(self) -> int:
        return len(self.image)

    def block(self, image: int) -> tuple[int, int]:
        """``(lo, hi)``: the rows of image ``image``'s merged tokens (``lo == hi`` when it has none)."""
        rows = [m for m, i in enumerate(self.image) if i == image]
        return (rows[0], rows[-1] + 1) if rows else (0, 0)

    @classmethod
    def stack(cls, parts: list[_MergeSet]) -> _MergeSet | None:
        """The parts (one per image) as one set, trimmed to the largest cluster (``None`` for no parts).

        One host read per stage: the width of the largest cluster, so the gather in :meth:`apply`
        is ``(M, largest, D)`` rather than ``(M, R, D)``.
        """
        if not parts:
            return None
        wide = max(p.members.shape[1] for p in parts)

        def pad(x: torch.Tensor, fill: torch.Tensor | int | bool) -> torch.Tensor:
            extra = wide - x.shape[1]
            if extra == 0:
                return x
            tail = fill.expand(-1, extra) if isinstance(fill, torch.Tensor) else \
                torch.full((x.shape[0], extra), fill, dtype=x.dtype, device=x.device)
            return torch.cat([x, tail], dim=1)  # (C, wide)

        valid = torch.cat([pad(p.valid, False) for p in parts])  # (M, wide)
        width = int(valid.sum(dim=1).max())  # the largest cluster: the stage's one host read
        return cls(sample=torch.cat([p.sample for p in parts]), center=torch.cat([p.center for p in parts]),
                   members=torch.cat([pad(p.members, p.members[:, :1]) for p in parts])[:, :width],
                   valid=valid[:, :width], origin=torch.cat([p.origin for p in parts]),
                   member_origin=torch.cat([pad(p.member_origin, -1) for p in parts])[:, :width],
                   image=[i for p in parts for i in p.image])

    @classmethod
    def from_merges(cls, merges: list[_Merge], device: torch.device | None = None) -> _MergeSet:
        """A set from host-side merges (tests, hand-made merges)."""
        width = max(m.group.numel() for m in merges)

        def row(x: torch.Tensor, fill: torch.Tensor | int) -> torch.Tensor:
            tail = x[:1].expand(width - x.numel()) if isinstance(fill, torch.Tensor) else \
                torch.full((width - x.numel(),), fill, dtype=x.dtype)
            return torch.cat([x.cpu(), tail.cpu()])  # (width,)

        groups = [m.group.long().cpu() for m in merges]
        origins = [m.group_origin.long().cpu() if m.group_origin is not None else torch.full_like(g, -1)
                   for m, g in zip(merges, groups, strict=True)]
        return cls(sample=torch.tensor([m.sample for m in merges], device=device),
                   center=torch.tensor([m.center for m in merges], device=device),
                   members=torch.stack([row(g, g) for g in groups]).to(device),
                   valid=torch.stack([torch.arange(width) < g.numel() for g in groups]).to(device),
                   origin=torch.tensor([m.origin for m in merges], device=device),
                   member_origin=torch.stack([row(o, -1) for o in origins]).to(device),
                   image=[0] * len(merges))

    def to_merges(self) -> list[_Merge]:
        """The host-side view, one :class:`_Merge` per merged token (reads everything back: inspection only)."""
        out = []
        for m in range(len(self)):
            keep = self.valid[m].cpu()  # (G,)
            out.append(_Merge(int(self.sample[m]), int(self.center[m]), self.members[m].cpu()[keep],
                              int(self.origin[m]), self.member_origin[m].cpu()[keep]))
        return out

    def apply(self, hidden: torch.Tensor) -> None:
        """Write each merged token's cluster mean (official: sum over ``count + 1e-6``) into its centre slot of ``hidden`` ``(B, L, D)``.

        In place; every mean is computed before any slot is written. The sum runs over each
        cluster's members in order (centre first) with zeros after them: on the CPU the same
        bits as summing the members alone, for hidden sizes that are a multiple of the SIMD
        width (every real model's; tests/methods/test_sparsevlm_batched.py checks it).
        """
        if not len(self):
            return
        gathered = hidden[self.sample[:, None], self.members]  # (M, G, D)
        sums = torch.where(self.valid[..., None], gathered, hidden.new_zeros(())).sum(dim=1)  # (M, D)
        wide = torch.promote_types(hidden.dtype, torch.float32)
        count = self.valid.sum(dim=1).to(torch.float64) + 1e-6  # (M,) as Python computes ``len + 1e-6``
        means = (sums.to(wide) / count.to(wide)[:, None]).to(hidden.dtype)  # (M, D)
        hidden[self.sample, self.center] = means


@METHODS.register("sparsevlm")
class SparseVLM(AttentionScoredMethod):
    """SparseVLM: question tokens rate the visual tokens at several LLM layers; the best pruned ones are merged.

    Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", ICML 2025 (arXiv 2410.04417); training-free. Official code read:
    github.com/Gumpest/SparseVLMs at commit 26a5f48813c46cd1c7364160354e7fdd3febaa67 (the v1.5
    algorithm, default ``USE_VERSION``): ``llava/model/language_model/modelling_sparse_llama.py``
    (raters L186-204, the pruning loop L214-321, attention L618-714, decoder layer L722-801),
    ``score.py`` L9-46 (count tables, top-k) and ``utils.py`` L179-239 (``cluster_and_merge``).

    Stage: inside the LLM at three layers. What is reproduced:

    1. *Layers*: the official code prunes the output of layers 2, 6, 15 (of 32) with each one's
       own attention; here the stage layers are 3, 7, 16 (tokens dropped at their input) and
       the captured attention of 2, 6, 15 ranks (scaled to the depth as fractions of 32).
    2. *Raters*, once per prompt, from the embeddings entering layer 0: per image, ``V`` its
       visual tokens and ``T`` the text tokens after it (not the system prompt before it);
       ``r = mean_V softmax_T(V T^T)``; raters are the ``T`` with ``r > mean(r)``. The same
       raters at every stage.
    3. *Scores*: the capture layer's causal attention (RoPE, softmax over all keys), mean over
       heads and raters, of each current visual token of the image (merged tokens from the
       previous stage compete again); the top ``min(n_s, v - 1)`` are kept, in their order.
    4. *Counts*: the official v1 tables (rated tokens per stage) 64 -> 66/30/17,
       96 -> 238/48/26, 128 -> 303/110/36, 192 -> 300/200/110 of 576, plus recycling on top: of
       the ``P`` pruned, the ``int(0.3 P) + 1`` best-rated are clustered (density-peak kNN, see
       :func:`cluster_and_merge`) into ``int(R / 10) + 1`` merged tokens, each its cluster's mean
       of the capture layer's output. After the stages (merged included) 64 -> 82/32/18,
       128 -> 312/117/39, 192 -> 309/204/113. Other budgets and image sizes: see
       :func:`sparsevlm_schedule` (the budget is the official logger's equivalent count,
       :func:`official_equivalent`; ``planned_counts`` reports the per-layer counts really run,
       whose mean is larger: layer ``K - 1`` runs on every current token).
    5. *Placement, positions*: on 1-D RoPE models the merged tokens go right after the image's
       kept tokens (in centre order) and positions are renumbered 0..L'-1 after each stage,
       generated tokens included (an ``ordered`` renumbering pruner); a merged token's hidden
       state is written into the slot of its cluster's centre (a pruned slot), in place.

    Deviations, and why:

    - Batches, padding and several images per prompt (the official code: batch 1, one image):
      each image has its own raters (the text after it, other images excluded) and counts.
    - M-RoPE models (Qwen2-VL/2.5-VL, no official path): original positions are kept and each
      merged token stays in its centre's slot (a 3-D position has no contiguous renumbering);
      ``positions="keep"`` does the same on LLaVA (measured in tests/methods/test_reference_sparsevlm.py).
    - Scores and raters in float32 (the official code: fp16); no density jitter in the
      clustering (it only breaks exact ties); a budget of all the tokens keeps everything (the
      official ``min(n, v - 1)`` would still merge one token); when an image's raters are empty
      (a single text token ties with its mean) all its text tokens rate.
    - No-cache forwards of the same prompt redo the merges from their own hidden states.

    Host round trips: the ranking, top-k, recycling, clustering, merges and placement run on the
    model's device (counts come from the schedule, never read back), so a request makes a fixed
    number of syncs per image and stage, none per token or per merged token: 49 for two images
    and three stages, 36 of them the shared selector's (tests/methods/test_host_syncs.py).

    Config: :class:`SparseVLMConfig`.
    """

    name = "sparsevlm"
    config_class = SparseVLMConfig
    config: SparseVLMConfig


    def __init__(self, adapter, config) -> None:
        if config.positions == "renumber" and adapter.uses_mrope:
            raise ValueError("positions='renumber' needs 1-D RoPE; this model uses M-RoPE (use 'auto' or 'keep')")
        if config.layers is not None:
            self._layers, self._columns = list(config.layers), None
        else:
            self._layers, self._columns = default_layers(adapter.num_layers)
        super().__init__(adapter, config)
        self._merge_sets: list[_MergeSet | None] = [None for _ in self._layers]  # per stage, what it merged
        self._merge_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._embed_handle: torch.utils.hooks.RemovableHandle | None = None
        self._embeds: torch.Tensor | None = None  # (B, L, D) what entered layer 0 in the armed prefill
        self._embeds_armed = False
        self._raters: list[torch.Tensor] = []  # per image, (P,) True at the prompt positions of its raters

    @property
    def _merges(self) -> list[list[_Merge]]:
        """Per stage, its merged tokens as host-side :class:`_Merge` entries (reads them back: for inspection and tests)."""
        return [[] if merges is None else merges.to_merges() for merges in self._merge_sets]

    def stage_layers(self) -> list[int]:
        return list(self._layers)

    def pruner_rotary(self):
        return self.adapter.rotary_embedding if self._renumber() else None

    def _renumber(self) -> bool:
        return self.config.positions == "renumber" or (self.config.positions == "auto" and
                                                       not self.adapter.uses_mrope)

    def _make_pruners(self):
        pruners = super()._make_pruners()
        for pruner in pruners:
            pruner.ordered = pruner.rotary is not None  # merged tokens after the kept ones, as the official code
        return pruners

    def schedule(self, n_in: int) -> tuple[list[int], list[int]] | None:
        """``(rated, totals)`` per stage for an image of ``n_in`` tokens (see :func:`sparsevlm_schedule`)."""
        return sparsevlm_schedule(n_in, self.config.keep_tokens, self._layers, self.adapter.num_layers,
                                  self._columns, self.config.recycle, self.config.cluster_size)

    def planned_counts(self, n_in):
        plan = self.schedule(n_in)
        totals = [n_in] * len(self._layers) if plan is None else plan[1]
        return visual_counts_per_layer(n_in, list(zip(self._layers, totals, strict=True)), self.adapter.num_layers)

    def attach(self) -> None:
        # registered before the pruners' hooks, so a replayed merge happens before the stage's gather
        if not self._merge_handles:
            for stage, k in enumerate(self._layers):
                self._merge_handles.append(
                    self.layers[k].register_forward_pre_hook(self._replay(stage, k), with_kwargs=True))
            self._embed_handle = self.layers[0].register_forward_pre_hook(self._keep_embeds, with_kwargs=True)
        super().attach()

    def detach(self) -> None:
        super().detach()
        for handle in self._merge_handles:
            handle.remove()
        self._merge_handles.clear()
        if self._embed_handle is not None:
            self._embed_handle.remove()
            self._embed_handle = None
        self._embeds, self._embeds_armed = None, False
        self._raters, self._merge_sets = [], [None for _ in self._layers]  # nothing of the last prompt stays

    def prepare(self, inputs, spans, boxes):
        self._plans = [self.schedule(s.visual_tokens) for s in spans]  # per image: (rated, totals) or None
        self._merge_sets = [None for _ in self._layers]
        self._embeds, self._embeds_armed, self._raters = None, True, []
        return super().prepare(inputs, spans, boxes)

    def _keep_embeds(self, module, args, kwargs):
        if self._embeds_armed:
            self._embeds = (args[0] if args else kwargs["hidden_states"]).detach()  # (B, L, D)
            self._embeds_armed = False
        return None

    # -- raters ----------------------------------------------------------------------------------

    def _choose_raters(self) -> list[torch.Tensor]:
        """Per image, ``(P,)`` True at the prompt positions of its text raters (official L199-204), from the layer-0 embeddings.

        One host read per image (where its text is); the raters stay a mask on the device.
        """
        embeds = self._embeds
        if embeds is None:
            raise RuntimeError("SparseVLM saw no prompt embeddings; call handle.prepare(inputs) before each "
                               "forward/generate call")
        batch, length, _ = embeds.shape
        in_image = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)  # (B, L)
        for span in self._spans:
            in_image[span.sample, span.start:span.start + span.length] = True
        real = torch.ones_like(in_image) if self._attention_mask is None else \
            self._attention_mask.to(embeds.device)[:, :length]  # (B, L)
        raters = []
        for span in self._spans:
            after = torch.arange(length, device=embeds.device) >= span.start + span.length  # (L,)
            text = (after & ~in_image[span.sample] & real[span.sample]).nonzero().squeeze(1)  # (T,)
            mask = torch.zeros(length, dtype=torch.bool, device=embeds.device)  # (L,)
            if text.numel():
                v = embeds[span.sample, span.start + span.visual_positions().to(embeds.device)].float()  # (V, D)
                t = embeds[span.sample, text].float()  # (T, D)
                r = (v @ t.T).softmax(dim=1).mean(dim=0)  # (T,)
                above = r > r.mean()  # (T,)
                mask[text] = above | ~above.any()  # none above the mean (one token ties with it): all text rates
            raters.append(mask)
        return raters

    # -- selection -------------------------------------------------------------------------------

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        if stage == 0:
            self._raters = self._choose_raters()
            self._embeds = None  # not needed any more: free it
        origin, valid = self.slot_validity(stage, hidden)  # (B, L)
        last = self.last_slots(valid)
        rater_slots = []  # per image, slots of its raters in this sequence
        for span, raters in zip(self._spans, self._raters, strict=True):
            row = origin[span.sample]  # (L,) prompt position of each slot, -1 on padding
            is_rater = raters.to(row.device)[row.clamp(min=0)] & (row >= 0)  # (L,)
            slots = is_rater.nonzero().squeeze(1)  # (r,) one host read per image and stage
            rater_slots.append(slots if slots.numel() else last[span.sample])
        queries = []
        for b in range(hidden.shape[0]):
            mine = [s for span, s in zip(self._spans, rater_slots, strict=True) if span.sample == b]
            queries.append(torch.cat(mine).unique() if mine else last[b])  # (n_b,) sorted
        rows = self.attention_rows_at(stage, hidden, layer_kwargs, queries, valid)  # per b: (n_b, L)
        out, parts, image = [], [], 0
        for b, per_sample in enumerate(candidates):
            for slots in per_sample:
                plan = self._plans[image]
                which = torch.searchsorted(queries[b], rater_slots[image].to(queries[b].device))  # rows of its raters
                scores = rows[b][which].mean(dim=0)[slots.to(rows[b].device)]  # (v,)
                keep = None if plan is None else plan[0][stage]
                pick, part = self._select_image(b, image, slots.to(hidden.device), scores.to(hidden.device), keep,
                                                hidden, origin)
                out.append(pick)
                if part is not None:
                    parts.append(part)
                image += 1
        # the images' merges are disjoint (each averages its own pruned slots into one of them), so they are applied
        # together, once every image chose
        merges = _MergeSet.stack(parts)
        if merges is not None:
            merges.apply(hidden)
        self._merge_sets[stage] = merges
        return out

    def _select_image(self, sample: int, image: int, slots: torch.Tensor, scores: torch.Tensor, keep: int | None,
                      hidden: torch.Tensor, origin: torch.Tensor) -> tuple[torch.Tensor, _MergeSet | None]:
        """One image: indices into ``slots`` to keep (rated, then merged centres), and its merged tokens.

        Everything stays on the device: the counts (``keep``, the recycled and cluster counts) are
        known on the host from the schedule and ``slots``' length, so no value is read back.

        Args:
            sample: the image's batch row; ``image``: its index in span order.
            slots: ``(v,)`` its visual tokens' slots in the sequence entering the stage layer.
            scores: ``(v,)`` their rating (raters' mean attention).
            keep: rated tokens to keep (``None``: keep everything).
            hidden: ``(B, L, D)`` the hidden states entering the stage layer (the merges average them).
            origin: ``(B, L)`` prompt position of each slot.

        Returns:
            ``(pick, merges)``: ``pick`` indexes ``slots`` (``(k + C,)``); ``merges`` is ``None``
            when nothing is merged.
        """
        n = slots.numel()
        if keep is None or n == 0:
            return torch.arange(n, device=slots.device), None
        k = min(keep, n - 1)
        top = scores.topk(k).indices if k > 0 else torch.zeros(0, dtype=torch.long, device=slots.device)  # (k,)
        recycled, clusters = recycled_counts(n, k, self.config.recycle, self.config.cluster_size)
        if clusters == 0:
            return top.sort().values, None
        pruned_mask = torch.ones(n, dtype=torch.bool, device=slots.device)  # (v,)
        pruned_mask[top] = False
        # the n - k pruned in sequence order: a stable sort puts them first (nonzero would read the count back)
        pruned = pruned_mask.to(torch.uint8).argsort(descending=True, stable=True)[:n - k]  # (P,)
        pool = pruned[scores[pruned].topk(recycled).indices]  # (R,) best-rated pruned, best first
        pool_slots = slots[pool]  # (R,)
        centres, assign = density_peak_clusters(hidden[sample, pool_slots], clusters)  # (C,), (R,)
        order, member = cluster_members(centres, assign)  # (C, R) each
        members = pool_slots[order]  # (C, R) slots, centre first
        row = origin[sample]  # (L,)
        merges = _MergeSet(sample=torch.full((clusters,), sample, dtype=torch.long, device=slots.device),
                           center=members[:, 0], members=members, valid=member, origin=row[members[:, 0]],
                           member_origin=row[members].masked_fill(~member, -1), image=[image] * clusters)
        return torch.cat([top.sort().values, pool[centres]]), merges

    def _selector(self, stage):
        select = super()._selector(stage)
        if not self._renumber():
            return select

        def ordered(hidden: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
            keep = select(hidden, layer_kwargs)  # per sample, sorted slots (kept + merged centres)
            return self._place_merged(stage, hidden, keep, self._merge_sets[stage])

        return ordered

    def _place_merged(self, stage: int, hidden: torch.Tensor, keep: list[torch.Tensor],
                      merges: _MergeSet | None) -> list[torch.Tensor]:
        """Per sample, ``keep`` with each image's merged slots moved right after the image's last kept slot.

        The official layout (kept visual tokens in order, then the merged ones in centre order).
        Computed as a sort key per slot, on the device: an unmoved slot ``s`` gets ``s * W``, the
        ``j``-th merged token of an image ``anchor * W + 1 + j``, where ``anchor`` is the image's
        last kept unmoved slot or, when it kept none, its first merged token's own slot.

        Args:
            stage: the stage index.
            hidden: ``(B, L, D)`` the hidden states entering the stage layer.
            keep: per sample, ``(K_b,)`` the kept slots, sorted (merged centres included).
            merges: the stage's merged tokens.

        Returns:
            Per sample, the same slots in the order they go on.
        """
        if merges is None:
            return keep
        origin = self.slot_origin(stage, hidden)  # (B, L)
        length = origin.shape[1]
        blocks = [merges.block(i) for i in range(len(self._spans))]  # per image: its merged tokens' rows
        width = max(hi - lo for lo, hi in blocks) + 2
        out = []
        for b, row in enumerate(keep):
            key = torch.arange(length, device=row.device) * width  # (L,) an unmoved slot's sort key
            for span, (lo, hi) in zip(self._spans, blocks, strict=True):
                if span.sample != b or lo == hi:
                    continue
                centres = merges.center[lo:hi].to(row.device)  # (C,) in centre order
                moved = torch.zeros(length, dtype=torch.bool, device=row.device)  # (L,)
                moved[centres] = True
                source = origin[b, row]  # (K,)
                inside = (source >= span.start) & (source < span.start + span.length) & ~moved[row]  # (K,)
                last = torch.where(inside, row, -1).max()  # () the image's last kept unmoved slot, or -1
                anchor = torch.where(last >= 0, last, centres[0])  # ()
                key[centres] = anchor * width + 1 + torch.arange(hi - lo, device=row.device)  # (C,)
            out.append(row[key[row].argsort()])  # (K,) keys are distinct
        return out

    def _replay(self, stage: int, layer: int):
        """Pre-hook redoing the stage's merges on later prefills of the same prompt (no-cache generation)."""

        def hook(module, args, kwargs):
            merges = self._merge_sets[stage]
            cache = layer_cache(kwargs)
            prefill = cache is None or cache.get_seq_length(layer) == 0
            if merges is None or not prefill:
                return None
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()  # (B, L, D)
            merges.apply(hidden)
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook


def _apply(hidden: torch.Tensor, merges: _MergeSet | list[_Merge]) -> None:
    """Write each merge's cluster mean (official: sum over ``count + 1e-6``) into its centre slot of ``hidden`` ``(B, L, D)``.

    In place; every mean is computed before any slot is written (see :meth:`_MergeSet.apply`).

    Args:
        hidden: ``(B, L, D)`` the hidden states entering the stage layer.
        merges: a stage's merged tokens, batched or as host-side :class:`_Merge` entries.
    """
    if isinstance(merges, list):
        if not merges:
            return
        merges = _MergeSet.from_merges(merges, hidden.device)
    merges.apply(hidden)
