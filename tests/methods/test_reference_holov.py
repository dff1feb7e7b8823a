"""crop's HoloV against an independent re-implementation of the official LLaVA-1.5 rule.

``official`` below is rewritten from obananas/HoloV at commit
1d2e65e961e698ff0e7d5bb4625489177dd9deba, without calling crop's code, in the official code's own
per-crop loops: ``llava/model/utils.py`` L22-151 (crops, scores, allocation, top-k, zero padding),
``llava/model/llava_arch.py`` L141-145 and L239 (head-mean [CLS] attention, projected features,
16 crops) and ``llava/model/multimodal_encoder/clip_encoder.py`` L35-46 (layer -2's [CLS] row over
the patches). It runs on a seeded random model with LLaVA-1.5 geometry (336 px / 14 px: 576
patches + [CLS]), eager attention, attention and hidden states from ``output_attentions`` /
``output_hidden_states``, on a batch of two images.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.embedded import build_from_shape
from crop.methods import build_config, config_from_dict
from crop.methods.holov import PAD_SOURCE, HoloV, HoloVConfig, holov_select
from crop.models import get_adapter
from tests.conftest import ARCHS, chat_inputs, random_image, tiny

IMAGES = [random_image(61, (400, 300)), random_image(62, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
V = 576


def official(tokens, attention, crops, keep, alpha=0.09, eps=1e-6):
    """One image's HoloV, as ``utils.py`` L28-148 loops: ``(kept token index or -1 per output slot)`` in output order.

    Args:
        tokens: ``(N, D)`` projected features; attention: ``(N,)`` [CLS] attention (head mean).
    """
    n = tokens.shape[0]
    size, extra = n // crops, n % crops
    bounds, start = [], 0
    for p in range(crops):  # L41-50: the first ``extra`` crops one longer, empty ones skipped
        length = size + (1 if p < extra else 0)
        if length > 0:
            bounds.append((start, start + length))
        start += length
    scores = []
    for lo, hi in bounds:  # L56-97
        x, a = tokens[lo:hi].float(), attention[lo:hi].float()
        m = hi - lo
        if m <= 1:
            scores.append(a.mean())
            continue
        f = x / (x.norm(dim=1, keepdim=True) + eps)
        s = (f @ f.T) * (1 - torch.eye(m))
        mean = s.sum(dim=1) / (m - 1)
        var = ((s - mean[:, None]) ** 2).sum(dim=1) / (m - 1)
        a = a * 1e3
        var = var * (a.abs().mean() / (var.abs().mean() + eps))
        scores.append((a + alpha * var).mean())
    w = torch.stack(scores) / (torch.stack(scores).sum() + eps)  # L104-112
    alloc = (w * keep).floor().long()
    remaining = keep - int(alloc.sum())
    if remaining > 0:
        for i in torch.sort(w, descending=True, stable=True).indices[:remaining]:
            alloc[i] += 1
    out = []
    for (lo, hi), k in zip(bounds, alloc.tolist(), strict=True):  # L115-127
        if k <= 0:
            continue
        if k >= hi - lo:
            out += list(range(lo, hi))
        else:
            top = torch.sort(attention[lo:hi].float(), descending=True, stable=True).indices[:k]
            out += [lo + int(i) for i in top]
    return out + [-1] * (keep - len(out))  # L138-143: zero padding


@pytest.fixture(scope="module")
def setup():
    with torch.no_grad():
        torch.manual_seed(0)
        model, proc = build_from_shape("llava", {"vision_layers": 3}, attn_implementation="eager")  # -2: a middle layer
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        attention = out.attentions[-2][:, :, 0, 1:].mean(dim=1)  # clip_encoder.py L40 + llava_arch.py L143: (B, 576)
        tokens = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])  # llava_arch.py L144: (B, 576, D)
        assert tokens.shape[1] == V
        return model, inputs, attention, tokens


def _llm_image_rows(model, config, inputs):
    """Prepare with ``config`` and run the LLM: (the image rows of its input embeddings per sample, stats, run)."""
    embeds = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: embeds.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), apply_method(model, config) as h:
            run = h.prepare(inputs)
            model(**run)
            stats = h.stats
    finally:
        hook.remove()
    image_id = model.config.image_token_id
    return [embeds[0][i][run["input_ids"][i] == image_id] for i in range(len(IMAGES))], stats, run


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_matches_the_official_llava_rule(setup, budget):
    model, inputs, attention, tokens = setup
    rows, stats, run = _llm_image_rows(model, HoloVConfig(keep_tokens=budget), inputs)
    assert "position_ids" not in run  # consecutive positions, as in the official prompt
    assert stats.visual_tokens_kept["llm_input"] == [budget, budget]
    for i, got in enumerate(rows):
        want = official(tokens[i], attention[i], 16, budget)
        assert sorted(stats.full_resolution[i]) == sorted(p for p in want if p >= 0)  # the same kept set
        index = torch.tensor(want)
        expected = torch.where((index >= 0)[:, None], tokens[i][index.clamp(min=0)], 0)  # official order, zeros last
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget,crops", [(64, 16), (128, 8), (192, 5)])
def test_the_qwen_scripts_crop_count(setup, budget, crops):
    model, inputs, attention, tokens = setup
    config = HoloVConfig(keep_tokens=budget, regions=None)
    assert config.crops(V, budget) == crops  # modeling_qwen2_5_vl.py L1915-1916
    _, stats, _ = _llm_image_rows(model, config, inputs)
    for i in range(len(IMAGES)):
        assert stats.full_resolution[i] == sorted(p for p in official(tokens[i], attention[i], crops, budget) if p >= 0)


@pytest.mark.parametrize("crops,keep", [(16, 64), (16, 192), (5, 100), (50, 7), (400, 30), (576, 64)])
def test_overflow_and_odd_splits_match_the_official_loops(crops, keep):
    """One crop hoarding the attention (its budget overflows: zero padding), uneven and one-token crops."""
    torch.manual_seed(crops + keep)
    tokens, attention = torch.randn(V, 24), torch.rand(V) / V
    attention[40:60] *= 300  # a crop far above the rest
    want = official(tokens, attention, crops, keep)
    assert holov_select(tokens, attention, keep, crops).tolist() == want
    filled = holov_select(tokens, attention, keep, crops, overflow="fill").tolist()
    real = [p for p in want if p >= 0]
    assert filled[:len(real)] == real and -1 not in filled and len(set(filled)) == keep
    rest = torch.sort(attention.masked_fill(torch.isin(torch.arange(V), torch.tensor(real)), -1),
                      descending=True, stable=True).indices
    assert filled[len(real):] == rest[:keep - len(real)].tolist()  # the most attended tokens left


def test_padding_and_image_order_options(setup):
    model, inputs, attention, tokens = setup
    budget = 64
    saturated = attention.clone()
    saturated[:, 100:120] *= 1e4  # one crop would take nearly everything: most of its budget is lost
    padded = [official(tokens[i], saturated[i], 16, budget) for i in range(len(IMAGES))]
    assert all(p[-1] == -1 for p in padded)
    picked = [holov_select(tokens[i], saturated[i], budget, 16).tolist() for i in range(len(IMAGES))]
    assert picked == padded
    rows, stats, _ = _llm_image_rows(model, HoloVConfig(keep_tokens=budget, order="image"), inputs)
    for i, got in enumerate(rows):
        assert stats.full_resolution[i] == sorted(stats.full_resolution[i])
        torch.testing.assert_close(got[:len(stats.full_resolution[i])], tokens[i][stats.full_resolution[i]],
                                   atol=1e-5, rtol=1e-5)  # image order
        assert len(got) == budget


def test_config_options_and_bad_values():
    config = build_config("holov", 128, ["regions=none", "overflow=fill", "order=image", "alpha=0.2"])
    assert (config.regions, config.overflow, config.order, config.alpha) == (None, "fill", "image", 0.2)
    assert config_from_dict(config.to_dict()) == config
    assert HoloVConfig().crops(V, 64) == 16 and HoloVConfig(regions=1000).crops(V, 64) == V
    for field, value in (("regions", 0), ("regions", True), ("regions", 2.0), ("alpha", -0.1),
                         ("alpha", float("nan")), ("alpha", "0.1"), ("overflow", "drop"), ("order", "cls"),
                         ("keep_tokens", 0)):
        with pytest.raises(ValueError, match=field):
            HoloVConfig(**{field: value})
    with pytest.raises(ValueError, match="keep"):
        holov_select(torch.randn(10, 4), torch.rand(10), 10, 2)
    with pytest.raises(ValueError, match="overflow"):
        holov_select(torch.randn(10, 4), torch.rand(10), 5, 2, overflow="drop")


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("overflow", ["pad", "fill"])
def test_every_architecture_meets_the_budget_and_pads_only_where_tokens_are_free(name, overflow):
    """One crop hoarding the attention: LLaVA-1.5 pads with zero tokens (official), fixed layouts fill instead."""
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    adapter = get_adapter(model)
    method = HoloV(adapter, HoloVConfig(keep_tokens=1, overflow=overflow))
    free = name == "tiny-random-llava"
    try:
        for i, (span, encoded) in enumerate(zip(adapter.image_spans(inputs), method.encode(inputs), strict=True)):
            budget = span.visual_tokens // 3
            method.config = HoloVConfig(keep_tokens=budget, overflow=overflow)
            encoded.saliency = torch.ones_like(encoded.saliency)
            encoded.saliency[:span.visual_tokens // 16] = 1e6  # the first crop takes nearly all the budget
            image, kept = method.compress_image(encoded, span, None, i)
            real = image.source[image.source != PAD_SOURCE]
            assert image.visual_tokens == budget  # padding counts: it reaches the LLM
            assert sorted(real.tolist()) == kept and len(set(kept)) == len(kept)
            padded = budget - len(kept)
            assert (padded > 0) == (free and overflow == "pad")
            if padded:
                assert image.source[-padded:].eq(PAD_SOURCE).all() and image.tokens[-padded:].eq(0).all()
                assert image.mixing is not None and image.mixing()[-padded:].eq(0).all()
            else:  # the hoarding crop kept whole, the rest by attention
                assert set(span.visual_positions()[:span.visual_tokens // 16].tolist()) <= set(kept)
    finally:
        adapter.release_encoded()


def test_refuses_an_adapter_without_saliency():
    from crop.models.base import VLMAdapter

    model, _ = tiny("tiny-random-llava")

    class NoSaliency(type(get_adapter(model))):
        encode_images_with_saliency = VLMAdapter.encode_images_with_saliency

    with pytest.raises(ValueError, match=r"holov needs the vision tower's \[CLS\] attention"):
        HoloV(NoSaliency(model), HoloVConfig())
