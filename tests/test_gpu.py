"""GPU tests: the method x architecture invariants on CUDA in bfloat16, plus flash attention, device maps, crop bench.

Every test here is marked ``gpu`` and skipped without CUDA (``pytest -m gpu`` selects them;
the default run skips them without building a model). The test bodies are the ``check_*``
functions, which take the device and dtype: ``tests/models/test_devices.py`` runs the same bodies
on the CPU in float32 (and bfloat16), so this code path runs on every machine.

In half precision "identical" means within the dtype's tolerance, and greedy tokens may
differ only where the two runs' top logits are tied within it (a random model's logits are
nearly flat, so a rounding difference can flip an argmax; everything after such a flip is
not compared).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from crop.api import apply_method
from crop.cli import main
from crop.hf_compat import generated_cache
from crop.localizers import FixedBoxLocalizer, make_localizer
from crop.methods import build_config
from crop.models import get_adapter
from crop.models.loading import input_device, load_model, resolve_device
from crop.pipeline import CropPipeline
from crop.regions import GridBox
from tests.conftest import ARCHS, chat_inputs, greedy, method_config, random_image

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

METHODS = ("crop-ilp", "crop-plc", "fastv", "dart")
# every inner-LLM method (their pruned layers get a new padding mask) and one pre-LLM method
FLASH_METHODS = ("crop-ilp", "crop-self", "fastv", "dart", "pdrop", "sparsevlm", "random-inner", "crop-plc")
CASES = [pytest.param(m, a, id=f"{m}-{a}") for m in METHODS for a in ARCHS]
IMAGES = [random_image(41, (400, 300)), random_image(42, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
BOXES = [GridBox(1, 1, 4, 5), GridBox(3, 0, 7, 3)]
STEPS = 3
# absolute/relative tolerance on logits; float32 keep-all is held to bit-identity instead
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}

_MODELS: dict[tuple, tuple] = {}


def placed(name: str, device: str, dtype: str, attn: str = "sdpa", device_map: str | None = None):
    """A tiny random model loaded through :func:`crop.models.loading.load_model` (cached; never mutated)."""
    key = (name, device, dtype, attn, device_map)
    if key not in _MODELS:
        _MODELS[key] = load_model(name, attn_implementation=attn, device=device, dtype=dtype, device_map=device_map)
    return _MODELS[key]


def _budget(model, inputs, share: float = 0.6) -> int:
    return int(share * min(s.visual_tokens for s in get_adapter(model).image_spans(inputs)))


def _tolerance(model) -> float:
    return TOLERANCE[model.dtype]


def _close(a: torch.Tensor, b: torch.Tensor, model) -> None:
    if model.dtype == torch.float32:
        assert torch.equal(a, b)
    else:
        tol = _tolerance(model)
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def assert_same_greedy(out_a, row_a: int, out_b, row_b: int, tol: float) -> None:
    """Greedy tokens of two runs are equal, except after a step where ``a``'s top logits are tied within ``tol``."""
    tokens_a, tokens_b = out_a.sequences[row_a, -STEPS:], out_b.sequences[row_b, -STEPS:]
    for step in range(STEPS):
        logits_a, logits_b = out_a.logits[step][row_a].float(), out_b.logits[step][row_b].float()
        if tokens_a[step] != tokens_b[step]:
            gap = float(logits_a.max() - logits_a[tokens_b[step]])
            assert gap <= 2 * tol, f"step {step}: tokens {int(tokens_a[step])} vs {int(tokens_b[step])}, gap {gap}"
            return  # the continuations differ from here on; nothing more to compare
        torch.testing.assert_close(logits_a, logits_b, atol=tol, rtol=tol)


# -- the bodies (run on CUDA here, on the CPU by tests/models/test_devices.py) -------------------------


def check_keep_all_and_removal(name: str, method: str, device: str, dtype: str, attn: str = "sdpa") -> None:
    """A budget above every image's tokens changes nothing; after removal the model is the stock one."""
    model, proc = placed(name, device, dtype, attn)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    assert inputs["input_ids"].device == input_device(model)  # the processor puts inputs where the model reads them
    ref = model(**inputs).logits
    with apply_method(model, method_config(method, 10**6, model)) as h:
        logits = model(**h.prepare(inputs, BOXES)).logits
    assert logits.device == ref.device
    _close(logits, ref, model)
    with apply_method(model, method_config(method, _budget(model, inputs), model)) as h:
        model(**h.prepare(inputs, BOXES))
    _close(model(**inputs).logits, ref, model)


def check_cache_and_batch(name: str, method: str, device: str, dtype: str, attn: str = "sdpa") -> None:
    """Cached greedy decoding equals no-cache decoding; a batch equals its samples one by one."""
    model, proc = placed(name, device, dtype, attn)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    config = method_config(method, _budget(model, inputs), model, {"layer": 2})
    tol = _tolerance(model)
    with apply_method(model, config) as h:
        cached = greedy(model, h.prepare(inputs, BOXES), steps=STEPS, use_cache=True)
        batch_kept = h.stats.full_resolution
        uncached = greedy(model, h.prepare(inputs, BOXES), steps=STEPS, use_cache=False)
    for i in range(len(IMAGES)):
        assert_same_greedy(cached, i, uncached, i, tol)
    for i, (image, question, box) in enumerate(zip(IMAGES, QUESTIONS, BOXES, strict=True)):
        with apply_method(model, config) as h:
            single = greedy(model, h.prepare(chat_inputs(proc, [image], [question]), [box]), steps=STEPS)
            if model.dtype == torch.float32:  # the selection itself may differ by a rounding tie in half precision
                assert h.stats.full_resolution[0] == batch_kept[i]
        assert_same_greedy(cached, i, single, 0, tol)


def check_kv_lengths(name: str, method: str, device: str, dtype: str, attn: str = "sdpa") -> None:
    """Each decoder layer caches exactly the tokens the stats say reach it, on the model's device."""
    model, proc = placed(name, device, dtype, attn)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    span = get_adapter(model).image_spans(inputs)[0]
    with apply_method(model, method_config(method, _budget(model, inputs), model)) as h:
        run = h.prepare(inputs, BOXES[:1])
        out = model(**run, use_cache=True)
        kept = h.stats.visual_tokens_kept
    layers = generated_cache(out).layers
    lengths = [layer.keys.shape[-2] for layer in layers]
    assert all(layer.keys.device.type == torch.device(device).type for layer in layers)
    per_layer, current = [], kept["llm_input"][0]
    for layer in range(len(lengths)):
        current = kept.get(f"after_layer_{layer}", [current])[0]
        per_layer.append(current)
    prompt = run["input_ids"].shape[1]
    assert lengths[0] == prompt
    if span.length == span.visual_tokens:  # no structure tokens: every cached slot is text or a kept visual token
        assert lengths == [prompt - kept["llm_input"][0] + n for n in per_layer]
    assert all(a >= b for a, b in zip(lengths, lengths[1:], strict=False))


def check_pipeline(name: str, device: str, dtype: str, device_map: str | None = None) -> None:
    """``CropPipeline`` answers a batch with the model off the CPU (its processor moves the inputs)."""
    model, proc = placed(name, device, dtype, device_map=device_map)
    pipe = CropPipeline(model, proc, FixedBoxLocalizer(BOXES[0]), build_config("crop-ilp", 64))
    results = pipe.answer_batch(IMAGES, QUESTIONS, max_new_tokens=STEPS)
    assert len(results) == 2 and all(r.visual_tokens_kept["after_layer_2"] == 64 for r in results)
    assert results[0].kv_cache_lengths[2] < results[0].kv_cache_lengths[1]


def check_vlm_localizer(device: str) -> None:
    """The embedded VLM localizer runs on ``device`` and returns boxes on the grid."""
    localizer = make_localizer("embedded", device=device)
    assert input_device(localizer.model).type == resolve_device(device).type
    locs = localizer.localize(IMAGES, QUESTIONS)
    assert len(locs) == 2 and all(loc.box.grid == 8 for loc in locs)


def check_grounding_localizer(device: str) -> None:
    """The zero-shot grounding localizer runs a Qwen2.5-VL on ``device``; a random model's gibberish falls back, flagged."""
    localizer = make_localizer("grounding:tiny-random-qwen2.5-vl", device=device)
    assert input_device(localizer.model).type == resolve_device(device).type
    locs = localizer.localize(IMAGES, QUESTIONS)
    assert len(locs) == 2 and all(loc.box.grid == 8 for loc in locs)
    assert all(loc.fallback and loc.box == GridBox.full() for loc in locs)


def check_bench_smoke(tmp_path, device: str, dtype: str) -> dict:
    """``crop bench`` on ``device``: every case measured, the devices recorded."""
    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny-random-llava", "--repeats", "1", "--new-tokens", "3", "--keep-tokens",
                 "64", "--batch", "1", "--device", device, "--dtype", dtype, "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["devices"]["answerer"].startswith(device.partition(":")[0])
    assert results["devices"]["dtype"] == dtype
    cases = results["batches"][0]["cases"]
    assert set(cases) == {"full", "crop-ilp@64", "crop-plc@64", "ideal@64"}
    assert cases["crop-ilp@64"]["visual_tokens_kept"]["after_layer_2"] == [64]
    assert all(row["timings"]["prefill_s"]["median"] > 0 for row in cases.values())
    # batch 1 has no padding: the cache holds exactly the counted tokens, in the model's dtype
    assert all(row["kv_vs_analytic"] == pytest.approx(1.0) for row in cases.values())
    return results


# -- the GPU tests ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method,name", CASES)
def test_keep_all_and_removal_cuda_bf16(method, name):
    check_keep_all_and_removal(name, method, "cuda", "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("method,name", CASES)
def test_cache_equals_no_cache_and_batch_equals_one_by_one_cuda_bf16(method, name):
    check_cache_and_batch(name, method, "cuda", "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("method,name", CASES)
def test_kv_lengths_per_layer_equal_stats_cuda_bf16(method, name):
    check_kv_lengths(name, method, "cuda", "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ARCHS)
def test_pipeline_answers_on_cuda(name):
    check_pipeline(name, "cuda", "bfloat16")


@pytest.mark.gpu
def test_pipeline_with_device_map_auto():
    check_pipeline("tiny-random-llava", "auto", "bfloat16", device_map="auto")


@pytest.mark.gpu
def test_vlm_localizer_on_cuda():
    check_vlm_localizer("cuda")


@pytest.mark.gpu
def test_grounding_localizer_on_cuda():
    check_grounding_localizer("cuda")


@pytest.mark.gpu
def test_bench_smoke_cuda(tmp_path):
    check_bench_smoke(tmp_path, "cuda", "bfloat16")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")
@pytest.mark.parametrize("method,name", [pytest.param(m, a, id=f"{m}-{a}") for m in FLASH_METHODS for a in ARCHS])
def test_flash_attention_2_cuda_bf16(method, name):
    """The real FA2 kernel on padded batches (the CPU runs the same glue with a reference kernel:
    tests/methods/test_flash_attention.py)."""
    check_keep_all_and_removal(name, method, "cuda", "bfloat16", attn="flash_attention_2")
    check_cache_and_batch(name, method, "cuda", "bfloat16", attn="flash_attention_2")
    check_kv_lengths(name, method, "cuda", "bfloat16", attn="flash_attention_2")
