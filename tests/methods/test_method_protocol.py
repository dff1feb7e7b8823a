"""The method protocol on its own: selections made inside the model, one or several stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from crop.api import apply_method
from crop.hf_compat import generated_cache
from crop.methods import METHODS, InnerLLMMethod, method_for
from crop.methods.base import equivalent_tokens
from tests.conftest import chat_inputs, greedy, random_image


@dataclass
class NormConfig:
    """Keep, at each stage, the ``keep[s]`` visual tokens with the largest hidden-state norm."""

    layers: tuple[int, ...] = (2,)
    keep: tuple[int | None, ...] = (64,)
    method_name: ClassVar[str] = "test-norm"


class NormMethod(InnerLLMMethod):
    name = "test-norm"
    config_class = NormConfig

    def stage_layers(self):
        return list(self.config.layers)

    def select_at_layer(self, stage, hidden, layer_kwargs, candidates):
        budget = self.config.keep[stage]
        out = []
        for b, per_sample in enumerate(candidates):
            for slots in per_sample:
                if budget is None:
                    out.append(torch.arange(slots.numel()))
                    continue
                norms = hidden[b, slots].norm(dim=-1)  # (v,)
                out.append(norms.topk(min(budget, slots.numel())).indices)
        return out


@pytest.fixture(autouse=True, scope="module")
def _norm_method_registered():
    """Register the test's method for this module only, so other tests' lists of methods never see it."""
    METHODS.register("test-norm")(NormMethod)
    yield
    del METHODS._items["test-norm"], METHODS._by_config[NormConfig]



def test_method_for_and_unknown():
    assert method_for(NormConfig()) is NormMethod
    with pytest.raises(ValueError, match="not a method config"):
        method_for(object())


def test_equivalent_tokens():
    assert equivalent_tokens(576, [(2, 64)], 4) == (576 * 2 + 64 * 2) / 4
    assert equivalent_tokens(100, [(1, 50), (3, 10)], 4) == (100 + 50 + 50 + 10) / 4


def test_deferred_keep_all_is_bit_identical(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(41)], ["What is it?"])
    ref = greedy(model, inputs, 6)
    with apply_method(model, NormConfig(keep=(None,))) as h:
        out = greedy(model, h.prepare(inputs), 6)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


def test_two_stages_kv_lengths_stats_and_cache_consistency(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(42)], ["What color is the star?"])
    prompt = inputs["input_ids"].shape[1]
    text = prompt - 576
    with apply_method(model, NormConfig(layers=(1, 3), keep=(200, 50))) as h:
        run = h.prepare(inputs)
        cached = greedy(model, run, 6)
        stats = h.stats
        assert stats.visual_tokens_kept == {"llm_input": [576], "after_layer_1": [200], "after_layer_3": [50]}
        assert stats.equivalent_tokens == [pytest.approx((576 + 200 * 2 + 50) / 4)]
        assert len(stats.full_resolution[0]) == 50
        lengths = [layer.keys.shape[-2] - 5 for layer in generated_cache(cached).layers]
        assert lengths == [prompt, text + 200, text + 200, text + 50]
        uncached = greedy(model, h.prepare(inputs), 6, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_two_stages_batch_matches_single(llava_sdpa):
    model, proc = llava_sdpa
    images = [random_image(43), random_image(44, (500, 336))]
    questions = ["What color is the star?", "How many circles are there in the picture?"]
    config = NormConfig(layers=(1, 3), keep=(150, 40))
    with apply_method(model, config) as h:
        batch = greedy(model, h.prepare(chat_inputs(proc, images, questions)), 6)
        singles = [greedy(model, h.prepare(chat_inputs(proc, [im], [q])), 6) for im, q in zip(images, questions, strict=True)]
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -6:], single.sequences[0, -6:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


def test_removed_handle_refuses_prepare(llava_sdpa):
    model, proc = llava_sdpa
    h = apply_method(model, NormConfig())
    h.remove()
    with pytest.raises(RuntimeError, match="removed"):
        h.prepare(chat_inputs(proc, [random_image(45)], ["q?"]))
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
