"""Inner-LLM methods x every architecture under FlashAttention-2, on padded batches (issue 28).

FlashAttention takes a ``(B, L)`` padding mask (or none) and is causal in the order of each row's
unpadded tokens; inner-LLM pruning used to hand the pruned layers the unpruned sequence's mask and
crashed (index out of bounds, a device-side assert on CUDA). Here transformers' own FA2 code path
runs on the CPU with a reference kernel (:mod:`tests.flash_reference`): the pruned model under
FA2 must keep the same tokens and give the same logits and greedy tokens as under SDPA. The real
kernel runs in ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.methods import METHODS, InnerLLMMethod
from crop.models import get_adapter
from crop.regions import GridBox
from tests import flash_reference
from tests.conftest import ARCHS, chat_inputs, greedy, method_config, random_image, tiny
from tests.flash_reference import reference_flash_attention
from tests.methods.test_method_matrix import MATRIX_METHODS

# prompts of different lengths, so the batch is left-padded (FA2 takes the varlen path)
IMAGES = [random_image(51, (400, 300)), random_image(52, (336, 500))]
QUESTIONS = ["What color is it?", "How many circles are there left of the big red star?"]
BOXES = [GridBox(1, 1, 4, 5), GridBox(3, 0, 7, 3)]
# every inner-LLM method (their pruned layers get a new mask) and one pre-LLM method (a rebuilt prompt)
FLASH_METHODS = [m for m in MATRIX_METHODS if issubclass(METHODS.get(m), InnerLLMMethod)] + ["crop-plc"]
# Gemma 3 is left out: transformers refuses FlashAttention for it (FA2 cannot take its bidirectional image mask)
FLASH_ARCHS = [a for a in ARCHS if a != "tiny-random-gemma3"]
CASES = [pytest.param(m, a, id=f"{m}-{a}") for m in FLASH_METHODS for a in FLASH_ARCHS]


def _budget(model, inputs) -> int:
    counts = [s.visual_tokens for s in get_adapter(model).image_spans(inputs)]
    # PyramidDrop's first stage alone costs a quarter of an image: with images 3x apart (InternVL: 1 tile vs 2 tiles +
    # thumbnail), half the smaller one is not a budget it can meet
    return max(int(0.5 * min(counts)), int(0.3 * max(counts)))


@pytest.fixture
def kernel_calls():
    """Counts the reference kernel's calls, so a test proves FA2 really ran."""
    flash_reference.CALLS["kernel"] = 0
    return flash_reference.CALLS


def _run(model, config, inputs, steps: int = 2):
    with apply_method(model, config) as handle:
        run = handle.prepare(inputs, BOXES)
        logits = model(**run).logits[:, -1]  # (B, V) the prompt's last position
        out = greedy(model, handle.prepare(inputs, BOXES), steps=steps)
        return logits, out.sequences, handle.stats


@pytest.mark.parametrize("method,name", CASES)
def test_flash_attention_matches_sdpa_on_a_padded_batch(method, name, kernel_calls):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    assert not bool(inputs["attention_mask"].all()), "the batch must be padded"
    config = method_config(method, _budget(model, inputs), model)
    ref_logits, ref_tokens, ref_stats = _run(model, config, inputs)
    with reference_flash_attention(model):
        logits, tokens, stats = _run(model, config, inputs)
    assert kernel_calls["kernel"] > 0  # FA2's glue and the reference kernel really ran
    assert stats.visual_tokens_kept == ref_stats.visual_tokens_kept
    assert stats.kept_per_stage == ref_stats.kept_per_stage
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("name", FLASH_ARCHS)
@pytest.mark.parametrize("method", ["crop-ilp", "fastv", "dart"])
def test_flash_attention_batch_of_one_takes_the_packed_sequence_check(method, name):
    """Batch 1, no mask: FA2 reads the kept positions (with gaps) to look for packed sequences; one sequence it must stay."""
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    config = method_config(method, _budget(model, inputs), model)
    with apply_method(model, config) as handle:
        ref = model(**handle.prepare(inputs, BOXES[:1])).logits
    with reference_flash_attention(model), apply_method(model, config) as handle:
        logits = model(**handle.prepare(inputs, BOXES[:1])).logits
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FLASH_ARCHS)
def test_flash_attention_keep_all_equals_the_stock_flash_model(name):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    with reference_flash_attention(model):
        stock = model(**inputs).logits
        with apply_method(model, method_config("crop-ilp", 10**6, model)) as handle:
            kept_all = model(**handle.prepare(inputs, BOXES)).logits
    assert torch.equal(kept_all, stock)
