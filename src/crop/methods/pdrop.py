"""PyramidDrop: drop a share of the visual tokens at the end of each of several LLM stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crop.methods.attention import AttentionScoredMethod, BaselineConfigMixin, scaled_layers
from crop.methods.base import METHODS, TopKSelection, visual_counts_per_layer

# the paper's LLaVA-1.5-7B schedule: stages end after layers 8, 16 and 24 of 32, lambda = 0.5
PAPER_STAGE_FRACTIONS = (8 / 32, 16 / 32, 24 / 32)
PAPER_RATIO = 0.5
# the maintainers' layer list for budgets the paper's cannot reach (Cooperx521/PyramidDrop issue #29:
# 64 tokens with layers 2, 8, 16 and lambda 0.19)
LOW_BUDGET_STAGE_FRACTIONS = (2 / 32, 8 / 32, 16 / 32)
POSITIONS = ("auto", "renumber", "keep")


@dataclass
class PDropConfig(BaselineConfigMixin):
    """Configuration of PyramidDrop.

    Args:
        keep_tokens: the budget as the layer-weighted *equivalent* visual-token count per image
            (the count PyramidDrop's authors report); ``None`` runs the paper's schedule
            (layers 8/16/24 of 32, lambda 0.5: 50 / 25 / 12.5 % after the stages).
        layers: the stage layers (tokens are dropped at their input); ``None`` picks them as the
            authors do: the paper's 8/16/24-of-32 when the budget is reachable with them, else the
            maintainers' low-budget 2/8/16-of-32, scaled to the model's depth.
        ratio: lambda, fixed (then ``keep_tokens`` must be ``None``); ``None`` solves lambda so
            that the equivalent count meets ``keep_tokens`` (the paper's 0.5 without a budget).
        positions: ``"renumber"`` (the official code: positions 0..L'-1 after each drop, and each
            generated token's position lowered by what was dropped), ``"keep"`` (original
            positions, as every other method here), or ``"auto"``: renumber on 1-D RoPE models
            (LLaVA, LLaVA-NeXT), keep on M-RoPE models (Qwen2-VL/2.5-VL: a 3-D position has no
            contiguous renumbering; the official code has no Qwen path).

    Raises:
        ValueError: on any invalid field.
    """

    keep_tokens: int | None = None
    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    positions: str = "auto"
    method_name: ClassVar[str] = "pdrop"

    def __post_init__(self) -> None:
        self._check_keep(self.keep_tokens)
        self._check_layers(self.layers)
        if self.ratio is not None:
            self._check_ratio("ratio", self.ratio)
            if self.keep_tokens is not None:
                raise ValueError("give PyramidDrop either keep_tokens (lambda is solved for it) or a fixed ratio, "
                                 "not both")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")


def pdrop_counts(n_in: int, layers: list[int], ratio: float) -> list[int]:
    """Visual tokens each stage keeps, as the official code counts them: ``floor(n_in * ratio**(s+1))``.

    Each stage's count is taken from the image's original ``n_in`` (not from the previous
    stage's count) and floored (``int``), at least 1 (a stage never empties an image).
    """
    return [max(1, min(n_in, int(n_in * ratio ** (s + 1)))) for s in range(len(layers))]


def solve_ratio(n_in: int, target: float, layers: list[int], num_layers: int) -> float | None:
    """Lambda in (0, 1] whose schedule's equivalent visual tokens are closest to ``target`` from below.

    The equivalent count rises with lambda; bisection on the continuous count, then the floors.

    Returns:
        The ratio, or ``None`` when even lambda -> 0 costs more than ``target`` (the tokens
        before the first stage alone exceed it).
    """
    bounds = list(layers[1:]) + [num_layers]

    def equivalent(r: float) -> float:
        return (layers[0] * n_in + sum((end - start) * n_in * r ** (s + 1)
                                       for s, (start, end) in enumerate(zip(layers, bounds, strict=True)))) / num_layers

    if equivalent(0.0) >= target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if equivalent(mid) <= target else (lo, mid)
    return lo


def pdrop_schedule(n_in: int, keep_tokens: int | None, num_layers: int, layers: tuple[int, ...] | None = None,
                   ratio: float | None = None) -> tuple[list[int], list[int]]:
    """``(stage layers, per-stage counts)`` for one image, chosen as PyramidDrop's authors choose them.

    Args:
        n_in: the image's visual tokens.
        keep_tokens: the equivalent-token budget, or ``None`` (the paper's schedule or ``ratio``).
        num_layers: the LM's depth.
        layers: fixed stage layers, or ``None`` (paper's list if it can meet the budget, else the
            maintainers' low-budget list; both scaled to the depth).
        ratio: a fixed lambda (only without ``keep_tokens``).

    Raises:
        ValueError: when the budget cannot be met with any allowed layer list.
    """
    if n_in == 0:
        return list(layers or scaled_layers(PAPER_STAGE_FRACTIONS, num_layers)), [0] * 3
    candidates = [list(layers)] if layers is not None else [scaled_layers(f, num_layers) for f in
                                                            (PAPER_STAGE_FRACTIONS, LOW_BUDGET_STAGE_FRACTIONS)]
    if keep_tokens is None:
        return candidates[0], pdrop_counts(n_in, candidates[0], PAPER_RATIO if ratio is None else ratio)
    if keep_tokens >= n_in:
        return candidates[0], [n_in] * len(candidates[0])
    for stage_layers in candidates:
        solved = solve_ratio(n_in, keep_tokens, stage_layers, num_layers)
        if solved is not None:
            return stage_layers, pdrop_counts(n_in, stage_layers, solved)
    cheapest = min(c[0] for c in candidates) * n_in / num_layers
    raise ValueError(f"PyramidDrop cannot meet keep_tokens={keep_tokens} equivalent tokens for an image of {n_in} "
                     f"tokens in a {num_layers}-layer LM: the layers before its first stage alone cost {cheapest:.1f} "
                     "(give earlier layers=..., or a larger budget)")


@METHODS.register("pdrop")
class PyramidDrop(TopKSelection, AttentionScoredMethod):
    """PyramidDrop: at each of several LLM stages keep the visual tokens the last instruction token attends to most.

    Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247). Official code read:
    github.com/Cooperx521/PyramidDrop at commit 6444f304aee4b7edcb022839fb9e8cd07859704a,
    ``llava/model/modeling_llama_pdrop.py`` (``LlamaModel.pdrop_forward`` L1106-1289, the
    rank-and-drop step L1220-1268, ``pdrop_rank_drop`` L1291-1469) and
    ``llava/eval/model_vqa_loader.py`` L84-96; the budget recipe from the maintainers' answer in
    the repository's issue #29.

    Stage: inside the LLM, several times, training-free. At the input of each stage layer
    (default 8/16/24 of 32, scaled to the depth) the layer's own input norm and q/k
    projections are applied to the hidden states ("lightweight attention"), RoPE with the
    positions the sequence has there, and the last instruction token's causal softmax row over
    all keys, averaged over heads, ranks the image's surviving visual tokens; the top
    ``floor(N * lambda**s)`` are kept in their original order (``N`` = the image's tokens).
    Text tokens are never dropped. After each drop the positions are renumbered contiguously,
    as the official code does (``positions``).

    Budget: ``keep_tokens`` is the layer-weighted equivalent count (the number PyramidDrop's
    authors report). Lambda is solved for it on the paper's layer list, or, when that list cannot
    reach the budget (the layers before its first stage alone cost more), on the maintainers'
    low-budget list 2/8/16 (their recipe for 64 tokens: lambda 0.19 on layers 2/8/16), so a low
    budget is met the authors' way, never by silently running more; a budget no allowed list can
    meet raises. The equivalent count actually run is in ``PruneStats.equivalent_tokens``.

    Deviations, and why: batches, padding and several images per prompt (the official code
    handles the first image of batch 1): each image is ranked against its own tokens and
    counted from its own ``N``; grouped-query attention is supported; scores in float32 (the
    official code averages heads in fp16); on M-RoPE models (Qwen2-VL/2.5-VL, no official
    path) positions are kept by default since 3-D positions cannot be renumbered
    contiguously. Config: :class:`PDropConfig`.
    """

    name = "pdrop"
    config_class = PDropConfig
    config: PDropConfig
    capture_before = False

    def __init__(self, adapter, config: PDropConfig) -> None:
        if config.positions == "renumber" and adapter.uses_mrope:
            raise ValueError("positions='renumber' needs 1-D RoPE; this model uses M-RoPE (use 'auto' or 'keep')")
        # without a budget the layers are known now; with one, prepare picks them from the image's tokens
        self._layers = list(config.layers) if config.layers is not None else \
            scaled_layers(PAPER_STAGE_FRACTIONS, adapter.num_layers)
        super().__init__(adapter, config)

    def pruner_rotary(self):
        renumber = self.config.positions == "renumber" or (self.config.positions == "auto" and
                                                           not self.adapter.uses_mrope)
        return self.adapter.rotary_embedding if renumber else None


    def stage_layers(self) -> list[int]:
        return list(self._layers)

    def prepare(self, inputs, spans, boxes):
        schedules = [pdrop_schedule(s.visual_tokens, self.config.keep_tokens, self.adapter.num_layers,
                                    self.config.layers, self.config.ratio) for s in spans]
        layers = schedules[0][0] if schedules else self._layers
        if any(sched[0] != layers for sched in schedules):
            raise ValueError("PyramidDrop runs one stage-layer list per batch, and these images' budgets need "
                             "different ones; batch images of similar size, or give layers=...")
        if layers != self._layers:
            self._layers = layers
            self.move_stages()
        self._counts = [sched[1] for sched in schedules]  # per image, per stage
        return super().prepare(inputs, spans, boxes)

    def planned_counts(self, n_in):
        layers, counts = pdrop_schedule(n_in, self.config.keep_tokens, self.adapter.num_layers, self.config.layers,
                                        self.config.ratio)
        return visual_counts_per_layer(n_in, list(zip(layers, counts, strict=True)), self.adapter.num_layers)

    def selection_flops(self, seq_len, n_in):
        # per stage: the stage layer's q/k projections over the sequence entering it (and their per-head norms,
        # where the layer has them), plus one row
        parts = self.adapter.attention_parts(self.stage_layers()[0])
        hidden = int(self.adapter.text_config.hidden_size)
        layers, counts = pdrop_schedule(n_in, self.config.keep_tokens, self.adapter.num_layers, self.config.layers,
                                        self.config.ratio)
        text = seq_len - n_in
        total, current = 0, n_in
        for count in counts:
            length = text + current
            total += 2 * hidden * (parts.heads + parts.kv_heads) * parts.head_dim * length  # q_proj + k_proj
            total += 2 * parts.heads * parts.head_dim * length  # the last token's row
            total += 4 * parts.head_dim * (parts.kv_heads * length * (parts.k_norm is not None)  # Qwen3's k_norm
                                           + parts.heads * (parts.q_norm is not None))  # and q_norm (one query)
            current = count
        return total

    def scores(self, stage, hidden, layer_kwargs):
        return self.last_token_scores(stage, hidden, layer_kwargs)

    def keep_count(self, image, stage, n):
        return self._counts[image][stage]
