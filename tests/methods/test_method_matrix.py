"""Every registered method x every architecture: the invariants a pruning method must keep.

The matrix is built from the registry, so a newly registered method is tested here without
being listed anywhere: keep-all is bit-identical to the stock model, removing the handle
restores it, cached generation equals no-cache greedy, a batch equals its samples one by one,
and (inner-LLM methods) each decoder layer caches exactly the tokens the stats say it kept.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.hf_compat import generated_cache
from crop.methods import METHODS, InnerLLMMethod, method_names
from crop.models import get_adapter
from crop.regions import GridBox
from tests.conftest import ARCHS, chat_inputs, greedy, method_config, random_image, tiny

IMAGES = [random_image(41, (400, 300)), random_image(42, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
BOXES = [GridBox(1, 1, 4, 5), GridBox(3, 0, 7, 3)]
MATRIX_METHODS = [m for m in method_names() if m != "none" and not m.startswith("test-")]
CASES = [pytest.param(m, a, id=f"{m}-{a}") for m in MATRIX_METHODS for a in ARCHS]


def _inputs(name: str, images=IMAGES, questions=QUESTIONS):
    _, proc = tiny(name)
    return chat_inputs(proc, images, questions)


def _budget(model, inputs, share: float) -> int:
    """A budget that really prunes: ``share`` of the smallest image's visual tokens (at least ``share / 2`` of the
    largest's, which PyramidDrop needs when images are 3x apart: InternVL's one tile vs two tiles + thumbnail)."""
    counts = [s.visual_tokens for s in get_adapter(model).image_spans(inputs)]
    return max(int(share * min(counts)), int(share * max(counts) / 2))


def test_the_matrix_is_the_registry():
    # test files may register throwaway methods named test-*; every real method is in the matrix
    assert set(MATRIX_METHODS) | {"none"} == {m for m in METHODS.names() if not m.startswith("test-")}


@pytest.mark.parametrize("method,name", CASES)
def test_keep_all_is_bit_identical_and_removal_restores(method, name):
    model, _ = tiny(name)
    inputs = _inputs(name)
    ref = model(**inputs).logits
    with apply_method(model, method_config(method, 10**6, model)) as h:  # a budget above every image's tokens
        logits = model(**h.prepare(inputs, BOXES)).logits
    assert torch.equal(logits, ref)
    with apply_method(model, method_config(method, _budget(model, inputs, 0.6), model)) as h:
        model(**h.prepare(inputs, BOXES))
    assert torch.equal(model(**inputs).logits, ref)  # removed: the stock model again


@pytest.mark.parametrize("method,name", CASES)
def test_cache_equals_no_cache_and_batch_equals_one_by_one(method, name):
    model, _ = tiny(name)
    inputs = _inputs(name)
    config = method_config(method, _budget(model, inputs, 0.6), model, {"layer": 2})
    with apply_method(model, config) as h:
        cached = greedy(model, h.prepare(inputs, BOXES), use_cache=True)
        batch_kept = h.stats.full_resolution
        uncached = greedy(model, h.prepare(inputs, BOXES), use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for i, (image, question, box) in enumerate(zip(IMAGES, QUESTIONS, BOXES, strict=True)):
        with apply_method(model, config) as h:
            single = greedy(model, h.prepare(_inputs(name, [image], [question]), [box]))
            assert h.stats.full_resolution[0] == batch_kept[i]
        assert torch.equal(cached.sequences[i, -2:], single.sequences[0, -2:])
        for step_b, step_s in zip(cached.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,name", [c for c in CASES if issubclass(METHODS.get(c.values[0]), InnerLLMMethod)])
def test_each_layer_caches_what_the_stats_say(method, name):
    model, _ = tiny(name)
    inputs = _inputs(name, IMAGES[:1], QUESTIONS[:1])
    span = get_adapter(model).image_spans(inputs)[0]
    with apply_method(model, method_config(method, _budget(model, inputs, 0.6), model)) as h:
        out = model(**h.prepare(inputs, BOXES[:1]), use_cache=True)
        kept, layers = h.stats.visual_tokens_kept, h.method.stage_layers()
        planned = h.method.planned_counts(span.visual_tokens)
    per_layer, current = [], span.visual_tokens
    for layer in range(len(get_adapter(model).decoder_layers())):
        current = kept.get(f"after_layer_{layer}", [current])[0]
        per_layer.append(current)
    other = inputs["input_ids"].shape[1] - span.visual_tokens
    # structure tokens (LLaVA-NeXT's row newlines) go with the rows they end; count cache slots, not tokens
    lengths = [layer.keys.shape[-2] for layer in generated_cache(out).layers]
    if span.length == span.visual_tokens:
        assert lengths == [other + n for n in per_layer]
    assert lengths[0] == inputs["input_ids"].shape[1] and all(a >= b for a, b in zip(lengths, lengths[1:], strict=False))
    if planned is not None:
        assert planned == per_layer  # what the budget solver predicts is what runs
    assert set(kept) == {"llm_input", *(f"after_layer_{k}" for k in layers)}
