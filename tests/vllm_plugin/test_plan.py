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


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl"])
@pytest.mark.parametrize("method,keep", [("crop-region", 20), ("crop-region", None), ("crop-plc", 40),
                                         ("crop-plc", None), ("pool", 30), ("crop-region", 10**6)])
def test_plans_equal_the_hugging_face_methods(name, method, keep):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, [random_image(7, (400, 300))], ["What is it?"])
    adapter = get_adapter(model)
    (span,) = adapter.image_spans(inputs)
    (features,) = adapter.encode_images(inputs)
    request = CropRequest.parse({"method": method, "keep_tokens": keep, "box": BOX})
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
    ("crop-region", "JSON object"),
])
def test_bad_requests_fail_in_one_line(options, message):
    with pytest.raises(CropInputError, match=message) as err:
        CropRequest.parse(options)
    assert "\n" not in str(err.value)
