"""The localize -> prune -> generate pipeline: stats, timings, batches."""

from __future__ import annotations

import pytest

from crop.config import CropILPConfig, CropPLCConfig, NoPruningConfig
from crop.errors import CropInputError
from crop.localizers import FixedBoxLocalizer, FullImageLocalizer
from crop.pipeline import CropPipeline
from crop.regions import GridBox
from tests.conftest import random_image


def test_pipeline_reports_tokens_kv_and_timings(llava_sdpa):
    model, proc = llava_sdpa
    pipe = CropPipeline(model, proc, FixedBoxLocalizer(GridBox(2, 2, 5, 5)), CropILPConfig(keep_tokens=64))
    result = pipe(random_image(31), "What is this?", max_new_tokens=4)
    assert result.box == [2, 2, 5, 5] and result.visual_tokens_in == 576
    assert result.visual_tokens_kept == {"llm_input": 576, "after_layer_2": 64}
    full = result.kv_cache_lengths[0]
    assert result.kv_cache_lengths == [full, full, full - 512, full - 512]
    assert result.kv_cache_bytes == sum(result.kv_cache_lengths) * 2 * 2 * 16 * 4
    assert result.timings["total_s"] == pytest.approx(sum(result.timings[k] for k in
                                                          ["localizer_s", "prefill_s", "decode_s"]))
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_pipeline_batch_equals_single_answers(llava_sdpa):
    model, proc = llava_sdpa
    pipe = CropPipeline(model, proc, FullImageLocalizer(), CropPLCConfig(keep_tokens=100))
    images = [random_image(32), random_image(33, (300, 500))]
    questions = ["What color is the star?", "How many circles?"]
    batch = pipe.answer_batch(images, questions, max_new_tokens=6)
    singles = [pipe(im, q, max_new_tokens=6) for im, q in zip(images, questions, strict=True)]
    assert [r.answer for r in batch] == [r.answer for r in singles]
    assert [r.visual_tokens_kept for r in batch] == [{"llm_input": 100}] * 2


def test_pipeline_bad_inputs(llava_sdpa, tmp_path):
    model, proc = llava_sdpa
    pipe = CropPipeline(model, proc, FullImageLocalizer(), NoPruningConfig())
    with pytest.raises(CropInputError, match="empty"):
        pipe(random_image(1), "")
    with pytest.raises(CropInputError, match="not found"):
        pipe(str(tmp_path / "x.png"), "q?")
    with pytest.raises(CropInputError, match="2 images but 1 questions"):
        pipe.answer_batch([random_image(1), random_image(2)], ["q?"])
    with pytest.raises(ValueError, match="grid"):
        CropPipeline(model, proc, FullImageLocalizer(grid=4), CropILPConfig())


def test_every_reported_time_waits_for_the_device(llava_sdpa, monkeypatch):
    """Issue 28: on a GPU a clock read before the queued kernels finish times their launch, not their work.

    Every reading behind ``timings`` (localizer start and end, prefill start, first token, end)
    goes through :func:`crop.timing.clock`, which synchronizes first; on the CPU that is a no-op,
    so the test counts the calls.
    """
    import crop.timing

    calls = []
    monkeypatch.setattr(crop.timing, "synchronize", lambda *a, **k: calls.append(1))
    model, proc = llava_sdpa
    pipe = CropPipeline(model, proc, FixedBoxLocalizer(GridBox(1, 1, 4, 4)), CropILPConfig(keep_tokens=20))
    result = pipe(random_image(3), "What is it?", max_new_tokens=3)
    assert len(calls) == 5  # localizer start + end, prefill start, first token, end of decode
    assert result.timings["prefill_s"] > 0 and result.timings["decode_s"] > 0


def test_pipeline_feeds_a_half_precision_model_from_its_stock_processor():
    """A model loaded in bfloat16 the stock way, with the processor as it came: the pipeline casts its inputs."""
    import torch

    from crop.models.loading import DeviceProcessor
    from crop.models.tiny import build_tiny_model

    model, proc = build_tiny_model("tiny-random-llava", seed=0)  # its own copy: .to() would change the shared one
    model = model.to(torch.bfloat16)
    assert not isinstance(proc, DeviceProcessor)
    pipe = CropPipeline(model, proc, FixedBoxLocalizer(GridBox(2, 2, 5, 5)), CropPLCConfig(keep_tokens=64))
    assert isinstance(pipe.processor, DeviceProcessor) and pipe.processor.dtype == torch.bfloat16
    result = pipe(random_image(34), "What is this?", max_new_tokens=3)
    assert result.visual_tokens_kept == {"llm_input": 64}
    assert CropPipeline(model, pipe.processor, FullImageLocalizer()).processor is pipe.processor  # not wrapped twice
