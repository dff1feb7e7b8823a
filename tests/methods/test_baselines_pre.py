"""Baselines pool, random (pre / inner), VisionZip and DART on the four tiny architectures.

The common matrix (keep-all is a no-op, budget honoured, cached == uncached greedy, batch ==
one by one, removal restores the model) plus, per method, a hand-made case whose right answer
is known.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crop.api import apply_method
from crop.hf_compat import generated_cache
from crop.methods import build_config, method_for
from crop.methods.dart import DART, DARTConfig
from crop.methods.pool import PoolConfig, UniformPool
from crop.methods.random_prune import (
    RandomConfig,
    RandomInnerConfig,
    RandomPrune,
    RandomPruneInner,
    random_keep,
)
from crop.methods.visionzip import VisionZip, VisionZipConfig, visionzip_image
from crop.models import get_adapter
from crop.models.base import ImageSpan, TokenGrid, VLMAdapter
from crop.models.clip_attention import clip_feature_layer
from crop.models.qwen_vision_attention import received_attention, to_token_order
from crop.ops.grid_pool import band_layout, pool_grid_to, split_budget
from crop.ops.similarity import duplication_select, merge_into_targets, spread_indices
from tests.conftest import ARCHS, chat_inputs, greedy, random_image, tiny

IMAGES = [random_image(31, (400, 300)), random_image(32, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
STEPS = 2
BUDGET = 40

CONFIGS = {
    "pool": lambda keep, seed=0: PoolConfig(keep_tokens=keep),
    "random": lambda keep, seed=0: RandomConfig(keep_tokens=keep, seed=seed),
    "random-inner": lambda keep, seed=0: RandomInnerConfig(keep_tokens=keep, seed=seed),
    "visionzip": lambda keep, seed=0: VisionZipConfig(keep_tokens=keep),
    # DART's official budget keeps its image pivots on top of keep_tokens; the matrix checks the exact one
    # (the official counts are checked against the official rule in tests/methods/test_reference_dart.py)
    "dart": lambda keep, seed=0: DARTConfig(keep_tokens=keep, budget="exact"),
}
INNER = {"random-inner", "dart"}


# random at layer K is CROP ILP's path with another keep set; Qwen2.5-VL shares Qwen2-VL's adapter for it
CASES = [pytest.param(name, method, id=f"{method}-{name}") for name in ARCHS for method in CONFIGS
         if (name, method) != ("tiny-random-qwen2.5-vl", "random-inner")]
# generation tests skip Qwen2.5-VL: it shares Qwen2-VL's adapter and LM path (only its vision tower differs,
# which none of these methods touch there), and the CPU budget of the suite is small
GEN_CASES = [c for c in CASES if c.values[0] != "tiny-random-qwen2.5-vl"]
# pool and random-before-the-LLM register no hooks at all (checked once); the others on every architecture
HOOK_CASES = [c for c in CASES if c.values[1] in INNER | {"visionzip"} or c.values[0] == "tiny-random-llava"]




def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


_REFS: dict[str, tuple] = {}


def _reference(name: str):
    """The stock model on the mixed-size batch: (inputs, last-position logits)."""
    if name not in _REFS:
        model, proc = tiny(name)
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        _REFS[name] = (inputs, model(**inputs).logits)
    return _REFS[name]


def _stage(method: str) -> str:
    return "after_layer_2" if method in INNER else "llm_input"


# -- the common matrix --------------------------------------------------------------------------


@pytest.mark.parametrize("name,method", CASES)
def test_keep_all_is_bit_identical(name, method):
    model, _ = tiny(name)
    inputs, ref = _reference(name)
    with apply_method(model, CONFIGS[method](100_000)) as h:  # (None takes the same path: tested on its own below)
        logits = model(**h.prepare(inputs)).logits
        assert h.stats.visual_tokens_kept[_stage(method)] == h.stats.visual_tokens_in
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_keep_tokens_none_keeps_everything(method):
    model, _ = tiny("tiny-random-llava")
    inputs, ref = _reference("tiny-random-llava")
    with apply_method(model, CONFIGS[method](None)) as h:
        logits = model(**h.prepare(inputs)).logits
        assert h.stats.visual_tokens_kept[_stage(method)] == [576, 576]
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("name,method", CASES)
def test_budget_honoured(name, method):
    model, _ = tiny(name)
    inputs, _ = _reference(name)
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    with apply_method(model, CONFIGS[method](BUDGET)) as h:
        run = h.prepare(inputs)
        out = model(**run, use_cache=True)
        stats = h.stats
    assert stats.visual_tokens_in == [s.visual_tokens for s in spans]
    assert stats.visual_tokens_kept[_stage(method)] == [BUDGET, BUDGET]
    text = [int(m.sum()) - s.length for m, s in zip(inputs["attention_mask"], spans, strict=True)]
    if method in INNER:
        depth = len(adapter.decoder_layers())
        assert stats.equivalent_tokens == [pytest.approx((2 * s.visual_tokens + (depth - 2) * BUDGET) / depth)
                                           for s in spans]
        assert all(len(k) == BUDGET for k in stats.full_resolution)
        lengths = [layer.keys.shape[-2] for layer in generated_cache(out).layers]
        assert lengths[:2] == [run["input_ids"].shape[1]] * 2 and max(lengths[2:]) < lengths[0]
        return
    placeholders = (run["input_ids"] == adapter.image_token_id).sum(1).tolist()
    newlines = [p - BUDGET for p in placeholders]
    if spans[0].length > spans[0].visual_tokens:  # LLaVA-NeXT: a kept high-res row brings its newline
        assert all(0 < n <= s.grids[1].rows for n, s in zip(newlines, spans, strict=True))
    else:
        assert newlines == [0, 0]
    assert run["attention_mask"].sum(1).tolist() == [t + p for t, p in zip(text, placeholders, strict=True)]


@pytest.mark.parametrize("name,method", GEN_CASES)
def test_cached_generation_matches_no_cache_greedy(name, method):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[1:], QUESTIONS[1:])
    with apply_method(model, CONFIGS[method](BUDGET)) as h:
        run = h.prepare(inputs)
        cached = greedy(model, run, STEPS, use_cache=True)
        uncached = greedy(model, h.prepare(inputs), STEPS, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert _max_diff(cached.logits, uncached.logits) < 1e-4


@pytest.mark.parametrize("name,method", GEN_CASES)
def test_batch_of_two_matches_one_by_one(name, method):
    model, proc = tiny(name)
    inputs, _ = _reference(name)
    with apply_method(model, CONFIGS[method](BUDGET)) as h:
        batch = greedy(model, h.prepare(inputs), STEPS)
        batch_kept = h.stats.full_resolution
    singles, single_kept = [], []
    for image, question in zip(IMAGES, QUESTIONS, strict=True):
        # random: each image's seed comes from its own prompt, so alone it draws the same tokens
        with apply_method(model, CONFIGS[method](BUDGET)) as h:
            singles.append(greedy(model, h.prepare(chat_inputs(proc, [image], [question])), STEPS))
            single_kept.append(h.stats.full_resolution[0])
    assert batch_kept == single_kept
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -STEPS:], single.sequences[0, -STEPS:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


def _hooks(model) -> dict[str, tuple]:
    """Every module's forward (pre-)hook ids."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


@pytest.mark.parametrize("name,method", HOOK_CASES)
def test_removal_restores_model(name, method):
    model, _ = tiny(name)
    inputs, ref = _reference(name)
    adapter = get_adapter(model)
    hooks_before = _hooks(model)
    h = apply_method(model, CONFIGS[method](BUDGET))
    pruned = model(**h.prepare(inputs)).logits
    assert pruned.shape != ref.shape or not torch.allclose(pruned, ref)  # pruning really changed the computation
    h.remove()
    h.remove()
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in adapter.decoder_layers())
    assert _hooks(model) == hooks_before  # (transformers installs output-capture hooks of its own, lazily)
    assert torch.equal(model(**inputs).logits, ref)


# -- names, configs, refusals -------------------------------------------------------------------


@pytest.mark.parametrize("name,cls,config_cls", [("pool", UniformPool, PoolConfig), ("random", RandomPrune, RandomConfig),
                                                 ("random-inner", RandomPruneInner, RandomInnerConfig),
                                                 ("visionzip", VisionZip, VisionZipConfig), ("dart", DART, DARTConfig)])
def test_selectable_by_name_and_config_round_trip(name, cls, config_cls):
    config = build_config(name, 64, shared={"layer": 3, "seed": 7})
    assert isinstance(config, config_cls) and config.keep_tokens == 64
    assert method_for(config) is cls
    assert config_cls.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        config_cls.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="keep_tokens"):
        config_cls(keep_tokens=0)
    if name.startswith("random"):
        assert config.seed == 7 and getattr(config, "layer", 3) == 3
        assert config.method_name == name
    if name == "dart":
        assert config.layer == 3


def test_bad_fields_raise():
    with pytest.raises(ValueError, match="seed"):
        RandomConfig(seed=-1)
    with pytest.raises(ValueError, match="layer"):
        RandomInnerConfig(layer=0)
    with pytest.raises(ValueError, match="contextual_ratio"):
        VisionZipConfig(contextual_ratio=1.0)
    with pytest.raises(ValueError, match="image_pivots"):
        DARTConfig(image_pivots=0)
    with pytest.raises(ValueError, match="budget"):
        DARTConfig(budget="bogus")
    with pytest.raises(ValueError, match="layer"):
        DARTConfig(layer=0)
    model, _ = tiny("tiny-random-llava")
    with pytest.raises(ValueError, match="outside the model's depth"):
        apply_method(model, DARTConfig(layer=4))


def test_visionzip_refuses_an_adapter_without_saliency():
    model, _ = tiny("tiny-random-llava")

    class NoSaliency(type(get_adapter(model))):
        encode_images_with_saliency = VLMAdapter.encode_images_with_saliency

    with pytest.raises(ValueError, match=r"\[CLS\] attention.*every adapter crop ships"):
        VisionZip(NoSaliency(model), VisionZipConfig())


# -- pool: hand-made cases ----------------------------------------------------------------------


def test_pool_layouts_meet_the_budget_exactly():
    assert band_layout(24, 24, 64) == [8] * 8
    assert band_layout(24, 24, 192) == [16] * 12
    for rows, cols in [(24, 24), (10, 13), (48, 37)]:
        for k in [k for k in (1, 7, 29, 64, 97, 191, rows * cols - 1) if k <= rows * cols]:
            layout = band_layout(rows, cols, k)
            assert sum(layout) == k and len(layout) <= rows and max(layout) <= cols
    assert split_budget([576, 768], 100) == [43, 57]
    assert split_budget([3, 3], 1) == [1, 0]


def test_pool_of_a_constant_grid_is_constant_and_blocks_are_means():
    const = torch.full((24 * 24, 5), 2.5)
    tokens, source = pool_grid_to(const, 24, 24, 29)  # a prime: ragged bands
    assert tokens.shape == (29, 5) and torch.equal(tokens, torch.full((29, 5), 2.5))
    assert torch.all(source[1:] > source[:-1])
    ramp = torch.randn(24 * 24, 3)
    tokens, source = pool_grid_to(ramp, 24, 24, 64)  # 8x8 regular grid of 3x3 blocks
    expected = F.avg_pool2d(ramp.T.reshape(1, 3, 24, 24), 3).flatten(2)[0].T  # (64, 3)
    torch.testing.assert_close(tokens, expected)
    centres = (torch.arange(8) * 3 + 1)
    assert torch.equal(source, (centres[:, None] * 24 + centres[None, :]).flatten())


def test_pool_multi_grid_splits_the_budget_and_keeps_row_newlines():
    grids = (TokenGrid(2, 2, 0, 2), TokenGrid(4, 4, 4, 5))  # base 2x2, high-res 4x4 + a newline per row
    span = ImageSpan(0, 0, 4 + 4 * 5, 2, 2, grids=grids)
    features = torch.arange(span.length, dtype=torch.float32)[:, None].repeat(1, 2)  # (24, 2)
    method = UniformPool.__new__(UniformPool)
    method.config = PoolConfig(keep_tokens=5)
    image, _ = method.compress_image(features, span, None, 0)
    # budget 5 -> 1 (base) + 4 (high-res: 2x2 blocks); bins sit at their centre tokens; rows 0 and 2 keep newlines
    assert (image.visual_tokens, image.structure) == (5, 2)
    assert image.source.tolist() == [0, 4, 6, 8, 14, 16, 18]
    assert image.tokens[:, 0].tolist() == [1.5, 7.0, 9.0, 8.0, 17.0, 19.0, 18.0]


# -- random: hand-made cases --------------------------------------------------------------------


def test_random_is_reproducible_and_differs_across_seeds():
    span = ImageSpan(0, 5, 576, 24, 24)
    a, b, c = random_keep(span, 64, 0), random_keep(span, 64, 0), random_keep(span, 64, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 64 == a.unique().numel() and torch.all(a[1:] > a[:-1])
    assert torch.equal(random_keep(span, None, 0), torch.arange(576))


def test_random_pre_and_inner_keep_the_same_tokens():
    model, _ = tiny("tiny-random-llava")
    inputs, _ = _reference("tiny-random-llava")
    kept = []
    for config_cls in (RandomConfig, RandomInnerConfig):
        with apply_method(model, config_cls(keep_tokens=50, seed=3)) as h:
            model(**h.prepare(inputs))
            kept.append(h.stats.full_resolution)
    assert kept[0] == kept[1]
    assert kept[0][0] != kept[0][1]  # each image draws with a seed from its own prompt


# -- VisionZip: hand-made cases and the captured attention --------------------------------------


def test_merge_puts_duplicates_together_and_averages():
    keys = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [2.0, 0, 0], [0, 0, 1.0], [0, 3.0, 0.1]])  # (5, 3)
    features = torch.tensor([[1.0], [10.0], [3.0], [100.0], [20.0]])  # (5, 1)
    merged, assignment = merge_into_targets(features, keys, torch.tensor([0, 1, 3]))
    assert assignment.tolist() == [0, 1, 0, 2, 1]  # token 2 duplicates token 0's key direction; 4 ~ 1
    assert merged.flatten().tolist() == [2.0, 15.0, 100.0]
    assert spread_indices(10, 3).tolist() == [0, 3, 6] and spread_indices(2, 5).tolist() == [0, 1]


def test_visionzip_keeps_the_most_attended_and_merges_duplicates():
    span = ImageSpan(0, 0, 16, 4, 4)
    features = torch.randn(16, 6)
    attention = torch.zeros(16)
    attention[[3, 9, 14]] = torch.tensor([0.5, 0.3, 0.2])  # the planted dominant tokens
    # the other 13 tokens: contextual targets every 3rd of them -> span positions 0, 4, 7, 11
    keys = torch.zeros(16, 20)
    keys[:, 3] = 1.0  # everyone leans towards the 4th target (position 11) ...
    keys[torch.arange(16), 4 + torch.arange(16)] = 1.0  # ... with a direction of its own
    for j, target in enumerate([0, 4, 7, 11]):
        keys[target] = F.one_hot(torch.tensor(j), 20).float()
    keys[1] = keys[0]  # ... except token 1, which duplicates target 0
    image, dominant = visionzip_image(span, features, attention, keys, dominant=3, contextual=4)
    assert dominant == [3, 9, 14]
    assert image.source.tolist() == [0, 3, 4, 7, 9, 11, 14] and image.visual_tokens == 7
    rows = dict(zip(image.source.tolist(), image.tokens, strict=True))
    # official merge: the target plus the mean of the tokens that joined it
    torch.testing.assert_close(rows[0], features[0] + features[1])  # the duplicate merged into its target
    for s in (3, 9, 14, 4, 7):
        assert torch.equal(rows[s], features[s])  # dominant tokens, and targets that attracted nothing
    torch.testing.assert_close(rows[11], features[11] + features[[2, 5, 6, 8, 10, 12, 13, 15]].mean(0))
    image, _ = visionzip_image(span, features, attention, keys, dominant=3, contextual=4, merge="mean")
    rows = dict(zip(image.source.tolist(), image.tokens, strict=True))
    torch.testing.assert_close(rows[0], (features[0] + features[1]) / 2)  # "mean": the group's mean
    torch.testing.assert_close(rows[11], features[[2, 5, 6, 8, 10, 11, 12, 13, 15]].mean(0))


def _check_projection(adapter, seen, inputs) -> None:
    """The captured projector inputs are in token order: projecting them gives each visual token's features."""
    for span, image in zip(adapter.image_spans(inputs), seen, strict=True):
        projected = adapter.project_features(image.pre_projector)  # (V, D)
        assert projected.shape[0] == image.saliency.shape[0] == image.keys.shape[0] == span.visual_tokens
        torch.testing.assert_close(projected, image.features[span.visual_positions()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ARCHS[:2])
def test_captured_cls_attention_matches_output_attentions(name):
    model, proc = tiny(name, "eager")
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    adapter = get_adapter(model)
    seen = adapter.encode_images_with_saliency(inputs)
    features, attention = [v.features for v in seen], [v.saliency for v in seen]
    assert all(torch.equal(a, b) for a, b in zip(features, adapter.encode_images(inputs), strict=True))
    _check_projection(adapter, seen, inputs)
    pixels = inputs["pixel_values"]
    if pixels.dim() == 5:  # LLaVA-NeXT: the valid tiles of each image, in order
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 336) for s in inputs["image_sizes"]]
        pixels = torch.cat([p[:n] for p, n in zip(pixels, counts, strict=True)])
    out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    layer = model.config.vision_feature_layer
    reference = out.attentions[layer][:, :, 0, 1:].sum(1)  # (tiles, 576)
    if name == "tiny-random-llava":
        for got, want in zip(attention, reference, strict=True):
            torch.testing.assert_close(got, want)
        assert clip_feature_layer(model.model.vision_tower, -2) is model.model.vision_tower.encoder.layers[-2]
        return
    # LLaVA-NeXT: the per-tile values are laid out exactly like the model packs its features
    projected = model.model.multi_modal_projector(out.hidden_states[layer][:, 1:])  # (tiles, 576, D)
    packed = adapter.pack_tile_values(projected, inputs["image_sizes"])
    spans = adapter.image_spans(inputs)
    for span, feats, values, got in zip(spans, features, packed, attention, strict=True):
        torch.testing.assert_close(values, feats[span.visual_positions()])
        assert got.shape == (span.visual_tokens,)
    torch.testing.assert_close(attention[0][:576], reference[0])  # the base view of image 0


def test_received_attention_by_hand():
    q = torch.zeros(5, 2, 3)  # (n, H, d) zero queries: uniform attention, each key receives 1/n per head
    k = torch.randn(5, 2, 3)
    torch.testing.assert_close(received_attention(q, k, 1.0), torch.full((5,), 2 / 5))
    q = torch.ones(5, 2, 3)
    k = torch.zeros(5, 2, 3)
    k[3] = 10.0  # every query attends to key 3 in both heads
    scores = received_attention(q, k, 1.0)
    assert scores.argmax().item() == 3 and scores[3].item() > 1.99


@pytest.mark.parametrize("name", [n for n in ARCHS if "qwen" in n])
def test_qwen_saliency_is_in_token_order(name):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    adapter = get_adapter(model)
    seen = adapter.encode_images_with_saliency(inputs)
    features, saliency, keys = [v.features for v in seen], [v.saliency for v in seen], [v.keys for v in seen]
    spans = adapter.image_spans(inputs)
    _check_projection(adapter, seen, inputs)
    assert all(torch.equal(a, b) for a, b in zip(features, adapter.encode_images(inputs), strict=True))
    assert [s.shape[0] for s in saliency] == [k.shape[0] for k in keys] == [s.visual_tokens for s in spans]
    heads = model.config.vision_config.num_heads
    assert all(s.sum().item() == pytest.approx(heads, rel=1e-4) for s in saliency)  # each image's own softmax
    # the reordering that maps block order to token order reproduces the model's own features
    visual = model.model.visual
    seen = []
    hook = visual.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        adapter.encode_images(inputs)
    finally:
        hook.remove()
    merged = visual.merger(seen[0])  # (V_all, D) in block (window) order
    reordered = to_token_order(merged, visual, inputs["image_grid_thw"], adapter.merge)
    torch.testing.assert_close(reordered, torch.cat(features))
    if "2.5" in name:
        assert not torch.allclose(merged, reordered)  # Qwen2.5-VL's windows really permute the tokens


# -- DART: hand-made cases ----------------------------------------------------------------------


def test_dart_drops_the_duplicate_of_a_pivot():
    hidden = torch.eye(6) * torch.tensor([5.0, 1, 1, 1, 1, 1])[:, None]  # token 0: the pivot (kept from the start)
    hidden[4] = hidden[0] * 0.5  # token 4 duplicates the pivot (cosine 1, smaller norm)
    taken = torch.arange(6) == 0
    assert duplication_select(hidden, hidden[:1], [4], taken).tolist() == [0, 1, 2, 3, 5]
    hidden[2] = hidden[0] * 0.3 + hidden[1] * 0.01  # near-duplicate: dropped next
    assert duplication_select(hidden, hidden[:1], [3], taken).tolist() == [0, 1, 3, 5]
    # two pivots, each with a duplicate: both duplicates go, whatever the pivot order
    h = torch.eye(8) * torch.tensor([9.0, 8, 1, 1, 1, 1, 1, 1])[:, None]
    h[6], h[7] = h[0] * 0.2, h[1] * 0.2
    taken = torch.arange(8) < 2
    for order in ([0, 1], [1, 0]):
        assert duplication_select(h, h[order], [2, 2], taken).tolist() == [0, 1, 2, 3, 4, 5]
    # a pivot outside the candidates (DART's text pivots) picks too; picks are never picked twice
    assert duplication_select(h[2:], torch.stack([h[2], h[2]]), [1, 1]).tolist() == [1, 2]
