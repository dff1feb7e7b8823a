"""Inner-LLM pruning on a tiny random LLaVA-1.5 (576 visual tokens, 4 decoder layers)."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_crop
from crop.config import CropILPConfig
from crop.hf_compat import generated_cache
from crop.regions import GridBox
from tests.conftest import chat_inputs, greedy, random_image, tiny


def test_keep_all_is_bit_identical_forward_and_generate(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(1)], ["What is in the image?"])
    ref_logits = model(**inputs).logits
    ref = greedy(model, inputs, 10)
    with apply_crop(model, CropILPConfig(keep_tokens=None)) as crop:
        run = crop.prepare(inputs, [GridBox.full()])
        assert torch.equal(model(**run).logits, ref_logits)
        out = greedy(model, crop.prepare(inputs, [None]), 10)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)


def test_removal_restores_model_bit_identically(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(2)], ["Where is the cat?"])
    before = model(**inputs).logits
    hooks_before = [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers]
    crop = apply_crop(model, CropILPConfig(keep_tokens=64))
    pruned = model(**crop.prepare(inputs, [GridBox(1, 1, 3, 3)])).logits
    assert not torch.allclose(pruned[:, -1], before[:, -1])  # the pruning really changed the computation
    crop.remove()
    crop.remove()  # idempotent
    assert [len(layer._forward_pre_hooks) for layer in model.model.language_model.layers] == hooks_before
    assert torch.equal(model(**inputs).logits, before)


def test_kv_lengths_region_without_budget(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(3)], ["What color is the star?"])
    prompt_len = inputs["input_ids"].shape[1]
    text = prompt_len - 576
    box = GridBox(2, 2, 5, 5)  # 4x4 cells = 12x12 = 144 tokens
    with apply_crop(model, CropILPConfig(layer=2)) as crop:
        out = model(**crop.prepare(inputs, [box]), use_cache=True)
        assert crop.stats.visual_tokens_kept == {"llm_input": [576], "after_layer_2": [144]}
    lengths = [layer.keys.shape[-2] for layer in generated_cache(out).layers]
    assert lengths == [prompt_len, prompt_len, text + 144, text + 144]


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("box", [GridBox(2, 2, 5, 5), GridBox(3, 3, 4, 4)], ids=["region144", "region36"])
def test_budget_is_met_exactly(llava_sdpa, budget, box):
    model, proc = llava_sdpa
    inputs = chat_inputs(proc, [random_image(4)], ["What number is on the card?"])
    prompt_len = inputs["input_ids"].shape[1]
    with apply_crop(model, CropILPConfig(keep_tokens=budget, layer=2)) as crop:
        out = model(**crop.prepare(inputs, [box]), use_cache=True)
        assert crop.stats.visual_tokens_kept["after_layer_2"] == [budget]
    lengths = [layer.keys.shape[-2] for layer in generated_cache(out).layers]
    assert lengths == [prompt_len] * 2 + [prompt_len - 576 + budget] * 2


def test_cached_generation_matches_no_cache_greedy(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(5)], ["What shape is left of the red circle?"])
    with apply_crop(model, CropILPConfig(keep_tokens=64, layer=2)) as crop:
        run = crop.prepare(inputs, [GridBox(0, 4, 3, 7)])
        cached = greedy(model, run, 10, use_cache=True)
        uncached = greedy(model, run, 10, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batch_of_two_matches_one_by_one(llava):
    model, proc = llava
    images = [random_image(6), random_image(7, (336, 500))]
    questions = ["What color is the star?", "How many circles are there in this picture?"]
    boxes = [GridBox(0, 0, 2, 2), GridBox(3, 1, 7, 6)]  # 81 vs 270 region tokens: ragged kept sets
    config = CropILPConfig(layer=2)
    with apply_crop(model, config) as crop:
        batch = greedy(model, crop.prepare(chat_inputs(proc, images, questions), boxes), 10)
        assert crop.stats.visual_tokens_kept["after_layer_2"] == [81, 270]
        singles = [greedy(model, crop.prepare(chat_inputs(proc, [im], [q]), [b]), 10)
                   for im, q, b in zip(images, questions, boxes, strict=True)]
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -10:], single.sequences[0, -10:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


def test_unprepared_call_raises_clear_error(llava_sdpa):
    model, proc = llava_sdpa
    inputs = chat_inputs(proc, [random_image(8)], ["q?"])
    with apply_crop(model, CropILPConfig()):
        with pytest.raises(RuntimeError, match="prepare"):
            model(**inputs)


def test_layer_outside_depth_and_box_count(llava_sdpa):
    model, proc = llava_sdpa
    with pytest.raises(ValueError, match="outside the model's depth"):
        apply_crop(model, CropILPConfig(layer=4))
    inputs = chat_inputs(proc, [random_image(9)], ["q?"])
    with apply_crop(model, CropILPConfig()) as crop, pytest.raises(ValueError, match="boxes for 1 images"):
        crop.prepare(inputs, [None, None])
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_unsupported_model_type_lists_supported():
    from crop.models import get_adapter

    with pytest.raises(ValueError, match=r"supported: (\w+, )*llava, llava_next"):
        get_adapter(torch.nn.Linear(2, 2))


def test_tiny_cache_reuse_is_safe():
    # the shared tiny model must be untouched by other tests (no hooks left behind)
    model, _ = tiny("tiny-random-llava")
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
