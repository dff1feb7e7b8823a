"""Matched compute: solve each method's budget argument for an equivalent-token or FLOPs target.

Budgets keep each method's native meaning (tokens after layer K for FastV / DART / CROP-ILP,
tokens reaching the LLM for VisionZip / PLC / pooling, a layer-weighted average for PyramidDrop
and SparseVLM), so one label means different compute for different methods. A fair comparison
gives every method the same compute instead: this module finds, per method, the budget whose
*planned* per-layer visual-token counts (:meth:`crop.methods.PruningMethod.planned_counts`)
meet a target, either in equivalent tokens (their mean over layers, the FastV / PDrop
convention) or in analytic prefill FLOPs (the LLM's, plus the method's own selection, plus the
localizer's for methods that use one). What the method then really ran is measured, not assumed:
the evaluation records the equivalent tokens of every sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from crop.eval.flops import DecoderDims, prefill_flops
from crop.methods import ConfigAt, method_for
from crop.models.base import VLMAdapter

MATCH_MODES = ("label", "equivalent", "flops")
REFERENCE_VISUAL_TOKENS = 576  # budgets are given as LLaVA-1.5 counts (of 576) and scaled to the model


@dataclass(frozen=True)
class BudgetSolution:
    """The budget argument found for one method and target.

    Attributes:
        keep_tokens: the method's budget argument (native meaning), or ``None`` if infeasible.
        planned: the planned value at that budget (equivalent tokens or FLOPs).
        target: the target.
        feasible: whether some budget comes within ``tolerance`` of the target.
        reason: why not, when infeasible.
    """

    keep_tokens: int | None
    planned: float
    target: float
    feasible: bool
    reason: str = ""


def _method(adapter: VLMAdapter, config_at: ConfigAt, keep_tokens: int):
    config = config_at(keep_tokens)
    return method_for(config)(adapter, config)


def planned_counts(adapter: VLMAdapter, config_at: ConfigAt, keep_tokens: int, n_in: int) -> list[int] | None:
    """Per-layer visual tokens the method plans at ``keep_tokens`` for an image of ``n_in`` tokens."""
    return _method(adapter, config_at, keep_tokens).planned_counts(n_in)


def planned_equivalent(adapter: VLMAdapter, config_at: ConfigAt, keep_tokens: int, n_in: int) -> float:
    """The equivalent visual tokens (mean over layers) the method plans at ``keep_tokens``.

    Raises:
        ValueError: if the budget is infeasible for the method or its count depends on the data.
    """
    counts = planned_counts(adapter, config_at, keep_tokens, n_in)
    if counts is None:
        raise ValueError("this method has no planned count without a budget")
    return sum(counts) / len(counts)


def planned_flops(adapter: VLMAdapter, config_at: ConfigAt, keep_tokens: int, n_in: int, text_tokens: int,
                  localizer_flops: float = 0.0) -> float:
    """Analytic prefill FLOPs of one sample: LLM layers + the method's selection + its localizer (if it uses one).

    Args:
        text_tokens: the prompt's tokens that are not visual (they go through every layer).
        localizer_flops: FLOPs of one localization; counted for methods that follow the region.
    """
    method = _method(adapter, config_at, keep_tokens)
    counts = method.planned_counts(n_in)
    if counts is None:
        raise ValueError("this method has no planned count without a budget")
    dims = DecoderDims.from_config(adapter.text_config)
    flops = prefill_flops(dims, [text_tokens + c for c in counts])
    flops += method.selection_flops(text_tokens + n_in, n_in)
    return flops + (localizer_flops if method.uses_region else 0.0)


def solve_budget(value: Callable[[int], float], target: float, n_in: int, tolerance: float,
                 unit: Callable[[float], str] = lambda v: f"{v:.1f}") -> BudgetSolution:
    """The integer budget in ``[1, n_in]`` whose planned ``value`` is closest to ``target``.

    Every budget is tried (a method's plan is arithmetic, so this is cheap); budgets the method
    refuses (it raises ``ValueError``, e.g. PyramidDrop below what its layer list can reach) are
    skipped; ties go to the smaller budget. The target is *infeasible* when it lies outside
    what the method can plan at all (beyond ``tolerance``): below its cheapest budget or above
    keeping everything. Inside that range the closest budget is used even when the method's own
    granularity keeps it further than ``tolerance`` (DART's official count moves in steps of
    8 tokens); the planned value is reported beside the target either way.

    Args:
        value: budget -> planned equivalent tokens or FLOPs (not decreasing with the budget).
        target: what to meet.
        n_in: the image's visual tokens (the largest budget tried).
        tolerance: how far outside the method's range still counts as met (one token per image).
        unit: how a planned value is written in the reason (e.g. as GFLOPs).
    """
    planned: dict[int, float] = {}
    for budget in range(1, n_in + 1):
        try:
            planned[budget] = value(budget)
        except ValueError:
            continue
    if not planned:
        return BudgetSolution(None, float("nan"), target, False, "no budget is feasible for this method here")
    best = min(planned, key=lambda b: (abs(planned[b] - target), b))
    low, high = min(planned.values()), max(planned.values())
    if target < low - tolerance:
        return BudgetSolution(best, planned[best], target, False,
                              f"its cheapest budget plans {unit(low)}, over the target {unit(target)}")
    if target > high + tolerance:
        return BudgetSolution(best, planned[best], target, False,
                              f"keeping every token plans {unit(high)}, under the target {unit(target)}")
    return BudgetSolution(best, planned[best], target, True)


def scale_budget(budget: int, visual_tokens: int) -> int:
    """A LLaVA-1.5 budget (of 576 tokens) scaled to the same fraction of ``visual_tokens``."""
    return max(1, round(budget * visual_tokens / REFERENCE_VISUAL_TOKENS))


def budget_for(adapter: VLMAdapter, config_at: ConfigAt, budget: int | None, match: str, visual: int, text: int,
               loc_flops: float, dims: DecoderDims) -> tuple[float | None, BudgetSolution | None]:
    """``(target, solution)``: what a budget label asks of one method under ``match``.

    Args:
        adapter: the answerer's adapter.
        config_at: the method's ``budget -> config`` (:func:`crop.methods.config_builder`).
        budget: the label, as a LLaVA-1.5 count (of 576); ``None`` for the unpruned model.
        match: one of :data:`MATCH_MODES`.
        visual, text: the prompt's visual and other tokens.
        loc_flops: one localization's FLOPs (charged to region-guided methods).
        dims: the LLM's sizes.

    Returns:
        The target (scaled tokens, equivalent tokens or FLOPs) and the solved budget;
        ``solution=None`` means: run the scaled label as it is.
    """
    if budget is None:
        return None, None
    if match == "label":
        keep = scale_budget(budget, visual)
        try:  # a budget the method cannot run (e.g. PyramidDrop below its first stage) is reported, not run
            planned_counts(adapter, config_at, keep, visual)
        except ValueError as exc:
            return keep, BudgetSolution(keep, float("nan"), keep, False, str(exc))
        return keep, None
    tokens = budget * visual / REFERENCE_VISUAL_TOKENS  # the label's share of this model's visual tokens
    if match == "equivalent":
        return tokens, solve_budget(lambda b: planned_equivalent(adapter, config_at, b, visual), tokens, visual,
                                    tolerance=1.0)
    target = float(prefill_flops(dims, [text + round(tokens)] * dims.layers))  # the label's tokens from layer 0
    per_token = float(prefill_flops(dims, [text + 1] * dims.layers) - prefill_flops(dims, [text] * dims.layers))
    return target, solve_budget(lambda b: planned_flops(adapter, config_at, b, visual, text, loc_flops), target,
                                visual, tolerance=per_token, unit=lambda v: f"{v / 1e9:.3f} GFLOPs")
