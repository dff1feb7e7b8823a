"""Inner-LLM pruning on models whose layers get different masks or rotary tables (issue 29).

Qwen2-VL with ``use_sliding_window`` hands its full-attention layers a causal mask and its
sliding-window layers a sliding one; Gemma 3 has rotary tables per layer type. Every pruned layer
must get *its own* mask and tables rewritten for the kept slots, not layer K's. Here: a tiny
Qwen2-VL with alternating full/sliding layers and a window of 8 tokens (so it bites on a ~70-token
prompt), run through CROP's ILP at K=1 (the first pruned layer is a sliding one), and hand-made
stand-in layers that record what each one is called with, driven through the pruner's hooks.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import crop.methods.inner_llm as inner_llm
from crop.api import apply_crop
from crop.config import CropILPConfig
from crop.methods.inner_llm import InnerLLMPruner, LayerMemo
from crop.models.tiny import qwen_config, qwen_processor
from crop.regions import GridBox
from tests.conftest import chat_inputs, greedy, random_image

LAYER_TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 8
K = 1  # the first pruned layer: a sliding one, followed by a full and a sliding layer
IMAGES = [random_image(61, (224, 224)), random_image(62, (168, 112))]  # 64 and 24 visual tokens
QUESTIONS = ["What color is the star?", "How many circles are there left of it?"]
BOXES = [GridBox(1, 1, 5, 5), GridBox(2, 0, 7, 6)]

_MODELS: dict[tuple[str, int], tuple] = {}


def sliding_qwen(attn: str, window: int = WINDOW):
    """A seeded tiny Qwen2-VL whose text layers alternate full and sliding-window attention (cached)."""
    from transformers import Qwen2VLForConditionalGeneration

    key = (attn, window)
    if key not in _MODELS:
        config = qwen_config("qwen2_vl")
        text = config.text_config
        text.use_sliding_window, text.sliding_window, text.layer_types = True, window, list(LAYER_TYPES)
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
        model.set_attn_implementation(attn)
        _MODELS[key] = model, qwen_processor("qwen2_vl")
    return _MODELS[key]


def _layers(model) -> nn.ModuleList:
    return model.model.language_model.layers


def _record_masks(model) -> tuple[dict[int, object], list]:
    """Forward pre-hooks (registered after any pruner's, so they see its rewrite) recording each layer's mask."""
    seen: dict[int, object] = {}
    handles = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: seen.__setitem__(i, kwargs.get("attention_mask")), with_kwargs=True)
        for i, layer in enumerate(_layers(model))]
    return seen, handles


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def _emulate_pruning(model, keep_cols: torch.Tensor, full_everywhere: bool = False):
    """Hooks that emulate dropping the non-kept tokens at layer K by masking them out as keys.

    Layers ``K..`` keep every token but may only attend to kept keys (and each token to itself,
    so dropped rows stay finite): the kept tokens compute exactly what pruning computes, from
    each layer's *own* mask. ``full_everywhere`` gives the sliding layers layer 0's full mask
    instead (the bug this issue fixes), so a test can show that it differs.

    Args:
        keep_cols: ``(B, L)`` True on the kept slots.
    """
    full: dict[str, object] = {}

    def grab_full(mod, args, kwargs):
        full["mask"] = kwargs.get("attention_mask")

    def restrict(mod, args, kwargs):
        mask = full["mask"] if full_everywhere else kwargs.get("attention_mask")
        hidden = args[0]  # (B, L, D)
        length = hidden.shape[1]
        if mask is None:  # SDPA's implicit causal mask
            mask_allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]  # (1, 1, L, L)
        else:
            mask_allowed = _allowed(mask)  # (B, 1, L, L)
        eye = torch.eye(length, dtype=torch.bool)
        allowed = (mask_allowed & keep_cols[:, None, None, :]) | eye  # (B, 1, L, L)
        if mask is not None and mask.dtype != torch.bool:
            kwargs["attention_mask"] = torch.where(allowed, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
        else:
            kwargs["attention_mask"] = allowed
        return args, kwargs

    handles = [_layers(model)[0].register_forward_pre_hook(grab_full, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(restrict, with_kwargs=True) for layer in _layers(model)[K:]]
    return handles


# -- the model really has two kinds of mask ---------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_builds_a_sliding_mask_for_the_sliding_layers(attn):
    model, proc = sliding_qwen(attn)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    seen, handles = _record_masks(model)
    model(**inputs)
    for h in handles:
        h.remove()
    assert seen[1] is seen[3] and seen[0] is not seen[1]
    sliding = _allowed(seen[1])[0, 0]  # (L, L)
    length = sliding.shape[-1]
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    assert torch.equal(sliding, (k <= q) & (q - k < WINDOW))


# -- (a) keep-all is the stock model ------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_at_a_sliding_layer_is_bit_identical(attn):
    model, proc = sliding_qwen(attn)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    assert not bool(inputs["attention_mask"].all()), "the batch must be padded"
    ref = model(**inputs).logits
    with apply_crop(model, CropILPConfig(keep_tokens=None, layer=K)) as crop:
        out = model(**crop.prepare(inputs, [GridBox.full(), GridBox.full()])).logits
    assert torch.equal(out, ref)


# -- (b) a padded batch is its samples one by one ------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_padded_batch_matches_one_by_one(attn):
    model, proc = sliding_qwen(attn)
    config = CropILPConfig(keep_tokens=6, layer=K)
    with apply_crop(model, config) as crop:
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        assert not bool(inputs["attention_mask"].all()), "the batch must be padded"
        batch = model(**crop.prepare(inputs, BOXES)).logits[:, -1]  # (B, V)
        assert crop.stats.visual_tokens_kept[f"after_layer_{K}"] == [6, 6]
        singles = [model(**crop.prepare(chat_inputs(proc, [im], [q]), [b])).logits[0, -1]
                   for im, q, b in zip(IMAGES, QUESTIONS, BOXES, strict=True)]
    unpruned = model(**inputs).logits[:, -1]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(single, unpruned[i], atol=1e-3)  # the pruning really changed the computation


# -- (c) each pruned layer gets its own mask ----------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_layers_get_their_own_masks(attn):
    model, proc = sliding_qwen(attn)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    with apply_crop(model, CropILPConfig(keep_tokens=6, layer=K)) as crop:
        run = crop.prepare(inputs, BOXES[:1])
        seen, handles = _record_masks(model)
        model(**run)
        for h in handles:
            h.remove()
        kept = crop.method.pruners[0].context.kept_slots()[0]  # (Lk,) original slots
    assert seen[1] is seen[3]  # one rewrite per incoming mask, shared by the layers that get it
    slot_q, slot_k = kept[:, None], kept[None, :]  # (Lk, 1), (1, Lk)
    causal = slot_k <= slot_q
    assert torch.equal(_allowed(seen[3])[0, 0], causal & (slot_q - slot_k < WINDOW))
    full = seen[2]
    if full is not None:  # (SDPA leaves an unpadded causal mask implicit: causal in the kept order)
        assert torch.equal(_allowed(full)[0, 0], causal)
        assert not torch.equal(_allowed(full), _allowed(seen[3]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_logits_match_masking_the_dropped_tokens(attn):
    """Pruning equals the unpruned model whose layers K.. may not attend to the dropped tokens, each through its own mask."""
    model, proc = sliding_qwen(attn)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    with apply_crop(model, CropILPConfig(keep_tokens=6, layer=K)) as crop:
        pruned = model(**crop.prepare(inputs, BOXES)).logits[:, -1]  # (B, V)
        ctx = crop.method.pruners[0].context
        index, valid = ctx.kept_slots(), ctx.valid  # (B, Lk)
    keep_cols = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)  # (B, L)
    for b, row in enumerate(index):
        keep_cols[b, row if valid is None else row[valid[b]]] = True  # padding slots of ragged rows stay out
    handles = _emulate_pruning(model, keep_cols)
    reference = model(**inputs).logits[:, -1]
    for h in handles:
        h.remove()
    handles = _emulate_pruning(model, keep_cols, full_everywhere=True)
    wrong = model(**inputs).logits[:, -1]
    for h in handles:
        h.remove()
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pruned, wrong, atol=1e-3)  # the sliding window really bites on the kept tokens


# -- decode steps ------------------------------------------------------------------------------------


def test_cached_generation_matches_no_cache_with_per_layer_masks():
    """Pruning at K=2: the pruned full and sliding layers each get their own mask in every decode step.

    The window is wider than the sequence, and transformers sizes each kind of decode mask on the
    first layer of that kind (0 and 1 here, both unpruned), so both masks cover the whole sequence.
    """
    model, proc = sliding_qwen("sdpa", window=512)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    with apply_crop(model, CropILPConfig(keep_tokens=6, layer=2)) as crop:
        seen, handles = _record_masks(model)
        cached = greedy(model, crop.prepare(inputs, BOXES), 4, use_cache=True)
        for h in handles:
            h.remove()
        uncached = greedy(model, crop.prepare(inputs, BOXES), 4, use_cache=False)
    assert seen[2] is not seen[3]  # the last decode step: each pruned layer got its own rewrite
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer,refused", [(1, 1), (2, 3)], ids=["sized-on-pruned-layer", "window-outgrown"])
def test_decode_with_a_mask_over_other_tokens_is_refused_in_one_line(layer, refused):
    """K=1: the sliding mask is sized on layer 1's pruned cache; K=2: on layer 1's 8-token window."""
    model, proc = sliding_qwen("sdpa")
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    with apply_crop(model, CropILPConfig(keep_tokens=6, layer=layer)) as crop:
        with pytest.raises(RuntimeError, match=rf"decoder layer {refused} got a decode-step mask over \d+ keys") as err:
            greedy(model, crop.prepare(inputs, BOXES[:1]), 2)
    assert "\n" not in str(err.value)


# -- stand-in layers, driven through the hooks ---------------------------------------------------------

L, D = 10, 4
KEEP = torch.tensor([0, 2, 3, 7, 9])


class Recorder(nn.Module):
    """A stand-in decoder layer: records the keyword arguments it is called with and returns its input."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append(dict(kwargs, hidden=hidden))
        return hidden


class FakeCache:
    """Just enough of a KV cache for the hooks: every layer holds ``cached`` tokens."""

    def __init__(self, cached: int) -> None:
        self.cached = cached

    def get_seq_length(self, layer: int = 0) -> int:
        return self.cached


def _stack(n: int = 4) -> nn.ModuleList:
    return nn.ModuleList(Recorder() for _ in range(n))


def _run(layers: nn.ModuleList, hidden: torch.Tensor, per_layer: list[dict]) -> torch.Tensor:
    for layer, kwargs in zip(layers, per_layer, strict=True):
        hidden = layer(hidden, **kwargs)
    return hidden


def _tables(seed: int, length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, 6, generator=gen), torch.randn(1, length, 6, generator=gen)  # (1, L, d) each


def _masks(queries: int = L, keys: int = L) -> dict[str, torch.Tensor]:
    q = torch.arange(keys - queries, keys)[:, None]
    k = torch.arange(keys)[None, :]
    causal = (k <= q)[None, None]  # (1, 1, q, L)
    return {"full_attention": causal, "sliding_attention": causal & (q - k < 3)}


def _typed_kwargs(types: list[str], masks: dict, tables: dict, pos: torch.Tensor, **extra) -> list[dict]:
    """Per-layer kwargs as a model with layer types hands them out: one shared object per type."""
    return [dict(attention_mask=masks[t], position_embeddings=tables[t], position_ids=pos, **extra) for t in types]


TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


def test_each_pruned_layer_gets_its_own_mask_and_tables_gathered():
    layers = _stack()
    pruner = InnerLLMPruner(layers, K)
    pruner.attach()
    pruner.arm(keep=[KEEP], prompt_len=L)
    masks = _masks()
    tables = {"full_attention": _tables(0), "sliding_attention": _tables(1)}
    pos = torch.arange(L)[None]  # (1, L)
    _run(layers, torch.randn(1, L, D), _typed_kwargs(TYPES, masks, tables, pos))
    for i in range(K, 4):
        got, kind = layers[i].calls[-1], TYPES[i]
        assert torch.equal(got["attention_mask"], masks[kind][:, :, KEEP][..., KEEP])
        for mine, theirs in zip(got["position_embeddings"], tables[kind], strict=True):
            assert torch.equal(mine, theirs[:, KEEP])
        assert torch.equal(got["position_ids"], pos[:, KEEP])
        assert got["hidden"].shape == (1, len(KEEP), D)
    assert not torch.equal(layers[2].calls[-1]["attention_mask"], layers[3].calls[-1]["attention_mask"])
    # the same incoming objects get the very same rewrite (memoized), other objects their own
    assert layers[1].calls[-1]["attention_mask"] is layers[3].calls[-1]["attention_mask"]
    assert layers[1].calls[-1]["position_embeddings"] is layers[3].calls[-1]["position_embeddings"]
    assert layers[1].calls[-1]["position_embeddings"] is not layers[2].calls[-1]["position_embeddings"]


def test_decode_steps_prune_each_layers_own_mask():
    layers = _stack()
    pruner = InnerLLMPruner(layers, K)
    pruner.attach()
    pruner.arm(keep=[KEEP], prompt_len=L)
    tables = {t: _tables(0) for t in ("full_attention", "sliding_attention")}
    pos = torch.arange(L)[None]
    _run(layers, torch.randn(1, L, D), _typed_kwargs(TYPES, _masks(), tables, pos))
    step = _masks(queries=1, keys=L + 1)  # (1, 1, 1, L + 1) each: one generated token
    one = {t: _tables(0, 1) for t in tables}
    _run(layers, torch.randn(1, 1, D), _typed_kwargs(TYPES, step, one, torch.tensor([[L]]), cache=FakeCache(len(KEEP))))
    keys = torch.cat([KEEP, torch.tensor([L])])  # the kept prompt tokens and the generated one
    for i in range(K, 4):
        assert torch.equal(layers[i].calls[-1]["attention_mask"], step[TYPES[i]][..., keys])
    assert not torch.equal(layers[2].calls[-1]["attention_mask"], layers[3].calls[-1]["attention_mask"])


def test_the_rewrites_are_made_once_per_call_whatever_the_depth(monkeypatch):
    """Layers given the same objects cost what one layer costs: no gather per later layer."""
    gathers = {"n": 0}
    gather = inner_llm._gather_seq

    def counting(*args, **kwargs):
        gathers["n"] += 1
        return gather(*args, **kwargs)

    monkeypatch.setattr(inner_llm, "_gather_seq", counting)
    counts = []
    for depth in (2, 8):
        layers = _stack(depth)
        pruner = InnerLLMPruner(layers, K)
        pruner.attach()
        pruner.arm(keep=[KEEP], prompt_len=L)
        shared = dict(attention_mask=_masks()["full_attention"], position_embeddings=_tables(0),
                      position_ids=torch.arange(L)[None])
        gathers["n"] = 0
        _run(layers, torch.randn(1, L, D), [shared] * depth)
        counts.append(gathers["n"])
    assert counts[0] == counts[1] > 0


def test_the_memo_does_not_outlive_its_forward_call():
    layers = _stack()
    pruner = InnerLLMPruner(layers, K)
    pruner.attach()
    tables = {t: _tables(0) for t in ("full_attention", "sliding_attention")}
    pos = torch.arange(L)[None]
    for keep, seed in ((KEEP, 0), (torch.tensor([1, 4, 5, 8]), 1)):
        pruner.arm(keep=[keep], prompt_len=L)
        masks = {t: m & (torch.rand(m.shape, generator=torch.Generator().manual_seed(seed)) > 0.3) | torch.eye(L, dtype=torch.bool)
                 for t, m in _masks().items()}
        _run(layers, torch.randn(1, L, D), _typed_kwargs(TYPES, masks, tables, pos))
        for i in range(K, 4):  # the same tables object in both calls, gathered at each call's own slots
            assert torch.equal(layers[i].calls[-1]["attention_mask"], masks[TYPES[i]][:, :, keep][..., keep])
            assert torch.equal(layers[i].calls[-1]["position_embeddings"][0], tables[TYPES[i]][0][:, keep])


def test_layer_memo_answers_by_identity_and_holds_sources_weakly():
    memo = LayerMemo()
    mask = torch.ones(2, 2)
    memo.put("mask", (mask,), "pruned")
    assert memo.get("mask", (mask,)) == "pruned"
    assert memo.get("mask", (mask.clone(),)) is None  # equal values, other object: no answer
    assert memo.get("rotary", (mask,)) is None
    memo.put("mask", (None,), "implicit")
    assert memo.get("mask", (None,)) == "implicit"
    alive = weakref.ref(mask)
    del mask
    gc.collect()
    assert alive() is None  # the memo did not keep the model's mask alive


def test_renumbering_pruner_refuses_a_layer_with_other_rotary_tables():
    layers = _stack()
    pruner = InnerLLMPruner(layers, K, rotary=lambda hidden, pos: _tables(9, pos.shape[-1]))
    pruner.attach()
    pos = torch.arange(L)[None]
    same = {t: _tables(0) for t in ("full_attention", "sliding_attention")}
    pruner.arm(keep=[KEEP], prompt_len=L)
    _run(layers, torch.randn(1, L, D), _typed_kwargs(TYPES, _masks(), {t: same["full_attention"] for t in same}, pos))
    renumbered = layers[K].calls[-1]
    assert torch.equal(renumbered["position_ids"], torch.arange(len(KEEP))[None])
    assert all(layers[i].calls[-1]["position_embeddings"] is renumbered["position_embeddings"] for i in range(K, 4))
    per_type = {"full_attention": _tables(0), "sliding_attention": _tables(1)}
    pruner.arm(keep=[KEEP], prompt_len=L)
    with pytest.raises(RuntimeError, match=r"decoder layer 2 gets other rotary inputs .* pruning layer 1") as err:
        _run(layers, torch.randn(1, L, D), _typed_kwargs(TYPES, _masks(), per_type, pos))
    assert "\n" not in str(err.value)


def test_a_layer_without_rotary_tables_is_refused_in_one_line():
    layers = _stack()
    pruner = InnerLLMPruner(layers, K)
    pruner.attach()
    pruner.arm(keep=[KEEP], prompt_len=L)
    per_layer = _typed_kwargs(TYPES, _masks(), {t: _tables(0) for t in ("full_attention", "sliding_attention")},
                              torch.arange(L)[None])
    per_layer[2] = dict(per_layer[2], position_embeddings=None)
    with pytest.raises(RuntimeError, match=r"decoder layer 2 got no \(cos, sin\) position_embeddings") as err:
        _run(layers, torch.randn(1, L, D), per_layer)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("padding_mask", [False, True])
def test_a_mask_of_unknown_kind_is_refused_in_one_line(padding_mask):
    layers = _stack()
    pruner = InnerLLMPruner(layers, K, padding_mask=padding_mask)
    pruner.attach()
    pruner.arm(keep=[KEEP], prompt_len=L)
    masks = _masks()
    per_layer = _typed_kwargs(TYPES, masks, {t: _tables(0) for t in masks}, torch.arange(L)[None])
    if padding_mask:  # FlashAttention: (B, L) masks only
        per_layer = [dict(kw, attention_mask=torch.ones(1, L, dtype=torch.long)) for kw in per_layer]
        per_layer[3] = dict(per_layer[3], attention_mask=masks["full_attention"])
        match = r"decoder layer 3 got an attention mask the pruner cannot prune \(a 4-D tensor\)"
    else:
        per_layer[3] = dict(per_layer[3], attention_mask=dict(masks))
        match = r"decoder layer 3 got an attention mask the pruner cannot prune \(a dict\)"
    with pytest.raises(RuntimeError, match=match) as err:
        _run(layers, torch.randn(1, L, D), per_layer)
    assert "\n" not in str(err.value)
