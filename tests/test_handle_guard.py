"""A prepared handle is bound to its inputs, a model takes one handle at a time, and unsupported generate modes are refused clearly."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.config import CropILPConfig, CropPLCConfig
from crop.methods.fastv import FastVConfig
from crop.regions import GridBox
from tests.conftest import chat_inputs, random_image, tiny

A, B = random_image(1), random_image(2)


@pytest.fixture
def llava():
    return tiny("tiny-random-llava")


def test_running_another_prompt_or_image_than_the_prepared_one_raises(llava):
    model, proc = llava
    inputs_a = chat_inputs(proc, [A], ["What color is the star?"])
    inputs_b = chat_inputs(proc, [A], ["How many circles are there in this picture, counting the small ones?"])
    inputs_c = chat_inputs(proc, [B], ["What color is the star?"])  # same shapes as A, another image
    with apply_method(model, CropILPConfig(keep_tokens=64)) as h:
        run = h.prepare(inputs_a, [GridBox(0, 0, 3, 3)])
        model(**run)  # fine
        with pytest.raises(ValueError, match="other input_ids"):
            model(**inputs_b)
        with pytest.raises(ValueError, match="other pixel_values"):
            model(**inputs_c)
        model(**h.prepare(inputs_b, [GridBox(0, 0, 3, 3)]))  # prepared again: fine


def test_a_second_handle_on_one_model_is_refused(llava):
    model, _ = llava
    first = apply_method(model, CropILPConfig(keep_tokens=64))
    with pytest.raises(ValueError, match="already has crop-ilp applied"):
        apply_method(model, FastVConfig(keep_tokens=64))
    first.remove()
    apply_method(model, FastVConfig(keep_tokens=64)).remove()  # after removal: fine


@pytest.mark.parametrize("kwargs,message", [({"num_beams": 2}, "beam search"),
                                            ({"num_return_sequences": 2, "do_sample": True}, "beam search"),
                                            ({"cache_implementation": "static"}, "DynamicCache")])
def test_unsupported_generate_modes_are_refused_clearly(llava, kwargs, message):
    model, proc = llava
    inputs = chat_inputs(proc, [A], ["What color is the star?"])
    with apply_method(model, CropILPConfig(keep_tokens=64)) as h:
        run = h.prepare(inputs, [GridBox(0, 0, 3, 3)])
        with pytest.raises(ValueError, match=message):
            model.generate(**run, max_new_tokens=2, **{"do_sample": False, **kwargs})


def test_labels_are_refused_under_inner_pruning_and_work_before_the_llm(llava):
    model, proc = llava
    inputs = chat_inputs(proc, [A], ["What color is the star?"])
    with apply_method(model, CropILPConfig(keep_tokens=64)) as h:
        run = h.prepare(inputs, [GridBox(0, 0, 3, 3)])
        with pytest.raises(ValueError, match="labels= cannot be aligned"):
            model(**run, labels=run["input_ids"])
    with apply_method(model, CropPLCConfig(keep_tokens=64)) as h:
        run = h.prepare(inputs, [GridBox(0, 0, 3, 3)])
        out = model(**run, labels=run["input_ids"])  # the rebuilt prompt is what the LLM sees: labels align
        assert torch.isfinite(out.loss)
