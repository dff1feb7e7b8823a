"""InternVL (dynamic tiles + thumbnail, pixel shuffle): the region maps onto both views, CROP keeps its invariants."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_crop
from crop.config import CropILPConfig, CropPLCConfig
from crop.hf_compat import generated_cache
from crop.models import get_adapter
from crop.models.base import TokenGrid
from crop.models.internvl import TiledTokenGrid, layout_from_pixels, layout_from_size
from crop.models.tiny_internvl import InternVLShape, internvl_processor
from crop.ops.pooling import count_pooled
from crop.regions import GridBox
from tests.conftest import chat_inputs, greedy, random_image, tiny

NAME = "tiny-random-internvl"
IMAGES = [random_image(21, (400, 300)), random_image(22, (336, 500))]  # 2x3 and 3x2 tiles (+ thumbnail)
QUESTIONS = ["What color is the star?", "How many circles are there?"]
BOXES = [GridBox(0, 0, 2, 2), GridBox(3, 1, 7, 6)]
STEPS = 3
# PLC's budget must hold the pooled context: 7 tiles' 4x4-pooled grids are 8x12 + 4x4 = 112 tokens
_BUDGET = {CropILPConfig: 96, CropPLCConfig: 160}


def _processor():
    """The tiny model's processor allowing 1 to 6 tiles (the model's own: 2 to 4), so both images get 6 + thumbnail."""
    if not _PROC:
        _PROC.append(internvl_processor(InternVLShape(min_tiles=1, max_tiles=6)))
    return _PROC[0]


_PROC: list = []


def _inputs(images=IMAGES, questions=QUESTIONS):
    return chat_inputs(_processor(), images, questions)


def _expected_region(span, box: GridBox) -> torch.Tensor:
    """Span positions of ``box`` on the stitched tiles and the thumbnail, computed independently of the adapter."""
    tiled, thumb = span.grids
    side = 16
    wide = tiled.cols // side
    out = []
    for r, c in box.token_mask(tiled.rows, tiled.cols).nonzero().tolist():  # cells of the stitched grid
        tile = (r // side) * wide + c // side
        out.append(tile * side * side + (r % side) * side + c % side)
    for r, c in box.token_mask(thumb.rows, thumb.cols).nonzero().tolist():  # the thumbnail, after the tiles
        out.append(thumb.offset + r * side + c)
    return torch.tensor(sorted(out))


def test_layout_tiles_then_thumbnail():
    model, _ = tiny(NAME)
    inputs = _inputs()
    spans = get_adapter(model).image_spans(inputs)
    assert [s.length for s in spans] == [7 * 256, 7 * 256]
    assert [(s.grids[0].rows, s.grids[0].cols) for s in spans] == [(32, 48), (48, 32)]
    assert all((g.rows, g.cols, g.offset) == (16, 16, 6 * 256) for g in (s.grids[1] for s in spans))
    # the placeholder run sits between <img> and </img>
    tok = tiny(NAME)[1].tokenizer
    for s in spans:
        row = inputs["input_ids"][s.sample]
        assert row[s.start - 1] == tok.convert_tokens_to_ids("<img>")
        assert row[s.start + s.length] == tok.convert_tokens_to_ids("</img>")
    # the arrangement read from the pixels is the processor's own choice for the image size
    pixels = inputs["pixel_values"]
    for k, image in enumerate(IMAGES):
        assert layout_from_pixels(pixels[7 * k:7 * k + 7], 6) == layout_from_size(image.size[::-1], 6, 448)
    sized = dict(inputs, image_sizes=torch.tensor([im.size[::-1] for im in IMAGES]))
    assert get_adapter(model).image_spans(sized) == spans


def test_tiled_grid_positions_and_local_round_trip():
    grid = TiledTokenGrid(32, 48, offset=5, tile=16)
    positions = grid.positions()
    assert sorted(positions.tolist()) == list(range(5, 5 + 32 * 48))
    assert positions[:3].tolist() == [5, 6, 7] and positions[16].item() == 5 + 256  # row 0 enters tile 1
    assert positions[48].item() == 5 + 16  # row 1 of tile 0
    assert torch.equal(grid.local(positions), torch.arange(32 * 48))
    assert grid.local(torch.tensor([0, 4, 5 + 32 * 48])).numel() == 0  # outside the grid


def test_the_models_own_processor_gives_one_tile_or_tiles_plus_thumbnail():
    model, proc = tiny(NAME)  # up to 4 tiles: 400x300 -> one tile; 336x500 -> 2 high x 1 wide + thumbnail
    adapter = get_adapter(model)
    one, two = adapter.image_spans(chat_inputs(proc, IMAGES, QUESTIONS))
    assert (one.length, one.rows, one.cols, one.grids) == (256, 16, 16, ())  # one tile, no thumbnail: a plain grid
    assert two.length == 3 * 256 and [(g.rows, g.cols) for g in two.grids] == [(32, 16), (16, 16)]
    assert adapter.overlay_panels(random_image(3, (448, 448)), None, (16, 16))[0].grid == TokenGrid(16, 16)


@pytest.mark.parametrize("config", [CropILPConfig, CropPLCConfig])
def test_keep_all_is_bit_identical(config):
    model, _ = tiny(NAME)
    inputs = _inputs()
    ref_logits = model(**inputs).logits
    ref = greedy(model, inputs, STEPS)
    with apply_crop(model, config()) as crop:
        logits = model(**crop.prepare(inputs, [None, None])).logits
        out = greedy(model, crop.prepare(inputs, [GridBox.full(), None]), STEPS)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
    assert torch.equal(model(**inputs).logits, ref_logits)  # removed: the stock model again


def test_ilp_keeps_the_box_on_tiles_and_thumbnail():
    model, _ = tiny(NAME)
    inputs = _inputs()
    prompt_len = inputs["input_ids"].shape[1]
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    with apply_crop(model, CropILPConfig(layer=2)) as crop:
        out = model(**crop.prepare(inputs, BOXES), use_cache=True)
        stats = crop.stats
    for i, (span, box) in enumerate(zip(spans, BOXES, strict=True)):
        expected = _expected_region(span, box)
        assert torch.equal(adapter.select(span, box, None), expected)
        assert stats.full_resolution[i] == expected.tolist()
        assert (expected < span.grids[1].offset).any() and (expected >= span.grids[1].offset).any()
    kept = stats.visual_tokens_kept["after_layer_2"]
    assert kept == [len(_expected_region(s, b)) for s, b in zip(spans, BOXES, strict=True)]
    lengths = [layer.keys.shape[-2] for layer in generated_cache(out).layers]
    survivors = prompt_len - min(s.length - k for s, k in zip(spans, kept, strict=True))  # ragged: padded to the longest
    assert lengths[:2] == [prompt_len, prompt_len] and lengths[2:] == [survivors, survivors]


def test_plc_keeps_the_box_and_pools_the_rest_per_grid():
    model, _ = tiny(NAME)
    inputs = _inputs()
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    with apply_crop(model, CropPLCConfig(pool=4)) as crop:
        run = crop.prepare(inputs, BOXES)
        stats = crop.stats
        logits = model(**run).logits
    assert torch.isfinite(logits).all()
    for i, (span, box) in enumerate(zip(spans, BOXES, strict=True)):
        region = _expected_region(span, box)
        assert stats.full_resolution[i] == region.tolist()
        pooled = sum(count_pooled(g.rows, g.cols, g.local(region), 4) for g in span.grids)
        assert stats.visual_tokens_kept["llm_input"][i] == region.numel() + pooled
    placeholders = (run["input_ids"] == adapter.image_token_id).sum(1).tolist()
    assert placeholders == stats.visual_tokens_kept["llm_input"]
    tok = tiny(NAME)[1].tokenizer
    for b in range(2):  # <img> ... </img> still frame the rebuilt run
        row = run["input_ids"][b][run["attention_mask"][b].bool()]
        where = (row == adapter.image_token_id).nonzero().squeeze(1)
        assert row[where[0] - 1] == tok.convert_tokens_to_ids("<img>")
        assert row[where[-1] + 1] == tok.convert_tokens_to_ids("</img>")
    with apply_crop(model, CropPLCConfig(keep_tokens=200)) as crop:
        crop.prepare(inputs, BOXES)
        assert crop.stats.visual_tokens_kept["llm_input"] == [200, 200]


@pytest.mark.parametrize("config", [CropILPConfig, CropPLCConfig])
def test_batch_matches_one_by_one(config):
    model, _ = tiny(NAME)
    proc = _processor()
    inputs = _inputs()
    with apply_crop(model, config(keep_tokens=_BUDGET[config])) as crop:
        batch = greedy(model, crop.prepare(inputs, BOXES), STEPS)
        for i, (image, question, box) in enumerate(zip(IMAGES, QUESTIONS, BOXES, strict=True)):
            single = greedy(model, crop.prepare(chat_inputs(proc, [image], [question]), [box]), STEPS)
            assert torch.equal(batch.sequences[i, -STEPS:], single.sequences[0, -STEPS:])
            for step_b, step_s in zip(batch.logits, single.logits, strict=True):
                torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [CropILPConfig, CropPLCConfig])
def test_cached_decode_matches_no_cache(config):
    model, _ = tiny(NAME)
    inputs = _inputs(IMAGES[1:], QUESTIONS[1:])
    with apply_crop(model, config(keep_tokens=_BUDGET[config])) as crop:
        run = crop.prepare(inputs, [GridBox(0, 4, 3, 7)])
        cached = greedy(model, run, STEPS, use_cache=True)
        uncached = greedy(model, run, STEPS, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, uncached.logits, strict=True)) < 1e-4


def test_overlay_panels_show_tiles_and_thumbnail():
    from crop.viz import draw_panels

    model, _ = tiny(NAME)
    proc = _processor()
    adapter = get_adapter(model)
    panels = adapter.overlay_panels(IMAGES[0], proc.image_processor, (16, 16))
    assert [p.title for p in panels] == ["tiles (2x3: 32x48)", "thumbnail (16x16, squashed)"]
    assert panels[0].tile == (16, 16) and panels[0].picture.size == IMAGES[0].size
    inputs = _inputs(IMAGES[:1], QUESTIONS[:1])
    span = adapter.image_spans(inputs)[0]
    assert [p.grid for p in panels] == list(span.grids)  # the grids drawn are the ones pruned
    picture = draw_panels(panels, BOXES[0], _expected_region(span, BOXES[0]).tolist())
    assert picture.size[0] > 0
    one = adapter.overlay_panels(random_image(3, (448, 448)), proc.image_processor, (16, 16))
    assert len(one) == 1 and one[0].grid.rows == 16  # a square image in a processor allowing one tile


def test_vision_saliency_follows_the_visual_order():
    model, _ = tiny(NAME)
    adapter = get_adapter(model)
    inputs = _inputs()
    encoded = adapter.encode_images_with_saliency(inputs)
    features = adapter.encode_images(inputs)
    for enc, feats, span in zip(encoded, features, adapter.image_spans(inputs), strict=True):
        assert torch.equal(enc.features, feats)
        assert enc.saliency.shape == (span.visual_tokens,) and enc.keys.shape[0] == span.visual_tokens
        # the projector input of each visual token projects to its feature row
        order = span.visual_positions()
        torch.testing.assert_close(adapter.project_features(enc.pre_projector[:40]), feats[order[:40]])
        # [CLS] attention summed over heads: each tile's patches share at most `heads` of it
        heads = model.config.vision_config.num_attention_heads
        per_tile = torch.zeros(span.length).index_add_(0, order, enc.saliency).view(-1, 256).sum(1)
        assert (per_tile <= heads + 1e-4).all() and (per_tile > 0).all()


def test_vision_saliency_matches_eager_attentions():
    """The recomputed [CLS] row equals the tower's own (eager) attention weights."""
    model, _ = tiny(NAME, "eager")
    adapter = get_adapter(model)
    inputs = _inputs(IMAGES[:1], QUESTIONS[:1])
    encoded = adapter.encode_images_with_saliency(inputs)[0]
    out = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True, return_dict=True)
    cls = out.attentions[-1][:, :, 0, 1:].sum(1)  # (tiles, 1024) summed over heads
    per_token = cls.view(-1, 16, 2, 16, 2).sum(dim=(2, 4)).flatten()  # (tiles * 256,) span order
    span = adapter.image_spans(inputs)[0]
    torch.testing.assert_close(encoded.saliency, per_token[span.visual_positions()], atol=1e-5, rtol=1e-4)


def test_hub_layout_checkpoint_loads_without_torchvision(tmp_path):
    """A folder naming the stock ``InternVLProcessor`` (whose video processor needs torchvision) loads image-only."""
    from crop.models.loading import load_model
    from crop.models.processors import save_hub_layout

    model, proc = tiny(NAME)
    model.save_pretrained(tmp_path)
    save_hub_layout(proc, tmp_path, "InternVLProcessor", {"image_seq_length": 256})
    preprocessor = (tmp_path / "preprocessor_config.json").read_text()
    assert '"GotOcr2ImageProcessor"' in preprocessor and '"crop_to_patches": true' in preprocessor
    loaded, loaded_proc = load_model(str(tmp_path))
    assert type(loaded).__name__ == "InternVLForConditionalGeneration"
    inputs = chat_inputs(proc, IMAGES[1:], QUESTIONS[1:])
    again = chat_inputs(loaded_proc, IMAGES[1:], QUESTIONS[1:])
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    assert torch.equal(inputs["pixel_values"], again["pixel_values"])
    assert torch.equal(loaded(**again).logits, model(**inputs).logits)
    with apply_crop(loaded, CropILPConfig(keep_tokens=64)) as crop:
        loaded(**crop.prepare(again, [BOXES[1]]))
        assert crop.stats.visual_tokens_kept["after_layer_2"] == [64]
