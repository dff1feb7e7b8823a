"""CROP ILP and PLC on architectures other than LLaVA-1.5 (the ARCHS list of tests/conftest.py).

The same checks as tests/methods/test_ilp.py and tests/methods/test_plc.py (LLaVA-1.5), per architecture, on
tiny random models. Batches mix image sizes, so Qwen images get different token counts and
LLaVA-NeXT images different tile layouts, and prompts are left-padded.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_crop
from crop.config import CropILPConfig, CropPLCConfig
from crop.hf_compat import generated_cache
from crop.models import get_adapter
from crop.ops.pooling import count_pooled
from crop.regions import GridBox
from tests.conftest import ARCHS as ALL_ARCHS
from tests.conftest import chat_inputs, greedy, random_image, tiny

# the adapters other than LLaVA-1.5 (whose path tests/methods/test_ilp.py and tests/methods/test_plc.py cover)
ARCHS = [a for a in ALL_ARCHS if a != "tiny-random-llava"]
QWEN = [a for a in ARCHS if "qwen" in a]
IMAGES = [random_image(21, (400, 300)), random_image(22, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]
BOXES = [GridBox(0, 0, 2, 2), GridBox(3, 1, 7, 6)]
STEPS = 3




def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


_REFS: dict[tuple[str, str], tuple] = {}


def _reference(name: str, attn: str):
    """Stock model outputs on the mixed-size batch: (inputs, forward logits, generate output)."""
    if (name, attn) not in _REFS:
        model, proc = tiny(name, attn)
        inputs = chat_inputs(proc, IMAGES, QUESTIONS)
        _REFS[(name, attn)] = (inputs, model(**inputs).logits, greedy(model, inputs, STEPS))
    return _REFS[(name, attn)]


_CROP = {"ilp": CropILPConfig, "plc": CropPLCConfig}


@pytest.mark.parametrize("method", ["ilp", "plc"])
@pytest.mark.parametrize("name,attn", [(n, "sdpa") for n in ARCHS] + [("tiny-random-qwen2-vl", "eager")])
def test_keep_all_is_bit_identical(name, attn, method):
    model, _ = tiny(name, attn)
    inputs, ref_logits, ref = _reference(name, attn)
    with apply_crop(model, _CROP[method]()) as crop:
        logits = model(**crop.prepare(inputs, [None, None])).logits
        assert crop.stats.visual_tokens_kept["llm_input"] == crop.stats.visual_tokens_in
        out = greedy(model, crop.prepare(inputs, [GridBox.full(), None]), STEPS)
    assert (logits - ref_logits).abs().max().item() == 0.0
    assert torch.equal(out.sequences[:, -STEPS:], ref.sequences[:, -STEPS:])
    assert _max_diff(out.logits, ref.logits) == 0.0


@pytest.mark.parametrize("name", ARCHS)
def test_removal_restores_model(name):
    model, proc = tiny(name)
    inputs, ref_logits, _ = _reference(name, "sdpa")
    layers = get_adapter(model).decoder_layers()
    crop = apply_crop(model, CropILPConfig(keep_tokens=32))
    pruned = model(**crop.prepare(inputs, BOXES)).logits
    assert not torch.allclose(pruned[:, -1], ref_logits[:, -1])  # pruning really changed the computation
    crop.remove()
    crop.remove()
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert torch.equal(model(**inputs).logits, ref_logits)


def _high_res_rows(span, positions) -> int:
    """LLaVA-NeXT: high-res grid rows holding any of ``positions`` (their newlines stay)."""
    if span.length == span.visual_tokens:  # no newlines (one grid, or InternVL's tiles + thumbnail)
        return 0
    grid = span.grids[1]
    rel = torch.as_tensor(positions) - grid.offset
    return int((rel[rel >= 0] // grid.stride).unique().numel())


@pytest.mark.parametrize("budget", [None, 48])
@pytest.mark.parametrize("name", ARCHS)
def test_ilp_budget_and_kv_lengths(name, budget):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    prompt_len = inputs["input_ids"].shape[1]
    box = GridBox(2, 2, 5, 5)
    with apply_crop(model, CropILPConfig(keep_tokens=budget, layer=2)) as crop:
        out = model(**crop.prepare(inputs, [box]), use_cache=True)
        stats = crop.stats
    span = get_adapter(model).image_spans(inputs)[0]
    region = sum(int(box.token_mask(g.rows, g.cols).sum()) for g in span.token_grids)
    kept = stats.visual_tokens_kept["after_layer_2"]
    assert kept == [budget if budget is not None else region]
    assert stats.visual_tokens_in == [span.visual_tokens]
    newlines = span.length - span.visual_tokens
    survivors = prompt_len - span.length + kept[0] + _high_res_rows(span, stats.full_resolution[0])
    lengths = [layer.keys.shape[-2] for layer in generated_cache(out).layers]
    assert lengths == [prompt_len, prompt_len] + [survivors] * (len(lengths) - 2)
    assert newlines == (span.grids[1].rows if span.grids and span.length > span.visual_tokens else 0)


# LLaVA-NeXT PLC has no hooks and 1-D positions (the LLaVA-1.5 path); its no-cache run is skipped for time
@pytest.mark.parametrize("name,method", [(n, m) for n in ARCHS for m in ("ilp", "plc")][:-1])
def test_cached_generation_matches_no_cache_greedy(name, method):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[1:], QUESTIONS[1:])
    with apply_crop(model, _CROP[method](keep_tokens=64 if method == "ilp" else None)) as crop:
        run = crop.prepare(inputs, [GridBox(0, 4, 3, 7)])
        cached = greedy(model, run, STEPS, use_cache=True)
        uncached = greedy(model, run, STEPS, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert _max_diff(cached.logits, uncached.logits) < 1e-4


@pytest.mark.parametrize("method", ["ilp", "plc"])
# Gemma 3 makes 256 tokens of every image whatever its size (tests/models/test_gemma3.py batches ragged kept sets)
@pytest.mark.parametrize("name", [a for a in ARCHS if a != "tiny-random-gemma3"])
def test_batch_of_two_sizes_matches_one_by_one(name, method):
    model, proc = tiny(name)
    batch_inputs = _reference(name, "sdpa")[0]
    spans = get_adapter(model).image_spans(batch_inputs)
    assert spans[0].length != spans[1].length  # different token counts per image
    with apply_crop(model, _CROP[method]()) as crop:
        batch = greedy(model, crop.prepare(batch_inputs, BOXES), STEPS)
        kept = next(iter(crop.stats.visual_tokens_kept.values())) if method == "plc" else \
            crop.stats.visual_tokens_kept["after_layer_2"]
        singles = []
        for image, question, box in zip(IMAGES, QUESTIONS, BOXES, strict=True):
            singles.append(greedy(model, crop.prepare(chat_inputs(proc, [image], [question]), [box]), STEPS))
            single_kept = crop.stats.visual_tokens_kept["llm_input" if method == "plc" else "after_layer_2"]
            assert single_kept == [kept[len(singles) - 1]]
    assert kept[0] != kept[1]  # ragged kept sets
    for i, single in enumerate(singles):
        assert torch.equal(batch.sequences[i, -STEPS:], single.sequences[0, -STEPS:])
        for step_b, step_s in zip(batch.logits, single.logits, strict=True):
            torch.testing.assert_close(step_b[i], step_s[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_plc_tokens_are_region_plus_pooled_and_budget_met(name):
    model, proc = tiny(name)
    inputs = _reference(name, "sdpa")[0]
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    expected = []
    for span, box in zip(spans, BOXES, strict=True):
        total = 0
        for grid in span.token_grids:  # region at full resolution + 4x4-pooled rest, each grid on its own
            region = box.token_indices(grid.rows, grid.cols)
            total += region.numel() + count_pooled(grid.rows, grid.cols, region, 4)
        expected.append(total)
    with apply_crop(model, CropPLCConfig(pool=4)) as crop:
        run = crop.prepare(inputs, BOXES)
        out = model(**run, use_cache=True)
        stats = crop.stats
    assert stats.visual_tokens_kept["llm_input"] == expected
    placeholders = (run["input_ids"] == adapter.image_token_id).sum(1).tolist()  # visual + kept newlines
    newlines = [p - e for p, e in zip(placeholders, expected, strict=True)]
    if spans[0].length > spans[0].visual_tokens:  # newlines (structure tokens) go with kept rows
        assert all(0 < n <= s.grids[1].rows for n, s in zip(newlines, spans, strict=True))
    else:
        assert newlines == [0, 0]
    widths = (run["attention_mask"].sum(1)).tolist()
    text = [int(m.sum()) - s.length for m, s in zip(inputs["attention_mask"], spans, strict=True)]
    assert widths == [t + p for t, p in zip(text, placeholders, strict=True)]
    assert {layer.keys.shape[-2] for layer in generated_cache(out).layers} == {run["input_ids"].shape[1]}
    budget = 200 if spans[0].grids else 64  # Qwen's images here have 126-130 tokens
    with apply_crop(model, CropPLCConfig(keep_tokens=budget)) as crop:
        run = crop.prepare(inputs, BOXES)
        assert crop.stats.visual_tokens_kept["llm_input"] == [budget, budget]
    newlines = (run["input_ids"] == adapter.image_token_id).sum(1) - budget
    assert ((newlines > 0) if spans[0].length > spans[0].visual_tokens else (newlines == 0)).all()


@pytest.mark.parametrize("name", QWEN)
def test_qwen_plc_keeps_original_mrope_positions(name):
    model, proc = tiny(name)
    inputs = _reference(name, "sdpa")[0]
    adapter = get_adapter(model)
    old = adapter.original_positions(inputs)  # (3, B, L)
    with apply_crop(model, CropPLCConfig()) as crop:
        run = crop.prepare(inputs, BOXES)
    new = run["position_ids"]  # (3, B, L')
    assert new.shape == (3, 2, run["input_ids"].shape[1])
    for b in range(2):
        keep_old = (inputs["input_ids"][b] != adapter.image_token_id) & inputs["attention_mask"][b].bool()
        keep_new = (run["input_ids"][b] != adapter.image_token_id) & run["attention_mask"][b].bool()
        assert torch.equal(new[:, b, keep_new], old[:, b, keep_old])  # text keeps its positions
        image_old = {tuple(p) for p in old[:, b, ~keep_old & inputs["attention_mask"][b].bool()].T.tolist()}
        image_new = [tuple(p) for p in new[:, b, run["input_ids"][b] == adapter.image_token_id].T.tolist()]
        assert set(image_new) <= image_old and len(set(image_new)) == len(image_new)  # each a distinct original cell
    assert torch.equal(run["mm_token_type_ids"], (run["input_ids"] == adapter.image_token_id).to(
        run["mm_token_type_ids"].dtype))


def test_llava_next_region_maps_to_base_and_tiles():
    model, proc = tiny("tiny-random-llava-next")
    inputs = _reference("tiny-random-llava-next", "sdpa")[0]
    adapter = get_adapter(model)
    span = adapter.image_spans(inputs)[0]  # 400x300 image: 1x2 tiles -> 24x48, unpadded to 24x32
    base, high = span.grids
    assert (base.rows, base.cols, high.rows, high.cols, high.stride) == (24, 24, 24, 32, 33)
    assert span.length == 576 + 24 * 33 and span.visual_tokens == 576 + 24 * 32
    box = GridBox(0, 0, 3, 7)  # left half of the image
    chosen = adapter.select(span, box, None)
    in_base, in_high = chosen[chosen < 576], chosen[chosen >= 576]
    assert in_base.numel() == 24 * 12 and in_high.numel() == 24 * 16
    assert ((in_high - 576) % 33 < 16).all()  # left half of every high-res row, never a newline
    assert span.structure_positions(chosen).tolist() == [576 + r * 33 + 32 for r in range(24)]
    with pytest.raises(ValueError, match="packed length"):
        bad = dict(inputs, image_sizes=torch.tensor([[600, 300], [500, 336]]))
        adapter.image_spans(bad)


@pytest.mark.parametrize("name", QWEN)
def test_qwen_ilp_kept_tokens_keep_original_mrope_cos_sin(name):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    layer = get_adapter(model).decoder_layers()[2]
    seen = []

    def capture(module, args, kwargs):
        seen.append(kwargs["position_embeddings"][0].clone())  # cos, (1, L, d)

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    model(**inputs)  # stock: the model's own M-RoPE cos for every prompt position
    handle.remove()
    with apply_crop(model, CropILPConfig(layer=2)) as crop:
        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)  # runs after CROP's hook
        try:
            model(**crop.prepare(inputs, [GridBox(2, 1, 5, 6)]))
        finally:
            handle.remove()
        kept = crop.stats.full_resolution[0]
    span = get_adapter(model).image_spans(inputs)[0]
    positions = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    positions[span.start:span.start + span.length] = False
    positions[span.start + torch.tensor(kept)] = True
    assert torch.equal(seen[1], seen[0][:, positions])  # gathered, not recomputed for the shorter sequence


def test_qwen_checkpoint_directory_loads_with_an_image_processor(tmp_path):
    # without torchvision, AutoProcessor gives a Qwen2-VL checkpoint's bare tokenizer; load_model must not
    from crop.models.loading import load_model

    model, proc = tiny("tiny-random-qwen2-vl")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, loaded_proc = load_model(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    again = chat_inputs(loaded_proc, IMAGES[:1], QUESTIONS[:1])
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)


@pytest.mark.parametrize("budget", [None, 1, 40, 200, 700, 1344, 5000])
def test_select_tokens_multi_one_budget_over_all_grids(budget):
    from crop.ops.selection import select_tokens, select_tokens_multi

    box = GridBox(3, 3, 4, 5)
    grids = [(24, 24), (24, 32)]
    keep = select_tokens_multi(box, grids, budget)
    region = box.token_indices(24, 24).numel() + box.token_indices(24, 32).numel()
    assert keep.numel() == (region if budget is None else min(budget, 24 * 24 + 24 * 32))
    assert torch.equal(keep, keep.unique())
    if budget is not None and budget <= region:
        inside = torch.cat([box.token_indices(24, 24), box.token_indices(24, 32) + 576])
        assert torch.isin(keep, inside).all()  # trimmed inside the region, on both grids
        assert (keep < 576).any() == (keep >= 576).any() or budget == 1
    for b in (None, 50, 300):  # one grid: the same as select_tokens
        assert torch.equal(select_tokens_multi(box, [(24, 24)], b), select_tokens(box, 24, 24, b))
