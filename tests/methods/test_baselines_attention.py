"""The attention-scored inner-LLM baselines (FastV, PyramidDrop, SparseVLM) on the four tiny architectures.

Common matrix: keep-all is bit-identical, budget honoured (stats and per-layer KV lengths),
cached generation == no-cache greedy, batch == one by one, removal restores the model. Then the
attention rows themselves against eager ``output_attentions``, and hand-made cases whose right
selection is known: queries/keys are planted through forward hooks on the scoring layer's
``q_proj``/``k_proj`` (registered before the method's own), so the model really attends that way.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.hf_compat import generated_cache
from crop.methods import build_config, method_for
from crop.methods.attention import scaled_layers, stage_counts
from crop.methods.fastv import FastV, FastVConfig
from crop.methods.pdrop import PDropConfig, PyramidDrop, pdrop_schedule
from crop.methods.sparsevlm import (
    SparseVLM,
    SparseVLMConfig,
    _apply,
    _Merge,
    official_equivalent,
    sparsevlm_schedule,
)
from crop.models import get_adapter
from tests.conftest import ARCHS, chat_inputs, greedy, random_image, tiny

MATRIX = [(n, "sdpa") for n in ARCHS] + [("tiny-random-llava", "eager")]
METHODS = ["fastv", "pdrop", "sparsevlm"]
IMAGES = [random_image(31, (400, 300)), random_image(32, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
STEPS = 2


def _config(method: str, visual: int, keep: int | None = None):
    """A pruning config for ``method`` that really prunes an image of ``visual`` tokens."""
    if method == "fastv":
        return FastVConfig(keep_tokens=keep or 24)
    cls = PDropConfig if method == "pdrop" else SparseVLMConfig
    return cls(keep_tokens=keep or visual // 2)




_REFS: dict[tuple[str, str], tuple] = {}


def _reference(name: str, attn: str):
    """Stock model on the two-image batch: (inputs, logits, spans)."""
    if (name, attn) not in _REFS:
        model, proc = tiny(name, attn)
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        _REFS[(name, attn)] = (inputs, model(**inputs).logits, get_adapter(model).image_spans(inputs))
    return _REFS[(name, attn)]


def _all_hooks_gone(model) -> bool:
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers()):
        parts = adapter.attention_parts(i)
        if layer._forward_pre_hooks or parts.q_proj._forward_hooks or parts.k_proj._forward_hooks:
            return False
    return True


# -- the common matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,attn", MATRIX)
def test_keep_all_is_bit_identical_and_removal_restores(name, attn, method):
    model, proc = tiny(name, attn)
    inputs, ref, spans = _reference(name, attn)
    with apply_method(model, _config(method, 0, keep=max(s.visual_tokens for s in spans))) as h:
        logits = model(**h.prepare(inputs)).logits
        assert h.stats.full_resolution == [s.visual_positions().tolist() for s in spans]
    assert torch.equal(logits, ref)
    h = apply_method(model, _config(method, min(s.visual_tokens for s in spans)))
    model(**h.prepare(chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])))  # a pruned run, every hook fired
    assert h.stats.visual_tokens_kept != {"llm_input": h.stats.visual_tokens_in}  # it really pruned
    h.remove()
    h.remove()
    assert _all_hooks_gone(model)
    assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ARCHS)
def test_budget_honoured_in_stats_and_kv_lengths(name, method):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    prompt = inputs["input_ids"].shape[1]
    adapter = get_adapter(model)
    visual = adapter.image_spans(inputs)[0].visual_tokens
    config = _config(method, visual)
    with apply_method(model, config) as h:
        out = model(**h.prepare(inputs), use_cache=True)
        stats, layers = h.stats, h.method.stage_layers()
    if method == "fastv":
        expected = [config.keep_tokens]
    elif method == "pdrop":
        sched_layers, expected = pdrop_schedule(visual, config.keep_tokens, adapter.num_layers)
        assert sched_layers == layers
        # floors of N * lambda**s: at most one token per stage under the equivalent budget, never over
        assert config.keep_tokens - len(layers) <= stats.equivalent_tokens[0] <= config.keep_tokens
    else:
        expected = sparsevlm_schedule(visual, config.keep_tokens, layers, adapter.num_layers)[1]  # merged included
        # the budget is the official logger's equivalent (the pruning layer K-1 counted as pruned), met to a token
        assert abs(official_equivalent(visual, expected, layers, adapter.num_layers) - config.keep_tokens) <= 1
    assert [stats.visual_tokens_kept[f"after_layer_{k}"][0] for k in layers] == expected
    assert len(stats.full_resolution[0]) == expected[-1]
    kept_at = [visual] * adapter.num_layers
    for k, n in zip(layers, expected, strict=True):
        kept_at[k:] = [n] * (adapter.num_layers - k)
    assert [layer.keys.shape[-2] for layer in generated_cache(out).layers] == [prompt - visual + n for n in kept_at]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,attn", MATRIX)
def test_cached_generation_matches_no_cache_greedy(name, attn, method):
    model, proc = tiny(name, attn)
    inputs = chat_inputs(proc, IMAGES[1:], QUESTIONS[1:])
    visual = get_adapter(model).image_spans(inputs)[0].visual_tokens
    with apply_method(model, _config(method, visual)) as h:
        cached = greedy(model, h.prepare(inputs), STEPS, use_cache=True)
        kept = h.stats.full_resolution
        uncached = greedy(model, h.prepare(inputs), STEPS, use_cache=False)
        assert h.stats.full_resolution == kept
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ARCHS)
def test_batch_of_two_matches_one_by_one(name, method):
    model, proc = tiny(name)
    inputs, _, spans = _reference(name, "sdpa")
    counts = [s.visual_tokens for s in spans]  # PDrop needs > a quarter of the larger image (InternVL: 3x apart)
    config = _config(method, max(min(counts), int(0.6 * max(counts))))
    with apply_method(model, config) as h:
        batch = greedy(model, h.prepare(inputs), STEPS)
        batch_kept = h.stats.full_resolution
        singles, single_kept = [], []
        for image, question in zip(IMAGES, QUESTIONS, strict=True):
            singles.append(greedy(model, h.prepare(chat_inputs(proc, [image], [question])), STEPS))
            single_kept += h.stats.full_resolution
    assert batch_kept == single_kept
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -STEPS:], single.sequences[0, -STEPS:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_two_images_in_one_prompt_are_ranked_separately(method):
    model, proc = tiny("tiny-random-llava")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    inputs = proc(images=IMAGES, text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], return_tensors="pt")
    budget = 160 if method == "pdrop" else 40  # PDrop's first stage (layer 1 of 4) alone costs 144 of 576
    with apply_method(model, build_config(method, budget)) as h:
        cached = greedy(model, h.prepare(inputs), STEPS)
        kept = h.stats.visual_tokens_kept
        uncached = greedy(model, h.prepare(inputs), STEPS, use_cache=False)
    layers = h.method.stage_layers()
    counts = pdrop_schedule(576, budget, 4)[1] if method == "pdrop" else sparsevlm_schedule(576, budget, layers, 4)[1]
    assert [kept[f"after_layer_{k}"] for k in layers] == [[n, n] for n in counts]
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# -- the attention rows themselves ---------------------------------------------------------------


# -- hand-made cases with a known right selection -------------------------------------------------


def _plant(model, layer: int, strengths: dict[int, float], seq_len: int):
    """Hooks making layer ``layer`` attend (from every query) to slots ``strengths`` only, by those strengths.

    Queries and keys get one non-zero coordinate, in the lowest-frequency rotary pair (RoPE turns
    it by < 0.2 rad over these prompts), so the logits are ~ ``30 * strength * scaling``.
    """
    parts = get_adapter(model).attention_parts(layer)
    dim = parts.head_dim // 2 - 1

    def q_hook(module, args, output):
        if output.shape[1] != seq_len:
            return None
        planted = torch.zeros_like(output).view(*output.shape[:2], parts.heads, parts.head_dim)
        planted[..., dim] = 30.0
        return planted.flatten(2)

    def k_hook(module, args, output):
        if output.shape[1] != seq_len:
            return None
        planted = torch.zeros_like(output).view(*output.shape[:2], parts.kv_heads, parts.head_dim)
        for slot, strength in strengths.items():
            planted[:, slot, :, dim] = strength
        return planted.flatten(2)

    return [parts.q_proj.register_forward_hook(q_hook), parts.k_proj.register_forward_hook(k_hook)]


@pytest.mark.parametrize("name,attn", [("tiny-random-llava", "sdpa"), ("tiny-random-llava", "eager"),
                                       ("tiny-random-qwen2-vl", "sdpa")])
def test_fastv_keeps_exactly_the_planted_tokens(name, attn):
    model, proc = tiny(name, attn)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    span = get_adapter(model).image_spans(inputs)[0]
    planted = [3, 17, 40]
    handles = _plant(model, 1, {span.start + i: 10.0 for i in planted}, inputs["input_ids"].shape[1])
    try:
        with apply_method(model, FastVConfig(keep_tokens=3, layer=2)) as h:
            model(**h.prepare(inputs))
            assert h.stats.full_resolution == [planted]
    finally:
        for handle in handles:
            handle.remove()


def test_pdrop_first_stage_keeps_the_top_ranked_by_its_own_layer():
    model, proc = tiny("tiny-random-llava")
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    span = get_adapter(model).image_spans(inputs)[0]
    ranking = [500, 7, 250, 33, 90, 401, 12, 575, 64, 128, 300, 199, 45, 2, 350, 480, 77, 160, 222, 515]
    # PDrop ranks with the stage layer's own attention: plant at layer 1 (the first stage layer)
    handles = _plant(model, 1, {span.start + i: 10.0 * 0.85 ** r for r, i in enumerate(ranking)},
                     inputs["input_ids"].shape[1])
    config = PDropConfig(layers=(1, 2, 3), ratio=0.03)
    # the official counts: floor(576 * 0.03 ** s), at least one token
    assert pdrop_schedule(576, None, 4, (1, 2, 3), 0.03) == ([1, 2, 3], [17, 1, 1])
    try:
        with apply_method(model, config) as h:
            model(**h.prepare(inputs))
            after = h.stats.visual_tokens_kept
            assert [after[f"after_layer_{k}"] for k in (1, 2, 3)] == [[17], [1], [1]]
            assert set(h.stats.full_resolution[0]) <= set(ranking[:17])
            assert h.stats.equivalent_tokens == [pytest.approx((576 + 17 + 1 + 1) / 4)]
    finally:
        for handle in handles:
            handle.remove()
    # the first stage alone: exactly the 14 best planted tokens
    handles = _plant(model, 1, {span.start + i: 10.0 * 0.85 ** r for r, i in enumerate(ranking)},
                     inputs["input_ids"].shape[1])
    try:
        with apply_method(model, PDropConfig(layers=(1,), ratio=0.03)) as h:
            model(**h.prepare(inputs))
            n1 = h.stats.visual_tokens_kept["after_layer_1"][0]
            assert h.stats.full_resolution == [sorted(ranking[:n1])]
    finally:
        for handle in handles:
            handle.remove()


def test_sparsevlm_ranks_by_planted_attention_recycles_the_next_best_and_places_merged_after_kept():
    model, proc = tiny("tiny-random-llava")
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    span = get_adapter(model).image_spans(inputs)[0]
    ranking = [9, 300, 41, 555, 120, 260, 3, 77, 430, 18, 199, 502, 64, 350, 233, 88, 470, 150, 11, 390, 271, 6,
               333, 444, 101, 520]
    # one stage at layer 2, ranked with layer 1's attention: plant there
    handles = _plant(model, 1, {span.start + i: 10.0 * 0.85 ** r for r, i in enumerate(ranking)},
                     inputs["input_ids"].shape[1])
    config = SparseVLMConfig(keep_tokens=172, layers=(2,))
    (rated,), (total,) = sparsevlm_schedule(576, 172, [2], 4)
    assert rated < len(ranking)
    try:
        with apply_method(model, config) as h:
            model(**h.prepare(inputs))
            kept = {span.start + i for i in h.stats.full_resolution[0]}
            merges = h.method._merges[0]
            order = h.method.pruners[0].context.keep[0].tolist()
    finally:
        for handle in handles:
            handle.remove()
    centres = [m.center for m in merges]  # slots entering layer 2 = prompt positions (first stage)
    assert len(kept) == total == rated + len(merges)  # merged tokens on top of the rated ones
    assert kept - set(centres) == {span.start + i for i in ranking[:rated]}
    groups = torch.cat([m.group for m in merges])
    recycled = int(0.3 * (576 - rated)) + 1  # the official int(0.3 P) + 1
    assert groups.unique().numel() == groups.numel() == recycled and len(merges) == recycled // 10 + 1
    assert {span.start + i for i in ranking[rated:]} <= set(groups.tolist())  # the best-rated pruned are recycled
    assert all(m.group[0] == m.center for m in merges)
    assert not set(groups.tolist()) & {span.start + i for i in ranking[:rated]}  # rated tokens are never merged away
    # the official layout: prefix, kept visual tokens in order, merged tokens, text
    end = span.start + span.length
    assert order == list(range(span.start)) + sorted(kept - set(centres)) + centres + \
        list(range(end, inputs["input_ids"].shape[1]))


def test_sparsevlm_merge_writes_the_cluster_mean():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # (B, L, D)
    before = hidden.clone()
    _apply(hidden, [_Merge(1, 2, torch.tensor([2, 4, 5])), _Merge(0, 1, torch.tensor([1]))])
    torch.testing.assert_close(hidden[1, 2], before[1, [2, 4, 5]].sum(0) / (3 + 1e-6))  # the official weights
    assert torch.equal(hidden[0, 1], before[0, 1] / (1 + 1e-6))  # a lone token too, as the official code
    hidden[1, 2], hidden[0, 1] = before[1, 2], before[0, 1]
    assert torch.equal(hidden, before)  # nothing else written


# -- configs and budgets -------------------------------------------------------------------------


def test_stage_counts_meet_the_equivalent_budget_or_fall_back():
    assert stage_counts(576, 192, [8, 16, 24], 32, 0.5) == [110, 55, 27]  # (8*576 + 8*(110+55+27)) / 32 ~ 192
    assert stage_counts(576, 64, [8, 16, 24], 32, 0.5) == [64, 32, 16]  # 8 layers of 576 already cost 144
    assert stage_counts(576, None, [8, 16, 24], 32, 0.5) == [288, 144, 72]
    assert stage_counts(576, 576, [1, 2], 4, 0.5) == [576, 576]
    assert stage_counts(0, 64, [1, 2], 4, 0.5) == [0, 0]
    assert scaled_layers((8 / 32, 16 / 32, 24 / 32), 32) == [8, 16, 24]
    assert scaled_layers((8 / 32, 16 / 32, 24 / 32), 4) == [1, 2, 3]
    assert scaled_layers((2 / 32, 6 / 32, 15 / 32), 4) == [1, 2]


@pytest.mark.parametrize("cls,method", [(FastVConfig, FastV), (PDropConfig, PyramidDrop),
                                        (SparseVLMConfig, SparseVLM)])
def test_configs_round_trip_and_select_their_method(cls, method):
    config = cls(keep_tokens=64)
    assert cls.from_dict(config.to_dict()) == config
    assert method_for(config) is method
    assert type(build_config(method.name, 64)) is cls
    with pytest.raises(ValueError, match="keep_tokens"):
        cls(keep_tokens=0)
    with pytest.raises(ValueError, match="unknown"):
        cls.from_dict({"keep_tokens": 64, "bogus": 1})


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="layer"):
        FastVConfig(layer=0)
    with pytest.raises(ValueError, match="drop"):
        FastVConfig(drop=1.0)
    with pytest.raises(ValueError, match="ratio"):
        PDropConfig(ratio=0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseVLMConfig(layers=(3, 2))
    with pytest.raises(ValueError, match="recycle"):
        SparseVLMConfig(recycle=1.5)
    with pytest.raises(ValueError, match="three stages|3 stages"):
        SparseVLMConfig(layers=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="positions"):
        SparseVLMConfig(positions="shift")
    model, _ = tiny("tiny-random-llava")
    with pytest.raises(ValueError, match="outside the model's depth"):
        apply_method(model, PDropConfig(layers=(2, 4)))
