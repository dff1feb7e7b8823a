"""DART keeps the same tokens for a prompt whatever runs it: alone or left-padded in a batch, ``forward()`` or
``generate()``, eager or ``torch.compile``.

Two things made the kept set depend on how the prompt ran (25 of 116 tokens, logits 0.03 apart):
the pivots' keys were rotated with the layer's own rotary tables, whose positions a plain
``forward()`` of a left-padded LLaVA batch counts from the first pad (``generate()`` counts real
tokens only), and under ``torch.compile`` dynamo iterated the pivots' Python ``set`` in insertion
order instead of CPython's, so they were visited in another order. Each fix has a test here, and
each test is shown to catch the bug it guards against (the old behaviour patched back in).
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.methods.base import InnerLLMMethod
from crop.methods.dart import DART, DARTConfig
from crop.models import get_adapter
from tests.conftest import chat_inputs, greedy, random_image, tiny

IMAGES = [random_image(41, (400, 300)), random_image(42, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there in this picture, counting all of them?"]


def _setup(name: str):
    """``(model, batch, singles, config)``: a left-padded batch of two prompts, each prompt alone, a pruning DART."""
    model, proc = tiny(name)
    batch = chat_inputs(proc, IMAGES, QUESTIONS)
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["input_ids"].shape[1]  # the first one is padded
    singles = [chat_inputs(proc, [image], [question]) for image, question in zip(IMAGES, QUESTIONS, strict=True)]
    visual = min(s.visual_tokens for s in get_adapter(model).image_spans(batch))
    return model, batch, singles, DARTConfig(keep_tokens=int(0.2 * visual))


def _forward(model, inputs):
    return model(**inputs)


def _generate(model, inputs):
    return greedy(model, inputs, steps=2)


RUNS = {"forward": _forward, "generate": _generate}


def _kept(model, inputs, config, run=_forward, runner=None) -> list[list[int]]:
    """Per image, the span indices DART kept (``runner``: the module to call, e.g. a compiled model)."""
    with apply_method(model, config) as handle:
        prepared = handle.prepare(inputs)
        if runner is None:
            run(model, prepared)
        else:
            runner(**prepared)
        return handle.prepared_stats().full_resolution


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl"])
@pytest.mark.parametrize("run", list(RUNS))
def test_a_prompt_keeps_the_same_tokens_alone_or_padded_in_a_batch(name, run):
    model, batch, singles, config = _setup(name)
    alone = [_kept(model, single, config, RUNS[run])[0] for single in singles]
    assert _kept(model, batch, config, RUNS[run]) == alone


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl"])
def test_forward_and_generate_keep_the_same_tokens_and_logits(name):
    model, batch, _, config = _setup(name)
    assert _kept(model, batch, config, _forward) == _kept(model, batch, config, _generate)
    with apply_method(model, config) as handle:
        logits = model(**handle.prepare(batch)).logits[:, -1]  # (B, V)
        generated = greedy(model, handle.prepare(batch), steps=1).logits[0]  # (B, V) the prefill's last position
    torch.testing.assert_close(logits, generated, atol=1e-5, rtol=1e-5)  # positions differ, attention is relative


def test_the_padding_test_catches_keys_rotated_at_the_layers_positions(monkeypatch):
    """With the layer's own tables (positions from the first pad in a plain forward), the padded prompt keeps others."""
    model, batch, singles, config = _setup("tiny-random-llava")
    monkeypatch.setattr(DART, "key_rotary", lambda self, hidden, layer_kwargs, valid: layer_kwargs["position_embeddings"])
    alone = _kept(model, singles[0], config)[0]
    padded = _kept(model, batch, config)[0]
    assert len(set(alone) ^ set(padded)) > 0


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # dynamo is what changed the order; inductor agrees too
def test_a_compiled_model_keeps_the_same_tokens(fresh_dynamo, backend):
    model, batch, _, config = _setup("tiny-random-llava")
    eager = _kept(model, batch, config)
    assert _kept(model, batch, config, runner=torch.compile(model, backend=backend)) == eager


def test_the_compile_test_catches_the_selection_traced_by_dynamo(fresh_dynamo, monkeypatch):
    """Without ``torch.compiler.disable`` around the selection, dynamo visits the pivots in another order."""
    model, batch, _, config = _setup("tiny-random-llava")
    eager = _kept(model, batch, config)
    monkeypatch.setattr(DART, "_selector", InnerLLMMethod._selector)
    compiled = _kept(model, batch, config, runner=torch.compile(model, backend="eager"))
    assert compiled != eager
