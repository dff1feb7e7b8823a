"""crop's VisionZip against an independent re-implementation of the official LLaVA-1.5 rule.

``official`` below is rewritten from dvlab-research/VisionZip at commit
3151f6df4fca36a4cd1c985e5956e725b1f9ad02 (batched tensor path), without calling crop's code:
``visionzip/clip_encoder.py`` L42-85 (dominant selection, filtering, contextual merge, output
order), ``visionzip/main.py`` L5-7 (``dominant - 1`` patches besides [CLS]),
``visionzip/utils.py`` L10-89 and L191 (layer -2's attention and head-averaged raw keys) and
``visionzip/llava_arch.py`` L31-35 (the projector on all kept tokens). It runs on a seeded random
model with LLaVA-1.5 geometry (336 px / 14 px: 576 patches + [CLS]), eager attention, attention
and hidden states from ``output_attentions`` / ``output_hidden_states``, keys from a hook.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.embedded import build_from_shape
from crop.methods.visionzip import VisionZipConfig
from crop.models import get_adapter
from tests.conftest import chat_inputs, random_image

IMAGES = [random_image(31, (400, 300)), random_image(32, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
SPLITS = [(64, 54, 10), (128, 108, 20), (192, 162, 30)]  # keep_tokens, dominant (with [CLS]), contextual


def official(attn, hidden, metric, dominant, contextual):
    """The official selection + merge (clip_encoder.py L49-83, dominant_num = dominant - 1 as in main.py L7).

    Args:
        attn: ``(B, H, N, N)`` layer -2 attention; hidden: ``(B, N, P)`` ``hidden_states[-2]``;
        metric: ``(B, N, d)`` layer -2 keys averaged over heads. ``N = 577`` ([CLS] first).

    Returns:
        ``(all_indices (B, dominant), tokens (B, dominant + contextual, P))``, before the projector.
    """
    b, n, p = hidden.shape
    topk = attn[:, :, 0, 1:].sum(dim=1).topk(dominant - 1, dim=1).indices + 1  # (B, dominant - 1)
    all_indices = torch.cat([torch.zeros(b, 1, dtype=topk.dtype), topk], dim=1)  # [CLS] first
    mask = torch.ones(b, n, dtype=torch.bool).scatter_(1, all_indices, False)  # True: not dominant
    dominant_tokens = hidden.masked_select(~mask[..., None]).view(b, dominant, p)  # position order
    m = metric[mask].view(b, n - dominant, -1)
    h = hidden.masked_select(mask[..., None]).view(b, n - dominant, p)
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[1] // contextual)
    targets = torch.arange(0, m.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(m.shape[1]), targets)
    similarity = torch.bmm(m[:, others], m[:, targets].transpose(1, 2))  # (B, n_others, C)
    one_hot = torch.zeros(b, int(others.sum()), contextual).scatter_(2, similarity.argmax(dim=2)[..., None], 1)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]  # (B, C, 1)
    contextual_tokens = h[:, targets] + torch.bmm(one_hot.transpose(1, 2), h[:, others]) / counts
    return all_indices, torch.cat([dominant_tokens, contextual_tokens], dim=1)


@pytest.fixture(scope="module")
def setup():
    with torch.no_grad():
        torch.manual_seed(0)
        model, proc = build_from_shape("llava", {"vision_layers": 3}, attn_implementation="eager")  # -2: a middle layer
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        tower = model.model.vision_tower
        keys = []
        hook = tower.encoder.layers[-2].self_attn.k_proj.register_forward_hook(
            lambda m, i, out: keys.append(out))
        try:
            out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        finally:
            hook.remove()
        b, n, _ = keys[0].shape
        metric = keys[0].view(b, n, model.config.vision_config.num_attention_heads, -1).mean(2)  # utils.py L24, L89
        return model, inputs, out.attentions[-2], out.hidden_states[-2], metric


def _llm_image_rows(model, config, inputs):
    """Prepare with ``config`` and run the LLM: (the image rows of its input embeddings per sample, stats, run)."""
    embeds = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: embeds.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with apply_method(model, config) as h:
            run = h.prepare(inputs)
            model(**run)
            stats = h.stats
    finally:
        hook.remove()
    image_id = model.config.image_token_id
    return [embeds[0][i][run["input_ids"][i] == image_id] for i in range(len(IMAGES))], stats, run


def test_adapter_hands_over_the_cls_features(setup):
    model, inputs, _, hidden, _ = setup
    seen = get_adapter(model).encode_images_with_saliency(inputs)
    for i, image in enumerate(seen):
        torch.testing.assert_close(image.cls_pre_projector, hidden[i, 0])
        torch.testing.assert_close(image.pre_projector, hidden[i, 1:])


@pytest.mark.parametrize("budget,dominant,contextual", SPLITS)
def test_matches_the_official_llava_rule(setup, budget, dominant, contextual):
    model, inputs, attn, hidden, metric = setup
    config = VisionZipConfig(keep_tokens=budget)
    assert config.split(budget) == (dominant, contextual)
    indices, kept = official(attn, hidden, metric, dominant, contextual)
    want = model.model.multi_modal_projector(kept)  # llava_arch.py L33: (B, dominant + contextual, D)
    rows, stats, run = _llm_image_rows(model, config, inputs)
    assert "position_ids" not in run  # consecutive positions, as in the official prompt
    assert stats.visual_tokens_kept["llm_input"] == [budget, budget]
    for i, got in enumerate(rows):
        assert (indices[i, 0] == 0).item()
        assert sorted(stats.full_resolution[i]) == sorted((indices[i, 1:] - 1).tolist())  # the same patches
        torch.testing.assert_close(got[0], model.model.multi_modal_projector(hidden[i, 0]))  # [CLS] first
        # [CLS], dominant patches (position order), contextual tokens (target order), all equal
        torch.testing.assert_close(got, want[i], atol=1e-5, rtol=1e-5)


def test_earlier_variant_stays_available(setup):
    model, inputs, _, _, _ = setup
    config = VisionZipConfig(keep_tokens=64, keep_cls=False, merge="mean", order="image")
    rows, stats, _ = _llm_image_rows(model, config, inputs)
    assert [len(k) for k in stats.full_resolution] == [54, 54] and [len(r) for r in rows] == [64, 64]
    assert VisionZipConfig.from_dict(config.to_dict()) == config
    for field, value in (("merge", "sum"), ("order", "cls"), ("keep_cls", 1)):
        with pytest.raises(ValueError, match=field):
            VisionZipConfig(**{field: value})
