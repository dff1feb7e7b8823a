"""SparseVLM against an independent re-implementation of its official v1.5 rule (LLaVA-1.5 geometry).

Reference, written from a reading of github.com/Gumpest/SparseVLMs at commit
26a5f48813c46cd1c7364160354e7fdd3febaa67 (default ``USE_VERSION``, v1):
``llava/model/language_model/modelling_sparse_llama.py`` (raters L186-204: ``V T^T`` softmax over
the text after the image, mean over the image, raters ``> mean``; pruning loop L214-321: layers
2, 6, 15 run on all tokens, their own attention averaged over heads and raters ranks the current
visual tokens, ``topk(min(n, v - 1))`` kept in order, the ``int(0.3 P) + 1`` best pruned of the
layer's output clustered into ``int(R / 10) + 1`` merged tokens inserted after the kept ones,
``position_ids[:, :new_len]``), ``score.py`` L9-46 (the v1 tables) and ``utils.py`` L179-239
(``cluster_and_merge``, without its 1e-6 random jitter). The loop below runs the decoder layers
by hand with exactly that; the library's hooks must keep the same tokens, build the same
clusters and give the same logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from crop.api import apply_method
from crop.methods.sparsevlm import SparseVLMConfig
from crop.models import get_adapter
from tests.conftest import LLAVA15_32_SHAPE, llava15_32_model_and_inputs, llm_input_embeddings

SHAPE = LLAVA15_32_SHAPE  # 576 visual tokens, a 32-layer LM like 7B's
TABLES = {64: [66, 30, 17], 128: [303, 110, 36], 192: [300, 200, 110]}  # score.py, v1
PRUNING_LOC = [2, 6, 15]


@pytest.fixture(scope="module")
def model_and_inputs():
    return llava15_32_model_and_inputs()


def _cluster_and_merge(x, cluster_num):
    """utils.py ``cluster_and_merge`` for one sample ``x`` (N, C), without the random density jitter."""
    n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / c ** 0.5  # (N, N)
    dist_nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).to(x.dtype)
    parent = (dist * mask + dist.max() * (1 - mask)).min(dim=-1).values
    index_down = torch.topk(parent * density, k=cluster_num).indices
    idx_cluster = dist[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    weight = torch.zeros(cluster_num).index_add_(0, idx_cluster, torch.ones(n)) + 1e-6
    merged = torch.zeros(cluster_num, c).index_add_(0, idx_cluster, x / weight[idx_cluster][:, None])
    return merged, idx_cluster


def _reference(model, inputs, table):
    """Official SparseVLM v1 by hand: per stage (rated kept identities, clusters as identity sets), last logits.

    Visual tokens are named by identity: an original token by its span index, a merged one by
    ``("m", stage, c)``.
    """
    lm = model.model.language_model
    h = llm_input_embeddings(model, inputs)  # (1, L, D) what enters layer 0
    span = get_adapter(model).image_spans(inputs)[0]
    v_start, v_num = span.start, span.visual_tokens
    text_start = v_start + v_num
    # raters (L199-204)
    m_v_t = (h[:, v_start:text_start] @ h[:, text_start:].transpose(1, 2)).softmax(2).mean(1)  # (1, T)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())[1]
    heads, dim = SHAPE["text_heads"], SHAPE["text_hidden"] // SHAPE["text_heads"]
    ident = list(range(v_num))
    stages = []
    for index, layer in enumerate(lm.layers):
        pos = torch.arange(h.shape[1])[None]  # position_ids[:, :new_len]: 0..L'-1
        cos, sin = lm.rotary_emb(h, pos)
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        out = out[0] if isinstance(out, tuple) else out
        if index in PRUNING_LOC:
            x = layer.input_layernorm(h)[0]
            q = layer.self_attn.q_proj(x).view(-1, heads, dim).transpose(0, 1)  # (H, L, d)
            k = layer.self_attn.k_proj(x).view(-1, heads, dim).transpose(0, 1)
            q = q * cos[0] + rotate_half(q) * sin[0]
            k = k * cos[0] + rotate_half(k) * sin[0]
            causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
            attn = (q @ k.transpose(1, 2) / dim ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1).mean(0)
            relation = attn[t_token_idx + text_start, v_start:v_start + v_num].mean(0)  # (v,)
            n = min(table[PRUNING_LOC.index(index)], v_num - 1)
            keep = torch.zeros(v_num, dtype=torch.bool)
            keep[relation.topk(n).indices] = True
            pruned = torch.where(~keep)[0]
            r = int(pruned.shape[0] * 0.3) + 1
            recycled = pruned[relation[pruned].topk(r).indices]
            cluster_num = int(r / 10) + 1
            merged, assign = _cluster_and_merge(out[0, v_start + recycled], cluster_num)
            stage = PRUNING_LOC.index(index)
            rated = {ident[i] for i in torch.where(keep)[0].tolist()}
            clusters = [{ident[int(recycled[j])] for j in torch.where(assign == c)[0]} for c in range(cluster_num)]
            stages.append((rated, clusters))
            kept = v_start + torch.where(keep)[0]
            out = torch.cat([out[:, :v_start], out[:, kept], merged[None], out[:, text_start:]], dim=1)
            ident = [ident[i] for i in torch.where(keep)[0].tolist()] + [("m", stage, c) for c in range(cluster_num)]
            v_num = n + cluster_num
            text_start = v_start + v_num
        h = out
    return stages, model.lm_head(lm.norm(h))[0, -1]


def _ours(handle, span):
    """The library's stages in the reference's identities, from its stats and recorded merges."""
    names = {}  # prompt position of a slot -> identity of the token it holds
    stages = []
    for s, layer in enumerate(handle.method.stage_layers()):
        merges = handle.method._merges[s]
        name = lambda o: names.get(o, o - span.start)  # noqa: E731
        kept = {span.start + i for i in handle.stats.kept_per_stage[f"after_layer_{layer}"][0]}
        centres = {m.origin for m in merges}
        rated = {name(o) for o in kept - centres}
        clusters = [{name(int(o)) for o in m.group_origin} for m in merges]
        stages.append((rated, clusters))
        for c, m in enumerate(merges):
            names[m.origin] = ("m", s, c)
    return stages


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_sparsevlm_keeps_and_merges_what_the_official_rule_does(model_and_inputs, budget):
    model, inputs = model_and_inputs
    ref_stages, ref_logits = _reference(model, inputs, TABLES[budget])
    span = get_adapter(model).image_spans(inputs)[0]
    with apply_method(model, SparseVLMConfig(keep_tokens=budget)) as h:
        logits = model(**h.prepare(inputs)).logits[0, -1]
        assert h.method.stage_layers() == [3, 7, 16]  # the outputs of 2, 6, 15 pruned
        ours = _ours(h, span)
        totals = [h.stats.visual_tokens_kept[f"after_layer_{k}"][0] for k in (3, 7, 16)]
    assert totals == [len(r) + len(c) for r, c in ref_stages]  # merged tokens on top of the table's counts
    assert [len(r) for r, _ in ours] == TABLES[budget]
    assert ours == ref_stages  # same rated tokens and same clusters (in centre order) at every stage
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)  # same values, placement, positions


def test_keeping_positions_and_slots_is_a_visible_deviation(model_and_inputs):
    """``positions="keep"`` (what M-RoPE models run): the same first stage, other logits afterwards."""
    model, inputs = model_and_inputs
    ref_stages, ref_logits = _reference(model, inputs, TABLES[192])
    span = get_adapter(model).image_spans(inputs)[0]
    with apply_method(model, SparseVLMConfig(keep_tokens=192, positions="keep")) as h:
        logits = model(**h.prepare(inputs)).logits[0, -1]
        ours = _ours(h, span)
    assert ours[0] == ref_stages[0]  # the first ranking sees the original layout either way
    gap = (logits - ref_logits).abs().max().item()
    assert gap > 1e-3  # later layers see merged tokens inside the image, at other positions


def test_counts_and_budget_match_the_official_logger(model_and_inputs):
    model, _ = model_and_inputs
    totals = {64: [82, 32, 18], 128: [312, 117, 39], 192: [309, 204, 113]}  # the tables + int(int(0.3 P) + 1) / 10) + 1
    for budget, (n1, n2, n3) in totals.items():
        with apply_method(model, SparseVLMConfig(keep_tokens=budget)) as h:
            counts = h.method.planned_counts(576)
        assert counts == [576] * 3 + [n1] * 4 + [n2] * 9 + [n3] * 16  # layer 2 itself runs on all 576
        # the official logger's "Equal Tokens" (merged included, layer 2 counted as pruned): 64.8 / 128.6 / 192.0
        assert budget <= (2 * 576 + 4 * n1 + 9 * n2 + 17 * n3) / 32 < budget + 1
    with apply_method(model, SparseVLMConfig(keep_tokens=960)) as h:  # 192 of 576 for 2880 tokens: the table x 5
        assert h.method.schedule(2880)[0] == [1500, 1000, 550]
    for budget, n_in in [(100, 576), (150, 576), (300, 576), (1000, 2880)]:  # other budgets and sizes: met to a token
        with apply_method(model, SparseVLMConfig(keep_tokens=budget)) as h:
            counts = h.method.planned_counts(n_in)
        n1, n2, n3 = counts[3], counts[7], counts[16]
        assert abs((2 * n_in + 4 * n1 + 9 * n2 + 17 * n3) / 32 - budget) <= 1
    with apply_method(model, SparseVLMConfig(keep_tokens=39)) as h, pytest.raises(ValueError, match="cannot meet"):
        h.method.planned_counts(576)  # one token per stage already costs 40
