"""CROP-self: the region from the answerer's own early attention, decided inside the one prefill.

The box rules against brute force over every box; the attention weights against eager
``output_attentions``; planted attention (queries/keys set through hooks on the scoring layers)
must give back the planted region on every architecture; the pipeline, the ``self`` localizer
and the evaluation report the box found and flag it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from crop.api import apply_method
from crop.config import CropILPConfig, CropPLCConfig, CropSelfConfig, NoPruningConfig
from crop.localizers import SelfLocalizer, make_localizer
from crop.methods.self_region import CropSelf, for_self_localizer
from crop.models import get_adapter
from crop.ops.attention_box import best_box, cell_mass, cell_of_tokens
from crop.pipeline import CropPipeline
from crop.regions import GridBox
from tests.conftest import ARCHS, chat_inputs, random_image, tiny
from tests.methods.test_baselines_attention import _plant

IMAGES = [random_image(51, (400, 300)), random_image(52, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]


# -- the box rules ---------------------------------------------------------------------------------


def _all_boxes(g: int):
    for y0, y1, x0, x1 in itertools.product(range(g), repeat=4):
        if y0 <= y1 and x0 <= x1:
            yield GridBox(x0, y0, x1, y1, g)


def _mass_in(mass: torch.Tensor, box: GridBox) -> float:
    return float(mass[box.y0:box.y1 + 1, box.x0:box.x1 + 1].sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_price_rule_is_the_maximum_sum_subrectangle(seed):
    g = 5
    mass = torch.rand(g, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 4
    mass /= mass.sum()
    for price in (0.5, 1.0, 2.0):
        box = best_box(mass, "price", price=price)
        value = lambda b, p=price: _mass_in(mass, b) - p * b.area / g**2  # noqa: E731
        best = max(value(b) for b in _all_boxes(g))
        assert value(box) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_share_rule_is_the_smallest_box_holding_the_share(seed):
    g = 5
    mass = torch.rand(g, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3
    mass /= mass.sum()
    for share in (0.3, 0.6, 0.9):
        box = best_box(mass, "share", share=share)
        assert _mass_in(mass, box) >= share - 1e-12
        assert box.area == min(b.area for b in _all_boxes(g) if _mass_in(mass, b) >= share - 1e-12)


def test_a_peak_gives_its_own_cell_and_a_flat_map_the_whole_image():
    mass = torch.full((8, 8), 0.1 / 63, dtype=torch.float64)
    mass[3, 5] = 0.9
    assert best_box(mass, "price") == GridBox(5, 3, 5, 3)
    flat = torch.full((8, 8), 1 / 64, dtype=torch.float64)
    assert best_box(flat, "price", price=0.5) == GridBox.full()
    with pytest.raises(ValueError, match="unknown box rule"):
        best_box(flat, "mode")


def test_cell_mass_counts_each_token_in_the_cell_of_its_centre_over_every_grid():
    # 24x24 on 8x8: 3x3 tokens per cell; 5x7 (a Qwen-like odd grid): centres decide
    cells = cell_of_tokens(24, 24, 8).view(24, 24)
    assert cells[0, 0] == 0 and cells[2, 2] == 0 and cells[3, 3] == 9 and cells[23, 23] == 63
    odd = cell_of_tokens(5, 7, 8).view(5, 7)
    assert odd[0, 0] == 0 and odd[4, 6] == 63
    weights = torch.zeros(24 * 24 + 12 * 12)
    weights[3 * 24 + 3] = 1.0  # base grid, cell (1, 1)
    weights[576 + 11 * 12 + 11] = 3.0  # second grid, last cell
    mass = cell_mass(weights, [(24, 24), (12, 12)], 8)
    assert mass.sum() == pytest.approx(1.0)
    assert mass[1, 1] == pytest.approx(0.25) and mass[7, 7] == pytest.approx(0.75)
    assert torch.equal(cell_mass(torch.zeros(576), [(24, 24)], 8), torch.full((8, 8), 1 / 64, dtype=torch.float64))


def test_config_validates_its_choices():
    with pytest.raises(ValueError, match="queries"):
        CropSelfConfig(queries="first")
    with pytest.raises(ValueError, match="price"):
        CropSelfConfig(price=0)
    with pytest.raises(ValueError, match="share"):
        CropSelfConfig(share=1.5)
    assert CropSelfConfig.from_ilp(CropILPConfig(keep_tokens=9, layer=3, trim="stride"), rule="share") == \
        CropSelfConfig(keep_tokens=9, layer=3, trim="stride", rule="share")


# -- inside the model ------------------------------------------------------------------------------


def _record_weights(method: CropSelf) -> list:
    """Keep what the method's ``token_weights`` returns (an instance attribute wrapping the bound method)."""
    seen, inner = [], method.token_weights

    def recording(hidden, layer_kwargs):
        seen.append(inner(hidden, layer_kwargs))
        return seen[-1]

    method.token_weights = recording
    return seen


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2-vl"])
@pytest.mark.parametrize("queries,layers", [("text", "all"), ("last", "last")])
def test_weights_equal_eager_output_attentions(name, queries, layers):
    """The attention mass the box is built from is the model's own (mean over heads, queries, layers < K)."""
    model, proc = tiny(name, "eager")
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    config = CropSelfConfig(keep_tokens=40, layer=2, queries=queries, attention_layers=layers)
    with apply_method(model, config) as h:
        seen = _record_weights(h.method)
        model(**h.prepare(inputs))
        spans = h.method._spans
    reference_out = model(**inputs, output_attentions=True)
    mask = inputs["attention_mask"].bool()
    used = [0, 1] if layers == "all" else [1]
    for b, span in enumerate(spans):
        real = mask[b].nonzero().squeeze(1)
        rows = real[real >= span.start + span.length] if queries == "text" else real[-1:]
        ref = torch.stack([reference_out.attentions[k][b].mean(0)[rows].mean(0) for k in used]).mean(0)  # (L,)
        torch.testing.assert_close(seen[0][b], ref.float(), atol=1e-6, rtol=1e-5)


def _region_slots(span, box: GridBox) -> list[int]:
    """Prompt positions of the visual tokens whose centres lie in the box, on every grid of the span."""
    out, offset = [], 0
    visual = span.visual_positions()
    for g in span.token_grids:
        cells = cell_of_tokens(g.rows, g.cols, box.grid)  # (rows*cols,)
        inside = ((cells % box.grid >= box.x0) & (cells % box.grid <= box.x1) & (cells // box.grid >= box.y0)
                  & (cells // box.grid <= box.y1)).nonzero().squeeze(1)
        out += (span.start + visual[offset + inside]).tolist()
        offset += g.rows * g.cols
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_planted_attention_gives_back_the_planted_box(name):
    model, proc = tiny(name)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    span = get_adapter(model).image_spans(inputs)[0]
    planted = GridBox(2, 3, 4, 5)
    seq_len = inputs["input_ids"].shape[1]
    handles = [h for layer in (0, 1) for h in _plant(model, layer, {s: 10.0 for s in _region_slots(span, planted)},
                                                      seq_len)]
    try:
        with apply_method(model, CropSelfConfig(keep_tokens=None, layer=2, rule="price", attention_layers="all")) as h:
            model(**h.prepare(inputs))
            stats = h.stats
    finally:
        for handle in handles:
            handle.remove()
    assert stats.boxes == [planted] and stats.self_localized == [True]
    expected = get_adapter(model).select(span, planted, None).tolist()
    assert stats.full_resolution == [expected]
    assert stats.visual_tokens_kept["after_layer_2"] == [len(expected)]


def _only_own_region(model, layer: int, own: list[list[int]]):
    """A k_proj hook (after :func:`_plant`'s) zeroing, in each sample, the planted keys of the other samples' regions."""
    parts = get_adapter(model).attention_parts(layer)

    def hook(module, args, output):
        keep = torch.zeros(output.shape[:2], dtype=torch.bool)  # (B, L)
        for b, slots in enumerate(own):
            keep[b, slots] = True
        return output * keep[..., None]

    return parts.k_proj.register_forward_hook(hook)


def test_batches_get_their_own_boxes_in_one_forward():
    model, proc = tiny("tiny-random-llava")
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    spans = get_adapter(model).image_spans(inputs)
    boxes = [GridBox(0, 0, 1, 2), GridBox(5, 4, 7, 7)]
    seq_len = inputs["input_ids"].shape[1]
    handles = []
    for layer in (0, 1):  # every slot of either region gets a planted key, then each sample keeps only its own
        slots = {s: 10.0 for span, box in zip(spans, boxes, strict=True) for s in _region_slots(span, box)}
        handles += _plant(model, layer, slots, seq_len)
        handles.append(_only_own_region(model, layer, [_region_slots(sp, bx) for sp, bx in zip(spans, boxes, strict=True)]))
    calls = []
    handles.append(get_adapter(model).decoder_layers()[0].register_forward_pre_hook(lambda m, a: calls.append(1)))
    try:
        with apply_method(model, CropSelfConfig(keep_tokens=30, layer=2, rule="price", attention_layers="all")) as h:
            model(**h.prepare(inputs))
            stats = h.stats
    finally:
        for handle in handles:
            handle.remove()
    assert stats.boxes == boxes
    assert len(calls) == 1  # one prefill: the box was decided inside it
    assert stats.visual_tokens_kept["after_layer_2"] == [30, 30]


def test_selection_flops_are_the_captured_rows_and_tiny_next_to_a_7b_prefill():
    model, _ = tiny("tiny-random-llava")
    def flops(**choices):
        return CropSelf(get_adapter(model), CropSelfConfig(keep_tokens=64, layer=2, **choices)).selection_flops(640, 576)

    method = CropSelf(get_adapter(model), CropSelfConfig(keep_tokens=64, layer=2, attention_layers="all"))
    assert flops(attention_layers="all") == 2 * flops(attention_layers="last")  # one set of rows per layer < K
    assert flops(queries="text") > 32 * flops(queries="last") > 0  # 64 text queries vs one (keys' RoPE shared)
    # LLaVA-1.5-7B: 32 heads of 128, 640-token prompt; two layers of 64 text queries vs ~2 * 6.7e9 * 640
    parts = method.captures[0].parts
    scale = (32 * 128) / (parts.heads * parts.head_dim)
    assert method.selection_flops(640, 576) * scale < 1e-3 * 2 * 6.7e9 * 640


# -- pipeline, localizer, evaluation ---------------------------------------------------------------


def test_the_self_localizer_turns_ilp_into_crop_self_and_refuses_plc():
    assert isinstance(make_localizer("self"), SelfLocalizer)
    ilp = CropILPConfig(keep_tokens=20, layer=2)
    assert for_self_localizer(ilp) == CropSelfConfig(keep_tokens=20, layer=2)
    assert for_self_localizer(ilp, {"rule": "share"}).rule == "share"
    assert for_self_localizer(NoPruningConfig()) == NoPruningConfig()
    with pytest.raises(ValueError, match="before the LLM"):
        for_self_localizer(CropPLCConfig(keep_tokens=20))
    model, proc = tiny("tiny-random-llava")
    with pytest.raises(ValueError, match="before the LLM"):
        CropPipeline(model, proc, SelfLocalizer(), CropPLCConfig(keep_tokens=20))


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-qwen2.5-vl"])
def test_pipeline_reports_the_box_found_and_flags_it(name):
    model, proc = tiny(name)
    pipe = CropPipeline(model, proc, SelfLocalizer(), CropILPConfig(keep_tokens=12, layer=2))
    assert isinstance(pipe.config, CropSelfConfig)
    results = pipe.answer_batch(IMAGES, QUESTIONS, max_new_tokens=2)
    for r in results:
        assert r.method == "crop-self" and r.extra["self_localized"] is True
        assert r.extra["model_view_box"] == r.box and r.timings["localizer_s"] < 0.01
        assert r.visual_tokens_kept["after_layer_2"] == 12 and len(r.full_resolution_tokens) == 12
        GridBox(*r.box, grid=8)  # a valid box on the grid


def test_eval_with_the_self_localizer_runs_crop_self_and_scores_its_boxes():
    from crop.eval.runner import EvalSpec, run_eval

    model, proc = tiny("tiny-random-llava")
    spec = EvalSpec(methods=["full", "crop-ilp", "fastv"], keep_tokens=[64], n=4, split="val", max_new_tokens=2)
    result = run_eval(model, proc, SelfLocalizer(), spec, "self", "tiny-random-llava")
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"full", "crop-self", "fastv"}
    loc = runs["crop-self"]["self_localization"]["all"]
    assert loc["n"] == 4 and 0 <= loc["mean_iou"] <= 1
    assert "self_localization" not in runs["fastv"]
    assert all(p["flops"]["localizer"] == 0 for p in runs["crop-self"]["predictions"])
    assert all(p["flops"]["selection"] > 0 for p in runs["crop-self"]["predictions"])
    with pytest.raises(ValueError, match="before the LLM"):
        run_eval(model, proc, SelfLocalizer(), EvalSpec(methods=["crop-plc"], keep_tokens=[64], n=2, split="val"),
                 "self", "tiny-random-llava")


def test_cli_answer_with_the_self_localizer(capsys):
    from crop.cli import main

    assert main(["answer", "--sample", "What color is the star?", "--model", "tiny-random-llava",
                 "--localizer", "self", "--keep-tokens", "20", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "method: crop-self (layer 2)" in out and "found by the answerer's own attention" in out
    assert main(["answer", "--sample", "What color is the star?", "--model", "tiny-random-llava",
                 "--localizer", "self", "--method", "plc", "--keep-tokens", "20"]) == 2
    assert "needs the region before the LLM runs" in capsys.readouterr().err
