"""crop-region: ILP's selection moved before the LLM (what an engine without inner pruning can run)."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.methods import build_config
from crop.models import get_adapter
from crop.models.base import CompressedImage
from crop.regions import GridBox
from tests.conftest import chat_inputs, random_image, tiny

IMAGES = [random_image(31, (400, 300)), random_image(32, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
BOXES = [GridBox(1, 1, 4, 5), GridBox(3, 0, 7, 3)]


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
@pytest.mark.parametrize("keep", [None, 20])
def test_region_keeps_ilps_tokens_from_layer_zero(name, keep):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    with apply_method(model, build_config("crop-ilp", keep)) as h:
        h.prepare(inputs, BOXES)
        ilp_kept = h.stats.full_resolution
    with apply_method(model, build_config("crop-region", keep)) as h:
        logits = model(**h.prepare(inputs, BOXES)).logits
        stats = h.stats
    assert stats.full_resolution == ilp_kept  # the same selection rule, the same tokens
    assert stats.visual_tokens_kept["llm_input"] == [len(k) for k in ilp_kept]
    if keep is not None:
        assert all(n == keep for n in stats.visual_tokens_kept["llm_input"])
    # the reference: the model fed exactly those tokens' own features
    adapter = get_adapter(model)
    spans, features = adapter.image_spans(inputs), adapter.encode_images(inputs)
    images = [CompressedImage(f[torch.tensor(k)], torch.tensor(k)) for f, k in zip(features, ilp_kept, strict=True)]
    reference = model(**adapter.compressed_inputs(inputs, spans, images)).logits
    torch.testing.assert_close(logits, reference, atol=0, rtol=0)
