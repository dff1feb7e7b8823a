"""Qwen3-VL: DeepStack features follow the kept, pooled and merged tokens; the adapter is Qwen2-VL's layout.

The method matrix (tests/methods/test_method_matrix.py) runs every method on the tiny Qwen3-VL
too; these tests check what is particular to it against references computed by hand:

- ILP at K before, inside and after the DeepStack layers equals a hand-run of the text model on
  the kept tokens, with each kept visual token getting its own DeepStack features;
- the pre-LLM methods hand the model DeepStack features mixed as their tokens were.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.methods import METHODS, PreLLMMethod, build_config, method_names
from crop.models import get_adapter
from crop.models.qwen3_vl import Qwen3VLAdapter
from crop.regions import GridBox
from tests.conftest import chat_inputs, method_config, random_image, tiny

NAME = "tiny-random-qwen3-vl"
BOX = GridBox(1, 2, 5, 6)


def _inputs(images=None, questions=None):
    _, proc = tiny(NAME)
    return chat_inputs(proc, images or [random_image(3, (400, 300))], questions or ["What color is the star?"])


def _text_model_inputs(model, inputs) -> dict:
    """What the stock model hands its text model (embeddings, positions, visual mask, DeepStack features)."""
    seen: dict = {}
    lm = model.model.language_model
    grab = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        grab.remove()
    return seen


def _hand_run(model, inputs, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """Last-position logits of the text model run by hand: all tokens up to ``layer``, then only ``keep``.

    One unpadded prompt (SDPA's implicit causal mask in the order of the kept tokens); each kept
    visual token gets its own DeepStack features after layers 0..levels-1, dropped ones none.
    """
    seen = _text_model_inputs(model, inputs)
    lm = model.model.language_model
    hidden, visual = seen["inputs_embeds"], seen["visual_pos_masks"]  # (1, L, D), (1, L)
    levels = seen["deepstack_visual_embeds"]  # per level (N, D)
    cos, sin = lm.rotary_emb(hidden, seen["position_ids"])  # (1, L, d) each
    row = visual[0].long().cumsum(0) - 1  # (L,) DeepStack row of each visual position
    slots = torch.arange(hidden.shape[1])  # (L,) prompt position of each slot
    for i, block in enumerate(lm.layers):
        if i == layer:
            hidden, cos, sin, slots = hidden[:, keep], cos[:, keep], sin[:, keep], slots[keep]
        hidden = block(hidden, position_embeddings=(cos, sin), attention_mask=None)
        if i < len(levels):
            on = visual[0, slots]  # (L',) slots holding visual tokens
            hidden = hidden.clone()
            hidden[0, on] = hidden[0, on] + levels[i][row[slots[on]]]
    return model.lm_head(lm.norm(hidden))[0, -1]


def test_the_adapter_and_the_tiny_model_have_qwen3_vl_geometry():
    model, _ = tiny(NAME)
    adapter = get_adapter(model)
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.deepstack_levels == 3
    inputs = _inputs()
    (span,) = adapter.image_spans(inputs)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (span.rows, span.cols) == (h // 2, w // 2) and span.length == h * w // 4
    # 16 px patches merged 2x2: one token per 32 px square of the resized image
    assert model.config.vision_config.patch_size == 16
    # every attention layer has per-head q/k norms, and the adapter hands them to attention recomputation
    parts = adapter.attention_parts(1)
    assert parts.q_norm is model.model.language_model.layers[1].self_attn.q_norm
    assert parts.k_norm is model.model.language_model.layers[1].self_attn.k_norm


@pytest.mark.parametrize("layer", [1, 2, 3])  # inside the DeepStack layers (0-2) and after them
def test_ilp_equals_a_hand_run_with_deepstack_on_the_kept_tokens(layer):
    model, _ = tiny(NAME)
    inputs = _inputs()
    (span,) = get_adapter(model).image_spans(inputs)
    with apply_method(model, build_config("crop-ilp", 12, [], {"layer": layer})) as h:
        logits = model(**h.prepare(inputs, [BOX])).logits[0, -1]
        kept = torch.tensor(h.stats.full_resolution[0])
    assert kept.numel() == 12
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[span.start:span.start + span.length] = False
    keep[span.start + kept] = True
    reference = _hand_run(model, inputs, keep.nonzero().squeeze(1), layer)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    # the DeepStack features matter: a hand-run that gives the kept tokens none differs
    assert not torch.allclose(logits, model(**inputs).logits[0, -1], atol=1e-3)


def test_ilp_inside_the_deepstack_layers_needs_the_relay():
    # without it, the model adds DeepStack features with the prompt's mask to a shortened sequence
    model, _ = tiny(NAME)
    inputs = _inputs()
    with apply_method(model, build_config("crop-ilp", 12, [], {"layer": 1})) as h:
        prepared = h.prepare(inputs, [BOX])
        assert h.method.relay is not None
        h.method.relay.detach()
        with pytest.raises((RuntimeError, IndexError)):
            model(**prepared)


PRE_LLM = [m for m in method_names() if m != "none" and not m.startswith("test-")
           and issubclass(METHODS.get(m), PreLLMMethod)]


@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_methods_hand_the_model_deepstack_features_mixed_like_their_tokens(method):
    model, _ = tiny(NAME)
    inputs = _inputs([random_image(3, (400, 300)), random_image(4, (320, 480))],
                     ["What color is the star?", "How many?"])
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    original = adapter.deepstack_features(inputs)  # [image][level] (length, D)
    features = adapter.encode_images(inputs)
    with apply_method(model, method_config(method, 20, model)) as h:
        prepared = h.prepare(inputs, [BOX, BOX])
        images = [h.method.compress_image(enc, span, BOX, i)[0]
                  for i, (span, enc) in enumerate(zip(spans, h.method.encode(inputs), strict=True))]
        received = _text_model_inputs(model, prepared)["deepstack_visual_embeds"]  # per level (N', D)
    for image, span, feats in zip(images, spans, features, strict=True):
        assert image.visual_tokens < span.visual_tokens  # it really compressed
        copies = (image.tokens == feats[image.source]).all(dim=1)  # (M,) tokens that are their source's features
        if image.mixing is None:
            assert copies.all(), f"{method} makes new tokens but does not say what they are made of"
            continue
        weights = image.mixing()  # (M, length)
        assert weights.shape == (image.tokens.shape[0], span.length)
        assert (weights[copies] == torch.eye(span.length)[image.source[copies]]).all()  # copies: one-hot
        if method in ("crop-plc", "pool"):  # averages of their members: the weights give the tokens back
            torch.testing.assert_close(weights @ feats, image.tokens, atol=1e-5, rtol=1e-5)
    for level in range(3):
        expected = torch.cat([image.carry(per_image[level]) for image, per_image in zip(images, original, strict=True)])
        torch.testing.assert_close(received[level], expected)


def test_plc_pooled_tokens_get_the_mean_deepstack_features_of_their_block():
    model, _ = tiny(NAME)
    inputs = _inputs()
    adapter = get_adapter(model)
    (span,) = adapter.image_spans(inputs)
    levels = adapter.deepstack_features(inputs)[0]  # per level (length, D)
    with apply_method(model, build_config("crop-plc", None, ["pool=4"])) as h:
        prepared = h.prepare(inputs, [GridBox(0, 0, 1, 1)])  # a tiny region: nearly everything pooled
        kept = set(h.stats.full_resolution[0])
        received = _text_model_inputs(model, prepared)["deepstack_visual_embeds"]
    # rebuild the pooled tokens' features by hand: mean over each 4x4 block's tokens outside the region
    expected = []
    for r0 in range(0, span.rows, 4):
        for c0 in range(0, span.cols, 4):
            block = [r * span.cols + c for r in range(r0, min(r0 + 4, span.rows))
                     for c in range(c0, min(c0 + 4, span.cols))]
            outside = [i for i in block if i not in kept]
            inside = [i for i in block if i in kept]
            for i in inside:
                expected.append((i, levels[0][i]))
            if outside:
                expected.append((outside[0], levels[0][outside].mean(0)))
    expected.sort(key=lambda item: item[0])
    torch.testing.assert_close(received[0], torch.stack([v for _, v in expected]), atol=1e-6, rtol=1e-5)


def test_hub_ids_and_the_tiny_name_load_through_the_same_adapter():
    from crop.models.tiny import TINY_MODEL_NAMES

    assert NAME in TINY_MODEL_NAMES
    model, _ = tiny(NAME)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.config.model_type == "qwen3_vl"


def _tiny_moe():
    """A tiny random Qwen3-VL-MoE: the dense tiny model's config with sparse MoE blocks in every LM layer."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from crop.models.tiny import qwen_config

    dense = qwen_config("qwen3_vl").to_dict()
    text, vision = dense.pop("text_config"), dense.pop("vision_config")
    for sub in (text, vision):
        for key in ("model_type", "architectures", "transformers_version"):
            sub.pop(key, None)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    ids = {k: dense[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    torch.manual_seed(0)
    return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)).eval()


@pytest.mark.parametrize("method", ["crop-ilp", "crop-plc", "fastv"])
def test_the_moe_variant_shares_the_code_path(method):
    model = _tiny_moe()
    inputs = _inputs()
    assert isinstance(get_adapter(model), Qwen3VLAdapter)
    reference = model(**inputs).logits
    with apply_method(model, build_config(method, 10**6, [], {"layer": 1})) as h:
        assert torch.equal(model(**h.prepare(inputs, [BOX])).logits, reference)  # keep-all: bit-identical
    with apply_method(model, build_config(method, 12, [], {"layer": 1})) as h:
        pruned = model(**h.prepare(inputs, [BOX])).logits
        kept = h.stats.visual_tokens_kept
    assert 12 in kept.get("after_layer_1", kept["llm_input"])
    assert torch.isfinite(pruned).all() and not torch.allclose(pruned[0, -1], reference[0, -1], atol=1e-4)
