"""crop in the real vLLM engine (CPU wheel): the stock model without options, crop's answers with them.

Runs in ``.venv-vllm`` (``scripts/setup_vllm.sh``; CI sets ``CROP_REQUIRE_VLLM=1`` there so this
cannot be skipped). One engine serves the whole module (start-up costs ~20 s). The reference for
every answer is crop's Hugging Face path on the same checkpoint in the same process (float32,
greedy): the same tokens, and a prompt shorter by exactly the dropped visual tokens.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CROP_REQUIRE_VLLM") == "1":
        raise RuntimeError("CROP_REQUIRE_VLLM=1 but vLLM is not installed (run scripts/setup_vllm.sh)")
    pytest.skip("vLLM is not installed (scripts/setup_vllm.sh makes .venv-vllm)", allow_module_level=True)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

from crop.api import apply_method  # noqa: E402
from crop.methods import build_config  # noqa: E402
from crop.models import get_adapter  # noqa: E402
from crop.models.loading import load_model  # noqa: E402
from crop.regions import GridBox  # noqa: E402
from crop.vllm_plugin.checkpoints import save_vllm_llava, save_vllm_qwen  # noqa: E402
from tests.conftest import random_image  # noqa: E402

QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = {"qwen2_vl": QWEN_PROMPT, "qwen2_5_vl": QWEN_PROMPT, "qwen3_vl": QWEN_PROMPT,
           "llava": "USER: <image>\n{q} ASSISTANT:"}
STEPS = 6
BOX = [1, 2, 5, 6]


@pytest.fixture(scope="module", params=list(PROMPTS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    folder = tmp_path_factory.mktemp(family)
    return save_vllm_llava(folder) if family == "llava" else save_vllm_qwen(folder, family)


@pytest.fixture(scope="module")
def prompt(family):
    return PROMPTS[family]


@pytest.fixture(scope="module")
def engine(checkpoint):
    from vllm import LLM

    # float32 as the reference (vLLM's CPU default casts a float32 checkpoint to bfloat16)
    return LLM(model=checkpoint, max_model_len=2048, enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0,
               dtype="float32")


@pytest.fixture(scope="module")
def hf(checkpoint):
    return load_model(checkpoint)


def _vllm(engine, prompt, image, question, crop=None, logprobs=False):
    """``(greedy tokens, prompt length)`` from the engine (+ the first step's top-5 logprobs if asked)."""
    from vllm import SamplingParams

    request = {"prompt": prompt.format(q=question), "multi_modal_data": {"image": image}}
    if crop is not None:
        request["mm_processor_kwargs"] = {"crop": crop}
    params = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=5 if logprobs else None)
    (out,) = engine.generate(request, params, use_tqdm=False)
    result = (list(out.outputs[0].token_ids), len(out.prompt_token_ids))
    if logprobs:
        return (*result, {t: v.logprob for t, v in out.outputs[0].logprobs[0].items()})
    return result


def _hf(hf, prompt, image, question, method=None, keep=None, options=()):
    model, processor = hf
    inputs = processor(text=[prompt.format(q=question)], images=[image], return_tensors="pt")
    run, visual = dict(inputs), get_adapter(model).image_spans(inputs)[0].visual_tokens
    handle = None
    if method is not None:
        handle = apply_method(model, build_config(method, keep, options=list(options)))
        run = handle.prepare(inputs, [GridBox.from_list(BOX)])
        visual = handle.stats.visual_tokens_kept["llm_input"][0]
    try:
        with torch.no_grad():
            out = model.generate(**run, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        if handle is not None:
            handle.remove()
    first = torch.log_softmax(out.logits[0][0].float(), dim=-1)  # (V,) the first step's logprobs (raw logits)
    return out.sequences[0, run["input_ids"].shape[1]:].tolist(), int(run["input_ids"].shape[1]), visual, first


def test_without_crop_options_it_is_the_stock_model(engine, hf, prompt):
    image = random_image(1, (400, 300))
    tokens, length = _vllm(engine, prompt, image, "What color is the star?")
    ref_tokens, ref_length, _, _ = _hf(hf, prompt, image, "What color is the star?")
    assert (tokens, length) == (ref_tokens, ref_length)


@pytest.mark.parametrize("method,keep", [("crop-region", 16), ("crop-region", 48), ("crop-plc", 40), ("crop-plc", 80),
                                         ("pool", 16), ("pool", 36), ("random", 16), ("random", 48)])
def test_crop_answers_equal_the_hugging_face_path(engine, hf, prompt, method, keep):
    image = random_image(2, (400, 300))
    full_length = _vllm(engine, prompt, image, "How many circles?")[1]
    tokens, length, logprobs = _vllm(engine, prompt, image, "How many circles?",
                                     {"method": method, "keep_tokens": keep, "box": BOX}, logprobs=True)
    ref_tokens, ref_length, kept, ref_logprobs = _hf(hf, prompt, image, "How many circles?", method, keep)
    assert kept == keep
    assert length == ref_length  # the prompt shrank by exactly the dropped visual tokens
    assert full_length - length == _hf(hf, prompt, image, "How many circles?")[2] - keep
    assert tokens == ref_tokens
    for token, value in logprobs.items():  # the same numbers, not only the same argmax
        assert abs(value - float(ref_logprobs[token])) < 1e-4


@pytest.mark.parametrize("keep", [16, 48])
def test_the_trained_plc_equals_the_hugging_face_path_on_llava(engine, hf, prompt, family, keep, monkeypatch):
    """The server's compressor (CROP_VLLM_COMPRESSOR) on LLaVA-1.5; refused in one line where positions need it."""
    from crop.vllm_plugin.compressing import COMPRESSOR_ENV
    from tests.conftest import random_compressor

    folder = random_compressor(get_adapter(hf[0]).text_config.hidden_size)
    monkeypatch.setenv(COMPRESSOR_ENV, folder)
    image, crop = random_image(6, (400, 300)), {"method": "crop-plc-trained", "keep_tokens": keep, "box": BOX}
    if family != "llava":
        with pytest.raises(Exception, match="LLaVA-1.5 only"):
            _vllm(engine, prompt, image, "How many circles?", crop)
        return
    tokens, length, logprobs = _vllm(engine, prompt, image, "How many circles?", crop, logprobs=True)
    ref_tokens, ref_length, kept, ref_logprobs = _hf(hf, prompt, image, "How many circles?", "crop-plc-trained", keep,
                                                     [f"compressor={folder}"])
    assert kept == keep and length == ref_length and tokens == ref_tokens
    for token, value in logprobs.items():
        assert abs(value - float(ref_logprobs[token])) < 1e-4


def test_random_draws_per_prompt_as_the_hugging_face_path(engine, hf, prompt):
    """The same image under two questions: two draws (the seed is in vLLM's cache key), each crop's own."""
    image = random_image(7, (400, 300))
    for question in ("What is it?", "Which shape is on the left?"):
        tokens, length = _vllm(engine, prompt, image, question, {"method": "random", "keep_tokens": 24})
        ref_tokens, ref_length, kept, _ = _hf(hf, prompt, image, question, "random", 24)
        assert (tokens, length, kept) == (ref_tokens, ref_length, 24)


def test_requests_with_different_options_share_a_batch(engine, prompt):
    from vllm import SamplingParams

    image = random_image(3, (336, 448))
    crops = [None, {"method": "crop-region", "keep_tokens": 12, "box": BOX}, {"method": "crop-plc", "keep_tokens": 60,
                                                                                "box": [0, 0, 3, 3]}]
    requests = []
    for crop in crops:
        request = {"prompt": prompt.format(q="What is it?"), "multi_modal_data": {"image": image}}
        if crop is not None:
            request["mm_processor_kwargs"] = {"crop": crop}
        requests.append(request)
    outs = engine.generate(requests, SamplingParams(max_tokens=STEPS, temperature=0), use_tqdm=False)
    for out, crop in zip(outs, crops, strict=True):
        assert (list(out.outputs[0].token_ids), len(out.prompt_token_ids)) == _vllm(engine, prompt, image, "What is it?",
                                                                                     crop)


def test_a_localizer_named_in_the_request_finds_the_box(engine, prompt):
    """``"localizer": SPEC`` answers as the request with the box that localizer finds for the prompt's question."""
    from crop.localizers import make_localizer

    image, question = random_image(5, (400, 300)), "What color is the star?"
    by_box = _vllm(engine, prompt, image, question, {"method": "crop-region", "keep_tokens": 16, "box": BOX})
    assert _vllm(engine, prompt, image, question, {"method": "crop-region", "keep_tokens": 16,
                                                   "localizer": "box:" + ",".join(map(str, BOX))}) == by_box
    (found,) = make_localizer("embedded").localize([image], [question])
    assert _vllm(engine, prompt, image, question, {"method": "crop-region", "keep_tokens": 16, "localizer": "embedded"}) \
        == _vllm(engine, prompt, image, question, {"method": "crop-region", "keep_tokens": 16,
                                                   "box": found.box.as_list()})


@pytest.mark.parametrize("crop,message", [({"method": "fastv", "keep_tokens": 16}, "prunes inside the LLM"),
                                          ({"method": "crop-region", "box": [0, 0, 9, 9]}, "not a valid box"),
                                          ({"method": "crop-region", "keep_tokens": -3}, "keep_tokens"),
                                          ({"method": "crop-region", "localizer": "/no/such/localizer"}, "localizer")])
def test_a_bad_request_fails_alone_and_the_engine_keeps_serving(engine, hf, prompt, crop, message):
    image = random_image(4, (400, 300))
    with pytest.raises(Exception, match=message):
        _vllm(engine, prompt, image, "What is it?", crop)
    assert _vllm(engine, prompt, image, "What is it?")[0] == _hf(hf, prompt, image, "What is it?")[0]
