"""Localizers: full, fixed, and the generative VLM localizer (parsing, fallback on garbage)."""

from __future__ import annotations

import logging

import torch

from crop.localizers import FixedBoxLocalizer, FullImageLocalizer, VLMLocalizer, make_localizer
from crop.regions import GridBox
from tests.conftest import random_image, tiny


def test_full_and_fixed():
    images = [random_image(1), random_image(2)]
    assert [r.box for r in FullImageLocalizer().localize(images, ["a", "b"])] == [GridBox.full()] * 2
    box = GridBox(1, 2, 3, 4)
    assert [r.box for r in make_localizer("box:1,2,3,4").localize(images, ["a", "b"])] == [box, box]
    assert isinstance(make_localizer("full"), FullImageLocalizer)
    assert isinstance(make_localizer("box:0,0,7,7"), FixedBoxLocalizer)


class _ScriptedGenerate(torch.nn.Module):
    """Wraps a real tiny Qwen2-VL but makes generate emit a scripted text (a test double for a trained model)."""

    def __init__(self, model, tokenizer, replies):
        super().__init__()
        self.inner, self.tokenizer, self.replies = model, tokenizer, list(replies)
        self.calls = []

    def generate(self, input_ids, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        self.inner(input_ids=input_ids, **{k: v for k, v in kwargs.items() if k in {
            "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}})  # the real forward runs
        rows = [self.tokenizer(self.replies.pop(0))["input_ids"] + [self.tokenizer.eos_token_id]
                for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        rows = [r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_vlm_localizer_parses_and_falls_back(caplog):
    model, processor = tiny("tiny-random-qwen2-vl")
    scripted = _ScriptedGenerate(model, processor.tokenizer, ["[1, 2, 5, 6]", "region: (0,0,3,3).", "garbage",
                                                              "[3, 3, 9, 9]"])
    localizer = VLMLocalizer(scripted, processor, grid=8, batch_size=2)
    images = [random_image(i, (336, 280)) for i in range(4)]
    with caplog.at_level(logging.WARNING):
        results = localizer.localize(images, ["What color is the star?"] * 4)
    assert [r.box.as_list() for r in results] == [[1, 2, 5, 6], [0, 0, 3, 3], [0, 0, 7, 7], [0, 0, 7, 7]]
    assert [r.fallback for r in results] == [False, False, True, True]
    assert results[2].raw == "garbage"
    assert sum("unusable" in rec.message for rec in caplog.records) == 2
    assert len(scripted.calls) == 2 and scripted.calls[0]["do_sample"] is False
    prompt = processor.batch_decode(scripted.calls[0]["input_ids"])[0]
    assert "8x8 grid" in prompt and "What color is the star?" in prompt


def test_vlm_localizer_text_first_layout():
    """``image_first=False`` puts the question before the image, as the embedded localizer is trained."""
    model, processor = tiny("tiny-random-qwen2-vl")
    layouts = {}
    for image_first in (True, False):
        scripted = _ScriptedGenerate(model, processor.tokenizer, ["[1, 2, 5, 6]"])
        VLMLocalizer(scripted, processor, image_first=image_first).localize([random_image(1)], ["What color is the star?"])
        prompt = processor.batch_decode(scripted.calls[0]["input_ids"])[0]
        layouts[image_first] = prompt.index("<|vision_start|>") < prompt.index("What color")
    assert layouts == {True: True, False: False}


def test_vlm_localizer_real_random_model_runs_end_to_end():
    """A random Qwen2-VL emits gibberish: the localizer must not crash, and must flag what it did."""
    model, processor = tiny("tiny-random-qwen2-vl")
    results = VLMLocalizer(model, processor).localize([random_image(5)], ["Where is the dog?"])
    assert len(results) == 1 and isinstance(results[0].raw, str)
    assert results[0].fallback or results[0].box.grid == 8


class _ForcedGenerate(torch.nn.Module):
    """A real tiny Qwen2-VL whose real ``generate`` is forced to emit ``script`` and then ``filler`` forever."""

    def __init__(self, model, script: list[int], filler: int):
        super().__init__()
        self.inner, self.script, self.filler = model, script, filler

    def generate(self, input_ids, **kwargs):
        from transformers import LogitsProcessor, LogitsProcessorList

        start, script, filler = input_ids.shape[1], self.script, self.filler

        class Force(LogitsProcessor):
            def __call__(self, ids, scores):
                step = ids.shape[1] - start
                forced = torch.full_like(scores, float("-inf"))
                forced[:, script[step] if step < len(script) else filler] = 0.0
                return forced

        return self.inner.generate(input_ids=input_ids, logits_processor=LogitsProcessorList([Force()]), **kwargs)


def test_vlm_localizer_stops_at_the_box_end():
    """Decoding stops on the token that closes the box: one prefill and one step for corner tokens."""
    from crop.embedded import build_from_shape

    model, processor = build_from_shape("qwen2_vl", {"vision_hidden": 32, "vision_layers": 1, "text_hidden": 32,
                                                     "text_layers": 1, "text_intermediate": 64,
                                                     "max_pixels": 112 * 112, "tokenizer": "words+corners"})
    tok = processor.tokenizer
    box = tok("[1, 2, 5, 6]", add_special_tokens=False)["input_ids"]
    filler = tok(" star", add_special_tokens=False)["input_ids"][0]
    assert len(box) == 2
    images, questions = [random_image(1), random_image(2)], ["What color is the star?"] * 2
    forced = _ForcedGenerate(model, box, filler)
    localizer = VLMLocalizer(forced, processor, max_new_tokens=6)
    new = localizer.generate(localizer.prepare(images, questions))
    assert new.tolist() == [box, box]
    assert [r.box.as_list() for r in localizer.localize(images, questions)] == [[1, 2, 5, 6]] * 2
    # without the stop, the same model runs on to the decode budget (and the parser still reads the box)
    endless = VLMLocalizer(forced, processor, max_new_tokens=6, stop_at_box_end=False)
    assert endless.generate(endless.prepare(images, questions)).shape == (2, 6)
    assert endless.localize(images[:1], questions[:1])[0].raw.startswith("[1, 2, 5, 6] star")


def test_a_vlm_localizer_answers_on_its_own_grid_and_converts_to_the_callers():
    from crop.localizers.vlm import VLMLocalizer
    from crop.regions import GridBox

    loc = VLMLocalizer(model=None, processor=None, grid=16)  # the model answers on 8x8, the caller asks 16x16
    out = loc._parse("[3, 6, 4, 7]")
    assert out.box == GridBox(6, 12, 9, 15, grid=16) and not out.fallback
    assert VLMLocalizer(model=None, processor=None)._parse("[3, 6, 4, 7]").box == GridBox(3, 6, 4, 7)


def test_vlm_localizer_takes_the_callers_batch_in_one_call():
    """By default the whole call is one ``generate`` (no cap of its own); the boxes equal capped chunks'."""
    from crop.data.synth import generate

    samples = list(generate(6, 3, "test"))
    images, questions = [s.image for s in samples], [s.question for s in samples]
    whole = make_localizer("embedded")
    assert whole.batch_size is None
    calls = []
    original = whole.generate
    whole.generate = lambda inputs: calls.append(inputs["input_ids"].shape[0]) or original(inputs)
    boxes = [r.box for r in whole.localize(images, questions)]
    assert calls == [6]
    chunked = make_localizer("embedded")
    chunked.batch_size = 2
    assert [r.box for r in chunked.localize(images, questions)] == boxes
