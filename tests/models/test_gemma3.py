"""Gemma 3: bidirectional attention among an image's tokens and sliding-window layers, after pruning.

A tiny random ``Gemma3ForConditionalGeneration`` with real geometry (896 px SigLIP, 64x64 patches
pooled to 16x16 = 256 tokens per image) whose LM alternates sliding and global layers. Most tests
use a window of 16 tokens so that it bites on a ~300-token prompt; the registered
``tiny-random-gemma3`` (window 512) is the one the method matrix runs.
"""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_crop, apply_method
from crop.config import CropILPConfig
from crop.methods.pdrop import PDropConfig
from crop.models import get_adapter
from crop.models.tiny_gemma3 import build_tiny_gemma3
from crop.regions import GridBox
from tests.conftest import chat_inputs, greedy, method_config, random_image, tiny

WINDOW = 16
K = 2  # layers 0-1: sliding, full (unpruned); from 2 on: sliding 2, 3, 5, 6 and full 4, 7 (pruned)
IMAGES = [random_image(71, (400, 300)), random_image(72, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there left of it?"]
BOXES = [GridBox(1, 1, 4, 5), GridBox(3, 0, 7, 3)]
REAL_LAYOUT = ("sliding_attention",) * 5 + ("full_attention",)  # the checkpoints' pattern: first global layer is 5

_MODELS: dict[tuple, tuple] = {}


def windowed(attn: str = "eager", window: int = WINDOW, layer_types: tuple[str, ...] | None = None):
    """The seeded tiny Gemma 3 with a sliding window of ``window`` tokens (cached per session)."""
    key = (attn, window, layer_types)
    if key not in _MODELS:
        extra = {} if layer_types is None else {"layer_types": layer_types}
        _MODELS[key] = build_tiny_gemma3(0, attn_implementation=attn, sliding_window=window, **extra)
    return _MODELS[key]


def _inputs(proc, n: int = 2):
    return chat_inputs(proc, IMAGES[:n], QUESTIONS[:n])


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def _record_masks(model) -> tuple[dict[int, torch.Tensor], list]:
    """Pre-hooks registered after the pruner's: each layer's mask as the layer itself receives it."""
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: seen.__setitem__(i, kwargs.get("attention_mask")), with_kwargs=True)
        for i, layer in enumerate(model.model.language_model.layers)]
    return seen, handles


def _expected(slots: torch.Tensor, block: torch.Tensor, real: torch.Tensor, window: int | None) -> torch.Tensor:
    """``(n, n)`` what the stock Gemma 3 lets slot ``q`` see of slot ``k``, by original position.

    causal or same image block, within the window counted in original positions (``k > q - W``), real keys only.
    """
    q, k = slots[:, None], slots[None, :]
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    allowed = ((k <= q) | same) & real[None, :]
    return allowed if window is None else allowed & (k > q - window)


def _blocks(inputs, b: int, image_token: int) -> torch.Tensor:
    """``(L,)`` image-block id of each slot of sample ``b`` (-1 on text)."""
    is_image = inputs["input_ids"][b] == image_token
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:-1]
    return torch.where(is_image, starts.long().cumsum(0) - 1, torch.full_like(is_image, -1, dtype=torch.long))


# -- keep-all -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_is_bit_identical(attn):
    model, proc = windowed(attn)
    inputs = _inputs(proc)
    assert not bool(inputs["attention_mask"].all()), "the batch must be padded"
    ref = model(**inputs).logits
    with apply_crop(model, CropILPConfig(keep_tokens=None, layer=K)) as crop:
        out = model(**crop.prepare(inputs, [GridBox.full(), GridBox.full()])).logits
    assert torch.equal(out, ref)


# -- ILP: each pruned layer's mask is the stock one at the kept slots --------------------------------


def test_ilp_masks_stay_bidirectional_per_image_and_windowed_in_positions():
    model, proc = windowed("eager")
    inputs = _inputs(proc)
    with apply_crop(model, CropILPConfig(keep_tokens=20, layer=K)) as crop:
        run = crop.prepare(inputs, BOXES)
        seen, handles = _record_masks(model)
        model(**run)
        for h in handles:
            h.remove()
        ctx = crop.method.pruners[0].context
        index, valid = ctx.kept_slots(), ctx.valid  # (B, Lk)
    types = model.config.get_text_config().layer_types
    image = model.config.image_token_id
    for b in range(2):
        slots = index[b] if valid is None else index[b][valid[b]]
        block = _blocks(inputs, b, image)[slots]  # (n,)
        real = inputs["attention_mask"][b][slots].bool()
        for layer in (2, 4):
            got = _allowed(seen[layer])[b, 0]
            if valid is not None:
                got = got[valid[b]][:, valid[b]]
            window = WINDOW if types[layer] == "sliding_attention" else None
            want = _expected(slots, block, real, window)
            rows = real  # padding rows are whatever transformers makes them
            assert torch.equal(got[rows], want[rows]), f"layer {layer} ({types[layer]})"
        # the image's first and last kept tokens see each other both ways; text never sees forward
        kept_image = (block >= 0).nonzero()[:, 0]
        first, last = int(kept_image[0]), int(kept_image[-1])
        full = _allowed(seen[4])[b, 0] if valid is None else _allowed(seen[4])[b, 0][valid[b]][:, valid[b]]
        assert full[first, last] and full[last, first]
        text = ((block < 0) & real).nonzero()[:, 0]
        assert not full[text[0], text[-1]]


def test_ilp_attention_weights_reach_forward_inside_the_image_only():
    """The eager attention weights the pruned layers really use: image -> later kept image token > 0, text -> later = 0."""
    model, proc = windowed("eager")
    inputs = _inputs(proc, 1)
    with apply_crop(model, CropILPConfig(keep_tokens=20, layer=K)) as crop:
        out = model(**crop.prepare(inputs, BOXES[:1]), output_attentions=True)
        slots = crop.method.pruners[0].context.kept_slots()[0]  # (Lk,)
    block = _blocks(inputs, 0, model.config.image_token_id)[slots]
    kept_image = (block >= 0).nonzero()[:, 0]
    first, last = int(kept_image[0]), int(kept_image[-1])
    for layer in (2, 4):  # sliding (forward inside the block is not bounded by the window) and global
        weights = out.attentions[layer][0]  # (H, Lk, Lk)
        assert weights.shape[-1] == slots.numel()
        assert bool((weights[:, first, last] > 0).all())
        back = bool((weights[:, last, first] > 0).all())  # backward: the sliding layer only within its window
        assert back == (layer == 4 or int(slots[last] - slots[first]) < WINDOW)
        text = (block < 0).nonzero()[:, 0]
        assert float(weights[:, text[0], text[0] + 1:].abs().max()) == 0.0  # text attends nothing after it


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_logits_match_masking_the_dropped_tokens(attn):
    """Pruning equals the unpruned model whose layers K.. may not attend to the dropped tokens (own masks, own windows)."""
    model, proc = windowed(attn)
    inputs = _inputs(proc)
    with apply_crop(model, CropILPConfig(keep_tokens=20, layer=K)) as crop:
        pruned = model(**crop.prepare(inputs, BOXES)).logits[:, -1]  # (B, V)
        ctx = crop.method.pruners[0].context
        index, valid = ctx.kept_slots(), ctx.valid
    keep_cols = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)  # (B, L)
    for b, row in enumerate(index):
        keep_cols[b, row if valid is None else row[valid[b]]] = True

    def restrict(mod, args, kwargs):
        mask = kwargs["attention_mask"]  # (B, 1, L, L): Gemma 3 always materialises it (image blocks)
        eye = torch.eye(mask.shape[-1], dtype=torch.bool)
        allowed = (_allowed(mask) & keep_cols[:, None, None, :]) | eye
        kwargs["attention_mask"] = allowed if mask.dtype == torch.bool else \
            torch.where(allowed, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
        return args, kwargs

    handles = [layer.register_forward_pre_hook(restrict, with_kwargs=True)
               for layer in model.model.language_model.layers[K:]]
    try:
        reference = model(**inputs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pruned, model(**inputs).logits[:, -1], atol=1e-3)  # pruning changed the computation


def test_pruned_batch_matches_one_by_one():
    model, proc = windowed("sdpa")
    config = CropILPConfig(keep_tokens=None, layer=K)  # ragged: the two boxes hold different numbers of tokens
    boxes = [BOXES[0], GridBox(3, 0, 7, 2)]
    with apply_crop(model, config) as crop:
        batch = model(**crop.prepare(_inputs(proc), boxes)).logits[:, -1]
        kept = crop.stats.visual_tokens_kept[f"after_layer_{K}"]
        singles = [model(**crop.prepare(chat_inputs(proc, [im], [q]), [box])).logits[0, -1]
                   for im, q, box in zip(IMAGES, QUESTIONS, boxes, strict=True)]
    assert kept[0] != kept[1]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=1e-4)


# -- PLC: the rebuilt prompt's image run is one bidirectional block again ------------------------------


def test_plc_rebuilds_token_type_ids_and_the_block_stays_bidirectional():
    model, proc = windowed("eager")
    inputs = _inputs(proc)
    with apply_method(model, method_config("crop-plc", 40, model)) as h:
        run = h.prepare(inputs, BOXES)
    image = model.config.image_token_id
    assert torch.equal(run["token_type_ids"], (run["input_ids"] == image).long())
    assert run["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    seen, handles = _record_masks(model)
    try:
        out = model(**run, output_attentions=True)
    finally:
        for h_ in handles:
            h_.remove()
    for b in range(2):
        slots = torch.arange(run["input_ids"].shape[1])
        block = _blocks(run, b, image)
        real = run["attention_mask"][b].bool()
        for layer, window in ((0, WINDOW), (1, None)):
            got = _allowed(seen[layer])[b, 0]
            assert torch.equal(got[real], _expected(slots, block, real, window)[real])
        members = (block >= 0).nonzero()[:, 0]
        first, last = int(members[0]), int(members[-1])
        weights = out.attentions[1][b]  # (H, L', L') a global layer
        assert bool((weights[:, first, last] > 0).all())
        assert float(weights[:, first - 1, first:].abs().max()) == 0.0  # <start_of_image> does not see the image


# -- decoding --------------------------------------------------------------------------------------


def test_cached_decode_equals_uncached_on_the_registered_model():
    """Window 512 > sequence, first sliding and first global layers unpruned: each kind's decode mask covers it all."""
    model, proc = tiny("tiny-random-gemma3")
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    with apply_crop(model, CropILPConfig(keep_tokens=20, layer=K)) as crop:
        cached = greedy(model, crop.prepare(inputs, BOXES), 3, use_cache=True)
        uncached = greedy(model, crop.prepare(inputs, BOXES), 3, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer_types,refused", [(None, 2), (REAL_LAYOUT, 5)], ids=["window-outgrown", "real-layout"])
def test_cached_decode_over_other_tokens_is_refused_in_one_line(layer_types, refused):
    """Window 16 < prompt: the sliding decode mask covers the last 16 keys only; the real layout (first global layer 5)
    sizes the global decode mask on a pruned cache. Both are refused, never silently wrong."""
    window = WINDOW if layer_types is None else 512
    model, proc = windowed("sdpa", window, layer_types)
    inputs = _inputs(proc)  # padded: transformers materialises the decode masks
    with apply_crop(model, CropILPConfig(keep_tokens=20, layer=K)) as crop:
        with pytest.raises(RuntimeError, match=rf"decoder layer {refused} got a decode-step mask over \d+ keys") as err:
            greedy(model, crop.prepare(inputs, BOXES), 2)
    assert "\n" not in str(err.value)


# -- renumbered positions per layer type --------------------------------------------------------------


def test_renumbering_gives_each_layer_type_its_own_tables():
    """PyramidDrop renumbers positions: the sliding and global layers get those positions through their own theta."""
    model, proc = windowed("sdpa", 512)
    inputs = _inputs(proc, 1)
    config = PDropConfig(layers=(2, 4), ratio=0.5)
    tables: dict[int, tuple] = {}
    with apply_method(model, config) as h:
        run = h.prepare(inputs, BOXES[:1])
        handles = [layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: tables.__setitem__(i, (kwargs["position_embeddings"], kwargs["position_ids"])),
            with_kwargs=True) for i, layer in enumerate(model.model.language_model.layers)]
        try:
            model(**run)
        finally:
            for handle in handles:
                handle.remove()
    rotary = model.model.language_model.rotary_emb
    types = model.config.get_text_config().layer_types
    for layer in (2, 4):
        (cos, sin), pos = tables[layer]
        ref_cos, ref_sin = rotary(cos, pos, types[layer])
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
        assert int(pos.max()) + 1 == pos.shape[-1]  # renumbered 0..L'-1 (one unpadded prompt)
    assert not torch.equal(tables[2][0][0], tables[4][0][0])  # local and global theta really differ


# -- views ------------------------------------------------------------------------------------------------


def test_spans_and_overlay_view():
    model, proc = tiny("tiny-random-gemma3")
    adapter = get_adapter(model)
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    spans = adapter.image_spans(inputs)
    assert [(s.sample, s.length, s.rows, s.cols) for s in spans] == [(0, 256, 16, 16), (1, 256, 16, 16)]
    for span in spans:  # framed by <start_of_image> / <end_of_image>
        row = inputs["input_ids"][span.sample]
        assert int(row[span.start - 1]) == model.config.boi_token_id
        assert int(row[span.start + span.length]) == model.config.eoi_token_id
    panels = adapter.overlay_panels(IMAGES[0], proc.image_processor, (16, 16))
    assert len(panels) == 1 and panels[0].picture.size == IMAGES[0].size
    assert (panels[0].grid.rows, panels[0].grid.cols) == (16, 16)
    assert adapter.view_box(BOXES[0], IMAGES[0].size, proc.image_processor) == BOXES[0]  # resize only: same box


def test_a_hub_layout_checkpoint_answers_a_batch(tmp_path):
    """A Gemma 3 saved in the hub layout (stock ``Gemma3Processor``) loads through ``load_model`` and takes a batch
    with one flat image list, as the pipeline and evaluation pass it."""
    from crop.models.loading import load_model
    from crop.models.processors import save_hub_layout

    model, proc = tiny("tiny-random-gemma3")
    model.save_pretrained(tmp_path)
    save_hub_layout(proc, tmp_path, "Gemma3Processor", {"image_seq_length": proc.image_seq_length})
    loaded, loaded_proc = load_model(str(tmp_path))
    images, questions = [random_image(1, (400, 300)), random_image(2, (300, 400))], ["What?", "Which color?"]
    batch = chat_inputs(loaded_proc, images, questions)
    assert batch["input_ids"].shape[0] == 2
    for i in range(2):
        alone = chat_inputs(loaded_proc, images[i:i + 1], questions[i:i + 1])
        n = int(alone["attention_mask"].sum())
        torch.testing.assert_close(loaded(**batch).logits[i, -1], loaded(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)
        assert int(batch["attention_mask"][i].sum()) == n
