"""LLaVA-OneVision: AnyRes-Max geometry, region -> tokens on the base view and the tiles, newlines, CROP ILP/PLC.

On ``tiny-random-llava-onevision`` (stock geometry: SigLIP 384 px / 14 px = 27 x 27 tokens per tile, the
stock pinpoints, ``anyres_max_9``; tiny widths, random weights). The registry-wide matrix (every method,
attention recompute, devices, ...) picks the model up from ``tests.conftest.ARCHS``; this file checks what
is OneVision's own.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_crop
from crop.config import CropILPConfig, CropPLCConfig
from crop.hf_compat import generated_cache
from crop.models import get_adapter
from crop.models.llava_onevision import LlavaOnevisionAdapter, anyres_max_shape
from crop.models.tiny_llava_onevision import build_tiny_llava_onevision
from crop.ops.pooling import count_pooled
from crop.regions import GridBox
from tests.conftest import chat_inputs, greedy, random_image, tiny

NAME = "tiny-random-llava-onevision"
IMAGES = [random_image(21, (400, 300)), random_image(22, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
BOXES = [GridBox(0, 0, 3, 7), GridBox(3, 1, 7, 6)]
STEPS = 2
BASE = 27 * 27

_REFS: dict[str, tuple] = {}


def _reference():
    """Stock inputs and forward logits of the two-image batch (one per prompt, different tile layouts)."""
    if "batch" not in _REFS:
        model, proc = tiny(NAME)
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        _REFS["batch"] = (inputs, model(**inputs).logits)
    return _REFS["batch"]


def test_adapter_is_chosen_by_model_type():
    model, _ = tiny(NAME)
    assert isinstance(get_adapter(model), LlavaOnevisionAdapter)


def test_spans_match_the_packed_features_and_newlines_hold_image_newline():
    model, _ = tiny(NAME)
    inputs = _reference()[0]
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    # 400x300: 1x2 tiles -> 27x54, unpadded to 27x36; 336x500: 2x1 tiles -> 54x27, unpadded to 40x27
    assert [(s.grids[1].rows, s.grids[1].cols, s.grids[1].stride) for s in spans] == [(27, 36, 37), (40, 27, 28)]
    assert [s.length for s in spans] == [BASE + 27 * 37, BASE + 40 * 28]
    assert [s.visual_tokens for s in spans] == [BASE + 27 * 36, BASE + 40 * 27]
    features = adapter.encode_images(inputs)
    newline = model.model.image_newline
    for span, feats in zip(spans, features, strict=True):
        assert feats.shape[0] == span.length
        structure = span.structure_positions(span.visual_positions())  # every row's newline
        assert structure.numel() == span.grids[1].rows
        assert torch.equal(feats[structure], newline.expand(structure.numel(), -1))
        rest = torch.ones(span.length, dtype=torch.bool)
        rest[structure] = False
        assert not (feats[rest] == newline).all(-1).any()


@pytest.mark.parametrize("size,tiles,downsampled", [((1600, 1500), (4, 5), (78, 83)), ((2000, 700), (2, 6), (47, 136))])
def test_anyres_max_downsampling_is_the_models(size, tiles, downsampled):
    """Images above ~9 tiles' worth of tokens get the model's bilinear downsampling; the spans follow it."""
    model, proc = tiny(NAME)
    adapter = get_adapter(model)
    inputs = proc(images=[random_image(3, size)], text=["<image>\nq"], return_tensors="pt")
    tiles_high, tiles_wide, rows, cols = adapter.tile_layout(tuple(inputs["image_sizes"][0].tolist()))
    assert (tiles_high, tiles_wide) == tiles and rows * cols > 9 * BASE * 1.21
    span = adapter.image_spans(inputs)[0]
    assert (span.grids[1].rows, span.grids[1].cols) == downsampled == anyres_max_shape(rows, cols, 27, 9)
    encoded = adapter.encode_images_with_saliency(inputs)[0]
    assert encoded.features.shape[0] == span.length == int((inputs["input_ids"] == adapter.image_token_id).sum())
    assert encoded.saliency.shape == (span.visual_tokens,) and encoded.keys.shape[0] == span.visual_tokens
    box = GridBox(0, 0, 3, 3)
    chosen = adapter.select(span, box, None)
    high = span.grids[1]
    assert int((chosen >= BASE).sum()) == int(box.token_mask(high.rows, high.cols).sum())


def test_saliency_is_received_attention_laid_out_like_the_features():
    model, _ = tiny(NAME)
    inputs = chat_inputs(tiny(NAME)[1], IMAGES[:1], QUESTIONS[:1])
    adapter = get_adapter(model)
    span = adapter.image_spans(inputs)[0]
    encoded = adapter.encode_images_with_saliency(inputs)[0]
    assert encoded.cls_pre_projector is None  # SigLIP has no [CLS]
    assert encoded.saliency.shape == (span.visual_tokens,)
    # received attention sums to the head count over each tile's patches; the base view is one whole tile
    assert torch.allclose(encoded.saliency[:BASE].sum(), torch.tensor(4.0), atol=1e-4)
    projected = adapter.project_features(encoded.pre_projector)  # no downsampling here: exact
    assert torch.allclose(projected, encoded.features[span.visual_positions()], atol=1e-5)


@pytest.mark.parametrize("method", ["ilp", "plc"])
def test_keep_all_is_bit_identical(method):
    model, _ = tiny(NAME)
    inputs, ref_logits = _reference()
    config = CropILPConfig() if method == "ilp" else CropPLCConfig()
    with apply_crop(model, config) as crop:
        logits = model(**crop.prepare(inputs, [None, GridBox.full()])).logits
        assert crop.stats.visual_tokens_kept["llm_input"] == crop.stats.visual_tokens_in
    assert (logits - ref_logits).abs().max().item() == 0.0
    assert torch.equal(model(**inputs).logits, ref_logits)  # removed: the stock model again


def test_ilp_keeps_the_box_on_base_view_and_tiles_with_its_newlines():
    model, proc = tiny(NAME)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    adapter = get_adapter(model)
    span = adapter.image_spans(inputs)[0]
    box = GridBox(0, 0, 3, 7)  # the left half of a 400x300 image
    chosen = adapter.select(span, box, None)
    in_base, in_high = chosen[chosen < BASE], chosen[chosen >= BASE]
    assert in_base.numel() == int(box.token_mask(27, 27).sum())
    assert in_high.numel() == 27 * 18  # 36 columns: the left 18 of every row
    assert ((in_high - BASE) % 37 < 18).all()  # never a newline
    assert span.structure_positions(chosen).tolist() == [BASE + r * 37 + 36 for r in range(27)]
    prompt_len = inputs["input_ids"].shape[1]
    with apply_crop(model, CropILPConfig(layer=2)) as crop:
        out = model(**crop.prepare(inputs, [box]), use_cache=True)
        kept = crop.stats.visual_tokens_kept["after_layer_2"]
    assert kept == [chosen.numel()]
    survivors = prompt_len - span.length + chosen.numel() + 27  # + the 27 newlines of the kept rows
    assert [layer.keys.shape[-2] for layer in generated_cache(out).layers] == [prompt_len] * 2 + [survivors] * 2


def test_ilp_budget_is_one_over_both_grids():
    model, proc = tiny(NAME)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    adapter = get_adapter(model)
    span = adapter.image_spans(inputs)[0]
    chosen = adapter.select(span, GridBox(2, 2, 3, 3), 100)
    assert chosen.numel() == 100
    assert 0 < int((chosen < BASE).sum()) < 100  # the region keeps its share of each view


def test_plc_rebuilds_the_prompt_with_region_pooled_rest_and_newlines():
    model, proc = tiny(NAME)
    inputs = _reference()[0]
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    expected = []
    for span, box in zip(spans, BOXES, strict=True):
        total = 0
        for grid in span.token_grids:  # each grid pooled on its own
            region = box.token_indices(grid.rows, grid.cols)
            total += region.numel() + count_pooled(grid.rows, grid.cols, region, 4)
        expected.append(total)
    with apply_crop(model, CropPLCConfig(pool=4)) as crop:
        run = crop.prepare(inputs, BOXES)
        assert crop.stats.visual_tokens_kept["llm_input"] == expected
        out = model(**run, use_cache=True)
    placeholders = (run["input_ids"] == adapter.image_token_id).sum(1).tolist()
    newlines = [p - e for p, e in zip(placeholders, expected, strict=True)]
    assert all(0 < n <= s.grids[1].rows for n, s in zip(newlines, spans, strict=True))
    features = run["mm_encoder_outputs"]["image"].pooler_output
    for feats, n in zip(features, newlines, strict=True):  # the newlines reach the LM as image_newline
        assert int((feats == model.model.image_newline).all(-1).sum()) == n
    assert {layer.keys.shape[-2] for layer in generated_cache(out).layers} == {run["input_ids"].shape[1]}


@pytest.mark.parametrize("method", ["ilp", "plc"])
def test_batch_equals_one_by_one(method):
    model, proc = tiny(NAME)
    inputs = _reference()[0]
    config = CropILPConfig(keep_tokens=64) if method == "ilp" else CropPLCConfig(keep_tokens=300)
    with apply_crop(model, config) as crop:
        batch = greedy(model, crop.prepare(inputs, BOXES), STEPS)
        singles = [greedy(model, crop.prepare(chat_inputs(proc, [im], [q]), [b]), STEPS)
                   for im, q, b in zip(IMAGES, QUESTIONS, BOXES, strict=True)]
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -STEPS:], single.sequences[0, -STEPS:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ilp", "plc"])
def test_cached_decode_equals_uncached(method):
    model, proc = tiny(NAME)
    inputs = chat_inputs(proc, IMAGES[1:], QUESTIONS[1:])
    config = CropILPConfig(keep_tokens=64) if method == "ilp" else CropPLCConfig()
    with apply_crop(model, config) as crop:
        run = crop.prepare(inputs, [GridBox(0, 4, 3, 7)])
        cached = greedy(model, run, STEPS, use_cache=True)
        uncached = greedy(model, run, STEPS, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, uncached.logits, strict=True)) < 1e-4


def test_overlay_panels_show_base_view_and_tiles():
    model, proc = tiny(NAME)
    adapter = get_adapter(model)
    base, tiles = adapter.overlay_panels(random_image(1, (640, 320)), proc.image_processor, (27, 27))
    assert (base.grid.rows, base.grid.cols) == (27, 27) and base.tile is None
    assert (tiles.grid.rows, tiles.grid.cols) == (27, 54) and tiles.tile == (27, 27)  # 1x2 tiles, no padding cut
    assert tiles.picture.size == (640, 320)
    _, small = adapter.overlay_panels(random_image(1, (1600, 1500)), proc.image_processor, (27, 27))
    assert (small.grid.rows, small.grid.cols) == (78, 83) and small.tile is None  # downsampled: no tile lines
    assert "anyres_max_9" in small.title


def test_multi_image_prompts_and_other_strategies_are_refused():
    model, proc = tiny(NAME)
    adapter = get_adapter(model)
    inputs = dict(_reference()[0], batch_num_images=torch.tensor([2]))
    with pytest.raises(ValueError, match="multi-image"):
        adapter.image_spans(inputs)
    other, _ = build_tiny_llava_onevision()
    other.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="'full'"):
        LlavaOnevisionAdapter(other)


def test_hub_layout_checkpoint_loads_image_only(tmp_path):
    """A checkpoint saved in the hub layout (stock class names) loads through ``load_model`` without torchvision
    (the image-only processor fallback of :mod:`crop.models.processors`) and answers identically."""
    from crop.models.loading import load_model
    from crop.models.processors import save_hub_layout

    model, proc = tiny(NAME)
    model.save_pretrained(tmp_path)
    save_hub_layout(proc, tmp_path, "LlavaOnevisionProcessor", {"num_image_tokens": BASE, "vision_aspect_ratio":
                                                                "anyres_max_9", "vision_feature_select_strategy": "full"})
    loaded, loaded_proc = load_model(str(tmp_path))
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    again = chat_inputs(loaded_proc, IMAGES[:1], QUESTIONS[:1])
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    with apply_crop(loaded, CropILPConfig(keep_tokens=64)) as crop:
        pruned = loaded(**crop.prepare(again, [BOXES[0]])).logits
    with apply_crop(model, CropILPConfig(keep_tokens=64)) as crop:
        assert torch.equal(model(**crop.prepare(inputs, [BOXES[0]])).logits, pruned)


def test_received_attention_matches_the_towers_own_eager_attention():
    """The saliency recomputed from the captured q/k equals what SigLIP's eager attention returns."""
    import copy

    from transformers import SiglipVisionModel

    from crop.models.clip_attention import clip_feature_layer
    from crop.models.siglip_attention import capture_received_attention

    model, proc = tiny(NAME)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    adapter = get_adapter(model)
    tower = model.model.vision_tower
    layer = clip_feature_layer(tower, model.config.vision_feature_layer)
    _, scores, keys, _ = capture_received_attention(layer, model.model.multi_modal_projector,
                                                    lambda: adapter.encode_images(inputs))
    config = copy.deepcopy(model.config.vision_config)
    config._attn_implementation = "eager"
    eager = SiglipVisionModel(config).eval()
    eager.load_state_dict(tower.state_dict())
    pixels = inputs["pixel_values"][0, :scores.shape[0]]  # (T, 3, 384, 384) the tiles the tower saw
    attention = eager(pixel_values=pixels, output_attentions=True).attentions[-1]  # (T, H, N, N)
    torch.testing.assert_close(scores, attention.mean(dim=2).sum(dim=1), atol=1e-5, rtol=1e-4)
    assert keys.shape == (scores.shape[0], 27 * 27, 32 // 4)


def test_vision_flops_count_one_siglip_pass_per_tile():
    from crop.eval.flops import vision_flops, vit_flops

    model, _ = tiny(NAME)
    span = get_adapter(model).image_spans(_reference()[0])[0]  # 400x300: base view + 1x2 tiles
    per_tile = vit_flops(BASE, 32, 64, 2, 3 * 14 * 14)
    projector = 2 * 3 * BASE * (32 * 64 + 64 * 64)
    assert vision_flops(model.config, span.visual_tokens) == 3 * per_tile + projector
