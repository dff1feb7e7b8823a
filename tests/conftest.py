"""Shared fixtures: tiny random models built from configs (no downloads) and synthetic images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from crop.models.tiny import build_tiny_model

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
    torch.set_num_threads(1)


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


@pytest.fixture(autouse=True)
def _shared_models_stay_as_built():
    """A test that moves or casts a cached tiny model (``nn.Module.to`` works in place) fails here, not in
    whichever later test of the same process happens to read it."""
    yield
    for (name, attn), (model, _) in _CACHE.items():
        weight = next(model.parameters())
        assert weight.dtype == torch.float32 and weight.device.type == "cpu", \
            f"this test changed the shared {name} ({attn}) to {weight.dtype} on {weight.device}: build its own copy"


# every supported architecture, as a tiny random model name (the one list every test matrix uses)
ARCHS = ("tiny-random-llava", "tiny-random-llava-next", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl",
         "tiny-random-qwen3-vl", "tiny-random-llava-onevision", "tiny-random-internvl",
         "tiny-random-gemma3")


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


_CLIP_TEXT: dict[int, str] = {}


def random_clip_text_encoder(vision_width: int, projection: int = 16) -> str:
    """Folder of a seeded random ``CLIPModel`` + a byte-level CLIP tokenizer, for CDPruner's ``text_encoder`` (built once).

    Its vision side is ``vision_width`` wide (the LLaVA tower's width: CDPruner uses only its
    ``post_layernorm`` and ``visual_projection``); text tower and joint space are tiny.
    """
    if vision_width not in _CLIP_TEXT:
        import tempfile

        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        from crop.models.tokenizers import gpt2_byte_alphabet

        chars = gpt2_byte_alphabet()
        vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
        vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
        ends = vocab["<|endoftext|>"]
        text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                    eos_token_id=ends, pad_token_id=ends, projection_dim=projection)
        vision = dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14, projection_dim=projection)  # the towers' own copies, as hub configs
        with torch.random.fork_rng():
            torch.manual_seed(vision_width)
            clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
        folder = tempfile.mkdtemp(prefix=f"crop-clip-{vision_width}-")
        clip.save_pretrained(folder)
        CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
        _CLIP_TEXT[vision_width] = folder
    return _CLIP_TEXT[vision_width]


_LLAMA_TOKENIZER: list[str] = []


def saved_llama_tokenizer() -> str:
    """Folder of the byte-level Llama tokenizer every LLaVA model built in code uses (saved once)."""
    if not _LLAMA_TOKENIZER:
        import tempfile

        from crop.models.tokenizers import llama_byte_tokenizer

        folder = tempfile.mkdtemp(prefix="crop-llama-tokenizer-")
        llama_byte_tokenizer().save_pretrained(folder)
        _LLAMA_TOKENIZER.append(folder)
    return _LLAMA_TOKENIZER[0]


def method_config(method: str, keep_tokens, model, shared=None):
    """``build_config`` plus what a method needs to run on ``model`` here (a compressor for the trained PLC, CDPruner's
    CLIP text tower and the model's tokenizer on CLIP-tower models)."""
    from crop.methods import build_config

    options = [("crop-plc-trained", "compressor", random_compressor(model.config.get_text_config().hidden_size))] \
        if method == "crop-plc-trained" else []
    vision = getattr(model.config, "vision_config", None)
    if method == "cdpruner" and getattr(vision, "model_type", None) == "clip_vision_model":
        options = [("cdpruner", "text_encoder", random_clip_text_encoder(int(vision.hidden_size))),
                   ("cdpruner", "tokenizer", saved_llama_tokenizer())]
    return build_config(method, keep_tokens, options, shared)
