"""The matched-compute budget solver and the FLOPs accounting of the evaluation."""

from __future__ import annotations

import pytest

from crop.embedded import build_from_shape
from crop.eval.flops import DecoderDims, prefill_flops
from crop.eval.matching import planned_counts, planned_equivalent, planned_flops, solve_budget
from crop.methods import config_builder, method_names
from crop.models import get_adapter

# LLaVA-1.5 geometry (576 tokens) with a 12-layer LM: K = 2 is 1/6 of the depth
SHAPE = dict(image_size=336, patch_size=14, vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=12,
             text_intermediate=128)
N = 576


@pytest.fixture(scope="module")
def adapter():
    return get_adapter(build_from_shape("llava", SHAPE)[0])


@pytest.mark.parametrize("name", [m for m in method_names() if m != "none"])
@pytest.mark.parametrize("target", [128.0, 192.0])
def test_every_method_meets_a_feasible_equivalent_target(adapter, name, target):
    options = {"layer": 2}
    sol = solve_budget(lambda b: planned_equivalent(adapter, config_builder(name, shared=options), b, N), target, N, tolerance=1.0)
    assert sol.feasible, sol.reason
    # within one token per image, except DART's official count, which moves 8 tokens at a time after K
    step = 8 * (12 - 2) / 12 if name == "dart" else 1.0
    assert abs(sol.planned - target) <= max(1.0, step / 2)
    assert sol.planned == pytest.approx(planned_equivalent(adapter, config_builder(name, shared=options), sol.keep_tokens, N))


def test_an_infeasible_target_says_why(adapter):
    # 64 of 576 equivalent: layers 0..1 alone cost 2/12 * 576 = 96 for any method pruning at K = 2
    sol = solve_budget(lambda b: planned_equivalent(adapter, config_builder("crop-ilp", shared={"layer": 2}), b, N), 64.0, N, 1.0)
    assert not sol.feasible and "cheapest budget plans" in sol.reason
    # ... and at K = 1 it fits: 576/12 + 11/12 * b = 64 -> b = 17.45
    sol = solve_budget(lambda b: planned_equivalent(adapter, config_builder("crop-ilp", shared={"layer": 1}), b, N), 64.0, N, 1.0)
    assert sol.feasible and sol.keep_tokens == 17
    # pre-LLM methods meet it exactly; PyramidDrop falls back to its low-budget layer list
    sol = solve_budget(lambda b: planned_equivalent(adapter, config_builder("visionzip"), b, N), 64.0, N, 1.0)
    assert sol.keep_tokens == 64 and sol.planned == 64
    assert not solve_budget(lambda b: 10.0 * b, 0.5, 10, 0.1).feasible
    assert not solve_budget(lambda b: 10.0 * b, 500.0, 10, 0.1).feasible


def test_flops_count_llm_selection_and_localizer(adapter):
    dims = DecoderDims.from_config(adapter.text_config)
    text = 40
    ilp = planned_flops(adapter, config_builder("crop-ilp", shared={"layer": 2}), 30, N, text, localizer_flops=1e6)
    fastv = planned_flops(adapter, config_builder("fastv", shared={"layer": 2}), 30, N, text, localizer_flops=1e6)
    layers = [text + N] * 2 + [text + 30] * 10
    assert fastv == prefill_flops(dims, layers)  # FastV's captured row is free; no localizer
    assert ilp == prefill_flops(dims, layers) + 1e6  # CROP pays for its localizer
    pdrop = planned_flops(adapter, config_builder("pdrop"), 128, N, text)
    counts = planned_counts(adapter, config_builder("pdrop"), 128, N)
    assert pdrop > prefill_flops(dims, [text + c for c in counts])  # its lightweight attention is counted
