"""Shared fixtures: tiny random models built from configs (no downloads) and synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crop.models.tiny import build_tiny_model


def random_image(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A seeded noise image (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def chat_inputs(processor, images, questions):
    """Processor inputs for a batch of (image, question) pairs, left-padded for generation."""
    texts = []
    for q in questions:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True))
    processor.tokenizer.padding_side = "left"
    return processor(images=list(images), text=texts, padding=True, return_tensors="pt")


_CACHE: dict[tuple[str, str], tuple] = {}


def tiny(name: str, attn: str = "sdpa"):
    """A cached tiny random model (built once per session; tests must not mutate its weights)."""
    key = (name, attn)
    if key not in _CACHE:
        _CACHE[key] = build_tiny_model(name, seed=0, attn_implementation=attn)
    return _CACHE[key]


@pytest.fixture(params=["sdpa", "eager"])
def llava(request):
    return tiny("tiny-random-llava", request.param)


@pytest.fixture
def llava_sdpa():
    return tiny("tiny-random-llava", "sdpa")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# every supported architecture, as a tiny random model name (the one list every test matrix uses)
ARCHS = ("tiny-random-llava", "tiny-random-llava-next", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl",
         "tiny-random-qwen3-vl")


def greedy(model, inputs, steps: int = 2, **kw):
    """Greedy ``generate`` of exactly ``steps`` tokens with per-step logits.

    Image/video placeholders are suppressed: a random model may "generate" one, which a
    no-cache step would then re-embed as an image token.
    """
    placeholders = [t for t in (model.config.image_token_id, getattr(model.config, "video_token_id", None))
                    if t is not None]
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, suppress_tokens=placeholders, **kw)


# LLaVA-1.5 geometry (336 px, 14 px patches: 576 visual tokens) with a 32-layer LM like 7B's, tiny widths:
# the model the reference tests compare official rules on
LLAVA15_32_SHAPE = dict(image_size=336, patch_size=14, vision_hidden=32, vision_layers=1, text_hidden=64,
                        text_layers=32, text_heads=4, text_kv_heads=4, text_intermediate=128)


def llava15_32_model_and_inputs():
    """A seeded random model of :data:`LLAVA15_32_SHAPE` and one prompt's inputs for it."""
    from crop.embedded import build_from_shape

    torch.manual_seed(0)
    model, proc = build_from_shape("llava", LLAVA15_32_SHAPE)
    inputs = chat_inputs(proc, [random_image(5, (336, 336))], ["What color is the star left of the circle?"])
    return model, inputs


def llm_input_embeddings(model, inputs) -> torch.Tensor:
    """``(B, L, D)`` the hidden states entering the first decoder layer in a stock forward of ``inputs``."""
    layer = model.model.language_model.layers[0]
    seen = {}
    grab = layer.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"]),
                                           with_kwargs=True)
    try:
        model(**inputs)
    finally:
        grab.remove()
    return seen["h"]


_COMPRESSORS: dict[int, str] = {}


def random_compressor(dim: int) -> str:
    """Folder of a seeded, untrained PLC compressor for ``dim``-dim tokens (built once per session).

    Untrained, it mixes tokens by near-uniform attention: what the invariants need (shapes,
    order, positions, caching), not what a trained one answers.
    """
    if dim not in _COMPRESSORS:
        import tempfile

        from crop.compressor import CompressorConfig, RegionCompressor, save_compressor

        torch.manual_seed(dim)
        folder = tempfile.mkdtemp(prefix=f"crop-compressor-{dim}-")
        save_compressor(RegionCompressor(CompressorConfig(dim=dim, max_queries=64)), folder)
        _COMPRESSORS[dim] = folder
    return _COMPRESSORS[dim]


def method_config(method: str, keep_tokens, model, shared=None):
    """``build_config`` plus what a method needs to run on ``model`` here (a compressor for the trained PLC)."""
    from crop.methods import build_config

    options = [("crop-plc-trained", "compressor", random_compressor(model.config.get_text_config().hidden_size))] \
        if method == "crop-plc-trained" else []
    return build_config(method, keep_tokens, options, shared)
