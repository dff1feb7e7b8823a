"""DART against an independent re-implementation of the official selection rule.

Official code: github.com/ZichenWen1/DART, ``llava/model/language_model/modeling_llama_self.py``
(``DART.forward`` L315-368, ``get_retained_image_token`` L397-449) at upstream commit
5a19452fc173017191c247848673e0bde755695a, read in the fork xqy1111111/DART (the upstream
repository could not be mirrored). :func:`official_retained` follows those lines on a seeded
random model of LLaVA-1.5's geometry (576 visual tokens, an 8-layer LM with GQA), computing
everything from the unpruned model's hidden states, without crop's DART code.

The official code runs an unpadded batch of one (L313) through ``generate()``, whose rotary
positions are ``0..L-1`` (L1155); the pivots' keys are ranked after RoPE (``any_states``, L342:
the attention's keys after ``apply_rotary_pos_emb``, L572, and ``repeat_kv``, L578). Where crop
deviates: in a padded batch it rotates each sample's keys at its real-token positions whatever
positions the forward used, so a plain ``forward()`` of a left-padded batch keeps what each
prompt keeps alone (tests/methods/test_dart_invariance.py covers generate and torch.compile).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from crop.api import apply_method
from crop.methods.dart import DARTConfig
from crop.models.tiny import LlavaShape, build_tiny_llava
from tests.conftest import chat_inputs, random_image

K, V = 2, 576
QUESTIONS = ["What is the colour of the small square near the top?", "Count the dots."]


@pytest.fixture(scope="module")
def llava8():
    model, proc = build_tiny_llava(seed=0, shape=LlavaShape(text_layers=8), attn_implementation="eager")
    with torch.no_grad():  # a final norm that is not the identity (so using it, or not, changes the cosines)
        norm = model.model.language_model.norm
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.25)
    return model, proc


def official_retained(model, inputs, max_num_trunction, pivot_image_token=4, pivot_text_token=4):
    """The official retained image tokens (span indices, sorted) of a batch of one unpadded prompt."""
    lm, cfg = model.model.language_model, model.config.text_config
    ids = inputs["input_ids"]
    seq_length = ids.shape[1]
    start = int((ids[0] == model.config.image_token_id).nonzero()[0])  # image_token_start_index
    hidden = model(**inputs, output_hidden_states=True).hidden_states  # hidden[i]: the input of layer i
    # any_states = layer K-1's keys after RoPE and repeat_kv; last_layer_state = norm(output of layer K-1)
    layer = lm.layers[K - 1]
    heads, kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    k = layer.self_attn.k_proj(layer.input_layernorm(hidden[K - 1])).view(1, seq_length, kv, dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden[K - 1], torch.arange(seq_length)[None])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    any_states = repeat_kv(k, heads // kv)  # (1, H, N, d)
    last_layer_state = lm.norm(hidden[K])
    # get_retained_image_token
    topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_image = any_states[0][start:start + V, :]
    k_query = any_states[0][start + V:, :]
    image_indices = (torch.norm(k_image, p=1, dim=-1).topk(pivot_image_token).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text_token).indices + start + V).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + V)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -F.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_real_indices = [valid_indices_list[i] for i in cos_sim.topk(topk).indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(i - start for i in indices_set)


def ours(model, inputs, **config):
    with apply_method(model, DARTConfig(layer=K, **config)) as handle:
        model(**handle.prepare(inputs))
        return handle.stats.full_resolution


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_dart_keeps_the_official_tokens(llava8, keep):
    model, proc = llava8
    inputs = chat_inputs(proc, [random_image(7, (400, 300))], QUESTIONS[:1])
    official = official_retained(model, inputs, keep)
    assert len(official) == 4 + 8 * (keep // 8)  # the image pivots on top of the budget: 68 / 132 / 196
    assert ours(model, inputs, keep_tokens=keep) == [official]
    exact = ours(model, inputs, keep_tokens=keep, budget="exact")[0]
    shared = len(set(exact) & set(official))
    print(f"keep {keep}: official {len(official)}, exact {len(exact)}, shared {shared}")
    assert len(exact) == keep and shared >= keep - 8  # the same greedy, 4 + 8 fewer picks: a few ripple on


def test_dart_batch_with_padding_and_the_rule_is_sensitive(llava8):
    model, proc = llava8
    images = [random_image(7, (400, 300)), random_image(8, (336, 500))]
    singles = [chat_inputs(proc, [im], [q]) for im, q in zip(images, QUESTIONS, strict=True)]
    official = [official_retained(model, s, 64) for s in singles]
    batch = chat_inputs(proc, images, QUESTIONS)  # left-padded
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * 2  # really padded
    assert ours(model, batch, keep_tokens=64) == official  # a plain forward: positions counted from the first pad
    with_positions = {**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    assert ours(model, with_positions, keep_tokens=64) == official  # positions as generate gives them
    # the test tells rules apart: fewer text pivots, or only image pivots, keep other tokens
    assert ours(model, singles[0], keep_tokens=64, text_pivots=0) != [official[0]]
    assert ours(model, singles[0], keep_tokens=64, image_pivots=8, text_pivots=0) != [official[0]]
