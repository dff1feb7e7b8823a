"""Training-free pre-LLM compression on a tiny random LLaVA-1.5."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_crop
from crop.config import CropPLCConfig
from crop.hf_compat import generated_cache
from crop.ops.pooling import count_pooled
from crop.regions import GridBox
from tests.conftest import chat_inputs, random_image


def test_keep_all_is_bit_identical(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [random_image(11)], ["What is here?"])
    ref_logits = model(**inputs).logits
    ref = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with apply_crop(model, CropPLCConfig()) as crop:
        run = crop.prepare(inputs, [None])
        assert crop.stats.visual_tokens_kept["llm_input"] == [576]
        assert torch.equal(model(**run).logits, ref_logits)
        out = model.generate(**run, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, -10:], ref.sequences[:, -10:])
    for a, b in zip(out.logits, ref.logits, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pool", [2, 4])
def test_tokens_reaching_llm_are_region_plus_pooled(llava_sdpa, pool):
    model, proc = llava_sdpa
    inputs = chat_inputs(proc, [random_image(12)], ["What number is on the green card?"])
    box = GridBox(1, 2, 3, 4)  # 9x9 = 81 tokens
    region = box.token_indices(24, 24)
    expected = 81 + count_pooled(24, 24, region, pool)
    with apply_crop(model, CropPLCConfig(pool=pool)) as crop:
        run = crop.prepare(inputs, [box])
        out = model(**run, use_cache=True)
    assert crop.stats.region_tokens == [81]
    assert crop.stats.visual_tokens_kept["llm_input"] == [expected]
    assert int((run["input_ids"] == model.config.image_token_id).sum()) == expected
    text = inputs["input_ids"].shape[1] - 576
    assert [layer.keys.shape[-2] for layer in generated_cache(out).layers] == [text + expected] * 4


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_budget_counts_region_plus_pooled(llava_sdpa, budget):
    model, proc = llava_sdpa
    inputs = chat_inputs(proc, [random_image(13)], ["What color is the star?"])
    with apply_crop(model, CropPLCConfig(keep_tokens=budget)) as crop:
        run = crop.prepare(inputs, [GridBox(5, 5, 6, 6)])
        model.generate(**run, max_new_tokens=3, do_sample=False)
    assert crop.stats.visual_tokens_kept["llm_input"] == [budget]
    assert int((run["input_ids"] == model.config.image_token_id).sum()) == budget


def test_budget_below_pooled_context_is_a_clear_error(llava_sdpa):
    model, proc = llava_sdpa
    inputs = chat_inputs(proc, [random_image(14)], ["q?"])
    with apply_crop(model, CropPLCConfig(keep_tokens=10, pool=4)) as crop:
        with pytest.raises(ValueError, match="cannot meet keep_tokens=10"):
            crop.prepare(inputs, [GridBox(0, 0, 0, 0)])


def test_batch_matches_one_by_one(llava_sdpa):
    model, proc = llava_sdpa
    images = [random_image(15), random_image(16, (500, 336))]
    questions = ["What color is the star?", "What shape is left of the red circle?"]
    boxes = [GridBox(0, 0, 1, 1), GridBox(2, 2, 7, 7)]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with apply_crop(model, CropPLCConfig()) as crop:
        batch = model.generate(**crop.prepare(chat_inputs(proc, images, questions), boxes), **kw)
        singles = [model.generate(**crop.prepare(chat_inputs(proc, [im], [q]), [b]), **kw)
                   for im, q, b in zip(images, questions, boxes, strict=True)]
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -8:], single.sequences[0, -8:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)
