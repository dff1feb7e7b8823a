"""PyramidDrop against an independent re-implementation of its official rule (LLaVA-1.5 geometry).

Reference, written from a reading of github.com/Cooperx521/PyramidDrop at commit
6444f304aee4b7edcb022839fb9e8cd07859704a, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_forward`` L1220-1268, ``pdrop_rank_drop`` L1291-1469): at the input of each stage layer
the layer's own input norm and q/k projections, RoPE at the current positions, the last prompt
token's softmax row over all keys averaged over heads, the image columns' top
``int(N * lambda**(s+1))`` kept in order; then the sequence is rebuilt and positions renumbered
0..L'-1. The loop below runs the decoder layers by hand with exactly that, and the library's
hooks must keep the same tokens at every stage and give the same logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from crop.api import apply_method
from crop.methods.pdrop import PDropConfig, pdrop_schedule, solve_ratio
from crop.models import get_adapter
from tests.conftest import LLAVA15_32_SHAPE, llava15_32_model_and_inputs, llm_input_embeddings

SHAPE = LLAVA15_32_SHAPE  # 576 visual tokens, a 32-layer LM like 7B's


@pytest.fixture(scope="module")
def model_and_inputs():
    return llava15_32_model_and_inputs()


def _reference(model, inputs, layers, ratio):
    """Official PDrop by hand: (kept image indices per stage, last-token logits)."""
    lm = model.model.language_model
    h = llm_input_embeddings(model, inputs)  # (1, L, D) what enters layer 0
    span = get_adapter(model).image_spans(inputs)[0]
    n_img = span.visual_tokens
    origin = torch.arange(h.shape[1])  # the prompt position of each slot
    heads, dim = SHAPE["text_heads"], SHAPE["text_hidden"] // SHAPE["text_heads"]
    kept = []
    for index, layer in enumerate(lm.layers):
        pos = torch.arange(h.shape[1])[None]  # renumbered 0..L'-1
        cos, sin = lm.rotary_emb(h, pos)
        if index in layers:
            x = layer.input_layernorm(h)[0]
            q = layer.self_attn.q_proj(x[-1:]).view(1, heads, dim).transpose(0, 1)  # (H, 1, d)
            k = layer.self_attn.k_proj(x).view(-1, heads, dim).transpose(0, 1)  # (H, L, d)
            q = q * cos[0, -1:] + rotate_half(q) * sin[0, -1:]
            k = k * cos[0] + rotate_half(k) * sin[0]
            row = (q @ k.transpose(1, 2) / dim ** 0.5).float().softmax(-1).mean(0)[0]  # (L,)
            image = ((origin >= span.start) & (origin < span.start + n_img)).nonzero().squeeze(1)  # image slots
            n = int(n_img * ratio ** (layers.index(index) + 1))
            top = image[row[image].topk(n).indices.sort().values]
            slots = torch.cat([torch.arange(image[0]), top, torch.arange(image[-1] + 1, h.shape[1])])
            h, origin = h[:, slots], origin[slots]
            kept.append(sorted((origin[(origin >= span.start) & (origin < span.start + n_img)] - span.start).tolist()))
            pos = torch.arange(h.shape[1])[None]
            cos, sin = lm.rotary_emb(h, pos)
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    return kept, model.lm_head(lm.norm(h))[0, -1]


@pytest.mark.parametrize("layers,ratio", [((8, 16, 24), 0.5),  # the paper's schedule (every eval script)
                                          ((2, 8, 16), 0.19)])  # the maintainers' recipe for 64 tokens
def test_pdrop_keeps_what_the_official_rule_keeps(model_and_inputs, layers, ratio):
    model, inputs = model_and_inputs
    ref_kept, ref_logits = _reference(model, inputs, list(layers), ratio)
    with apply_method(model, PDropConfig(layers=layers, ratio=ratio)) as h:
        logits = model(**h.prepare(inputs)).logits[0, -1]
        ours = [h.stats.kept_per_stage[f"after_layer_{k}"][0] for k in layers]
    assert ours == ref_kept
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)  # renumbered positions, as there


def test_keeping_positions_is_a_visible_deviation(model_and_inputs):
    model, inputs = model_and_inputs
    ref_kept, ref_logits = _reference(model, inputs, [8, 16, 24], 0.5)
    with apply_method(model, PDropConfig(layers=(8, 16, 24), ratio=0.5, positions="keep")) as h:
        logits = model(**h.prepare(inputs)).logits[0, -1]
        ours = [h.stats.kept_per_stage[f"after_layer_{k}"][0] for k in (8, 16, 24)]
    assert ours[0] == ref_kept[0]  # the first ranking sees original positions either way
    assert (logits - ref_logits).abs().max() > 1e-3  # later layers compute with other positions


def test_budgets_pick_the_authors_layer_lists_and_lambda():
    # 64 of 576: the paper's 8/16/24 cannot go below 144 equivalent tokens -> the maintainers' 2/8/16,
    # lambda close to the 0.19 they quote (Cooperx521/PyramidDrop issue #29)
    assert abs(solve_ratio(576, 64, [2, 8, 16], 32) - 0.19) < 0.005
    layers, counts = pdrop_schedule(576, 64, 32)
    assert layers == [2, 8, 16] and counts == [110, 21, 4]
    assert pdrop_schedule(576, 128, 32)[0] == [2, 8, 16]
    assert pdrop_schedule(576, 192, 32)[0] == [8, 16, 24]
    assert pdrop_schedule(576, None, 32) == ([8, 16, 24], [288, 144, 72])
    for budget in (64, 128, 192):
        layers, counts = pdrop_schedule(576, budget, 32)
        bounds = layers[1:] + [32]
        equivalent = (layers[0] * 576 + sum((e - s) * c for s, e, c in zip(layers, bounds, counts, strict=True))) / 32
        assert budget - 1 <= equivalent <= budget  # floors: never over the budget, within a token
    with pytest.raises(ValueError, match="cannot meet"):
        pdrop_schedule(576, 10, 32)
    with pytest.raises(ValueError, match="not both"):
        PDropConfig(keep_tokens=64, ratio=0.5)
