"""The vLLM plugin's per-request plans equal crop's Hugging Face methods (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.errors import CropInputError
from crop.methods import build_config
from crop.models import get_adapter
from crop.vllm_plugin.plan import CropRequest, compress_grid, planned_sources
from tests.conftest import chat_inputs, random_image, tiny

BOX = [1, 2, 4, 6]


def _prompt_seeds(proc, inputs, adapter) -> list[int]:
    """:func:`random_seeds` of the prompt as vLLM tokenizes it (one placeholder per image)."""
    from crop.vllm_plugin.plan import random_seeds

    placeholder = adapter.image_token_id
    ids = [t for i, t in enumerate(inputs["input_ids"][0].tolist())
           if t != placeholder or i == 0 or inputs["input_ids"][0, i - 1] != placeholder]  # one per run
    return random_seeds(ids, placeholder, [s.visual_tokens for s in adapter.image_spans(inputs)], 0)


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl"])
@pytest.mark.parametrize("method,keep", [("crop-region", 20), ("crop-region", None), ("crop-plc", 40),
                                         ("crop-plc", None), ("pool", 30), ("crop-region", 10**6), ("random", 24)])
def test_plans_equal_the_hugging_face_methods(name, method, keep):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, [random_image(7, (400, 300))], ["What is it?"])
    adapter = get_adapter(model)
    (span,) = adapter.image_spans(inputs)
    (features,) = adapter.encode_images(inputs)
    options = {"method": method, "keep_tokens": keep, "box": BOX}
    if method == "random":
        options["seeds"] = _prompt_seeds(proc, inputs, adapter)
    request = CropRequest.decode(CropRequest.parse(options).encode(0))
    planned = compress_grid(request, features, span.rows, span.cols)
    assert torch.equal(planned_sources(request, span.rows, span.cols), planned.source)
    config = build_config(method, keep)
    with apply_method(model, config) as h:
        h.prepare(inputs, [request.box])
        if h.method.keeps_everything([span]):
            assert torch.equal(planned.tokens, features)
            return
        image, _ = h.method.compress_image(features, span, request.box, 0)
    assert torch.equal(planned.source, image.source)
    torch.testing.assert_close(planned.tokens, image.tokens, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl"])
def test_random_seeds_are_the_hugging_face_paths(name):
    """The seed worked out from vLLM's prompt (one placeholder) is the one crop's HF random draws with."""
    from crop.methods.random_prune import _image_seeds

    model, proc = tiny(name)
    adapter = get_adapter(model)
    for question in ("What is it?", "How many circles?"):
        inputs = chat_inputs(proc, [random_image(7, (400, 300))], [question])
        assert _prompt_seeds(proc, inputs, adapter) == _image_seeds(inputs, adapter.image_spans(inputs), 0)


def test_requests_round_trip_through_their_tensor():
    for options in ({"method": "crop-plc", "keep_tokens": 64, "box": BOX, "pool": 2},
                    {"method": "crop-region", "box": BOX, "trim": "stride"}, None, {"method": "pool", "keep_tokens": 9}):
        request = CropRequest.parse(options)
        assert CropRequest.decode(request.encode()) == CropRequest.parse(options) or request.box is None


@pytest.mark.parametrize("options,message", [
    ({"method": "fastv", "keep_tokens": 64}, "prunes inside the LLM"),
    ({"method": "crop-ilp"}, "prunes inside the LLM"),
    ({"method": "magic"}, "unknown crop method"),
    ({"method": "crop-region", "keep_tokens": 0}, "keep_tokens"),
    ({"method": "crop-region", "box": [0, 0, 9, 9]}, "not a valid box"),
    ({"method": "crop-region", "box": "left"}, "box must be"),
    ({"methd": "crop-region"}, "unknown crop option"),
    ({"method": "pool"}, "pool needs keep_tokens"),
    ({"method": "random"}, "random needs keep_tokens"),
    ({"method": "random", "keep_tokens": 8, "seed": -1}, "seed must be"),
    ("crop-region", "JSON object"),
])
def test_bad_requests_fail_in_one_line(options, message):
    with pytest.raises(CropInputError, match=message) as err:
        CropRequest.parse(options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prompt,question", [
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
     "<|image_pad|><|vision_end|>What color is the star?<|im_end|>\n<|im_start|>assistant\n", "What color is the star?"),
    ("USER: <image>\nHow many  circles are there? ASSISTANT:", "How many circles are there?"),
    ("USER: <image>\nfirst ASSISTANT: one</s>USER: and the square? ASSISTANT:", "and the square?"),  # the last turn
    ("<image> Is there a triangle?", "Is there a triangle?"),  # no known layout: the whole prompt
])
def test_the_question_is_the_last_user_turn_without_special_tokens(prompt, question):
    from crop.vllm_plugin.plan import question_from_prompt

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<image>", "</s>"]
    assert question_from_prompt(prompt, specials) == question


def test_a_localizer_is_resolved_into_a_box_once_per_process():
    from crop.vllm_plugin.localizing import LOCALIZER_STATS, localize_options, served_localizer

    image = random_image(3, (400, 300))
    before = LOCALIZER_STATS["requests"]
    options = localize_options({"method": "crop-region", "keep_tokens": 16, "localizer": "box:1,2,5,6"},
                               "USER: <image>\nWhat is it? ASSISTANT:", [image], ["<image>"])
    assert options == {"method": "crop-region", "keep_tokens": 16, "box": [1, 2, 5, 6], "localizer": None}
    assert LOCALIZER_STATS["requests"] == before + 1
    assert served_localizer("box:1,2,5,6", 8) is served_localizer("box:1,2,5,6", 8)  # loaded once
    embedded = localize_options({"localizer": "embedded"}, "USER: <image>\nWhat color is the star? ASSISTANT:",
                                [image], ["<image>"])
    from crop.localizers import make_localizer

    (found,) = make_localizer("embedded").localize([image], ["What color is the star?"])
    assert embedded["box"] == found.box.as_list()


@pytest.mark.parametrize("options,images,message", [
    ({"localizer": "box:1,2,5,6", "box": [0, 0, 3, 3]}, 1, "not both"),
    ({"localizer": "embedded"}, 2, "one image per request"),
    ({"localizer": 3}, 1, "localizer spec"),
    ({"localizer": "self"}, 1, "does not expose"),
    ({"localizer": "/no/such/localizer"}, 1, "localizer"),
])
def test_bad_localizer_options_fail_in_one_line(options, images, message):
    from crop.vllm_plugin.localizing import localize_options

    with pytest.raises(CropInputError, match=message) as info:
        localize_options(options, "USER: <image>\nq ASSISTANT:", [random_image(1)] * images, ["<image>"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [20, 48])
def test_the_trained_plc_plan_equals_the_hugging_face_method(keep, monkeypatch):
    """LLaVA-1.5 with the server's compressor (CROP_VLLM_COMPRESSOR): the same tokens as crop-plc-trained on HF."""
    from crop.vllm_plugin.compressing import COMPRESSOR_ENV, check_compressor, server_compressor
    from crop.vllm_plugin.plan import planned_count
    from tests.conftest import random_compressor

    model, proc = tiny("tiny-random-llava")
    adapter = get_adapter(model)
    folder = random_compressor(adapter.text_config.hidden_size)
    monkeypatch.setenv(COMPRESSOR_ENV, folder)
    check_compressor(adapter.text_config.hidden_size)
    inputs = chat_inputs(proc, [random_image(8, (400, 300))], ["What is it?"])
    (span,) = adapter.image_spans(inputs)
    (features,) = adapter.encode_images(inputs)
    request = CropRequest.parse({"method": "crop-plc-trained", "keep_tokens": keep, "box": BOX})
    planned = compress_grid(request, features, span.rows, span.cols, server_compressor(features.device, features.dtype))
    assert planned.tokens.shape[0] == planned_count(request, span.rows, span.cols) == keep
    with pytest.raises(ValueError, match="depend on the features"):
        planned_sources(request, span.rows, span.cols)
    with apply_method(model, build_config("crop-plc-trained", keep, options=[f"compressor={folder}"])) as h:
        h.prepare(inputs, [request.box])
        image, _ = h.method.compress_image(features, span, request.box, 0)
    assert torch.equal(planned.source, image.source)
    torch.testing.assert_close(planned.tokens, image.tokens, atol=0, rtol=0)


def test_the_trained_plc_needs_the_servers_compressor_for_this_model(monkeypatch):
    from crop.vllm_plugin.compressing import COMPRESSOR_ENV, check_compressor
    from tests.conftest import random_compressor

    monkeypatch.delenv(COMPRESSOR_ENV, raising=False)
    with pytest.raises(CropInputError, match=COMPRESSOR_ENV):
        check_compressor(64)
    monkeypatch.setenv(COMPRESSOR_ENV, "/no/such/compressor")
    with pytest.raises(CropInputError, match="no trained PLC compressor"):
        check_compressor(64)
    monkeypatch.setenv(COMPRESSOR_ENV, random_compressor(32))
    with pytest.raises(CropInputError, match="belongs to the answerer"):
        check_compressor(64)
    with pytest.raises(CropInputError, match="needs keep_tokens"):
        CropRequest.parse({"method": "crop-plc-trained", "box": BOX})
