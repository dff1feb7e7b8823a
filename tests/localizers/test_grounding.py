"""The zero-shot grounding localizer: each Qwen family's own box format, the grid mapping, fallback, cost, CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from crop.data.synth import generate_sample, pixel_box_to_grid
from crop.errors import CropInputError
from crop.localizers import GroundingLocalizer, make_localizer
from crop.localizers.grounding import (
    GROUNDING_FORMATS,
    QWEN2_5_VL,
    QWEN2_VL,
    QWEN3_VL,
    boxes_to_grid,
    grounding_format,
    parse_bbox_2d,
    parse_box_tokens,
    read_grounding,
)
from crop.regions import GridBox
from tests.conftest import random_image, tiny

FULL = GridBox.full(8)


# -- parsing each family's documented answer --------------------------------------------------------


def test_parse_qwen25_and_qwen3_json_answers():
    fenced = ('```json\n[\n\t{"bbox_2d": [135, 114, 516, 672], "label": "the star"},\n'
              '\t{"bbox_2d": [ 10 ,20, 30.5, 40 ], "label": "card"}\n]\n```')
    assert parse_bbox_2d(fenced) == [(135, 114, 516, 672), (10, 20, 30.5, 40)]
    assert parse_bbox_2d('{"bbox_2d": [1, 2, 3, 4]}') == [(1, 2, 3, 4)]  # one object, no list, no fence
    assert parse_bbox_2d("Sure! [{'bbox_2d': [-5, 0, 1200, 999], 'label': 'x'}]") == [(-5, 0, 1200, 999)]
    cut = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7'  # decode budget ran out
    assert parse_bbox_2d(cut) == [(1, 2, 3, 4)]
    for garbage in ("", "no box here", "[1, 2, 3, 4]", '{"bbox_2d": [1, 2, 3]}', "(1,2),(3,4)"):
        assert parse_bbox_2d(garbage) == []


def test_parse_qwen2_box_tokens():
    text = ("<|object_ref_start|>the star<|object_ref_end|><|box_start|>(176,106),(232,160)<|box_end|> and "
            "<|object_ref_start|>card<|object_ref_end|><|box_start|>( 1 , 2 ) , ( 3 , 4 )<|box_end|><|im_end|>")
    assert parse_box_tokens(text) == [(176, 106, 232, 160), (1, 2, 3, 4)]
    assert parse_box_tokens("the star(176,106),(232,160)") == [(176, 106, 232, 160)]  # special tokens skipped
    for garbage in ("", "(1,2)", "[1, 2, 3, 4]", '{"bbox_2d": [1, 2, 3, 4]}', "(a,b),(c,d)"):
        assert parse_box_tokens(garbage) == []


def test_every_supported_model_type_has_a_format_and_others_are_refused():
    assert grounding_format("qwen2_vl") is QWEN2_VL and grounding_format("qwen2_5_vl") is QWEN2_5_VL
    assert grounding_format("qwen3_vl") is grounding_format("qwen3_vl_moe") is QWEN3_VL
    with pytest.raises(ValueError, match="'llava'.*supported: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe"):
        grounding_format("llava")


# -- the box on the grid: the training data's overlap rule ----------------------------------------


def test_relative_boxes_map_by_the_original_size():
    # 400x300 image; 0..1000 -> x 100..200 px, y 0..150 px -> cells x 2..3, y 0..3
    loc = read_grounding('[{"bbox_2d": [250, 0, 500, 500]}]', QWEN3_VL, (400, 300), 8)
    assert loc.box == GridBox(2, 0, 3, 3) and not loc.fallback
    assert loc.box.as_list() == pixel_box_to_grid([100, 0, 200, 150], (400, 300), 8)
    qwen2 = read_grounding("<|box_start|>(250,0),(500,500)<|box_end|>", QWEN2_VL, (400, 300), 8)
    assert qwen2.box == loc.box
    assert read_grounding('{"bbox_2d": [250, 0, 500, 500]}', QWEN3_VL, (400, 300), 16).box == GridBox(4, 0, 7, 7, 16)


def test_qwen25_boxes_are_pixels_of_the_resized_input():
    # the model saw 364x280 (image_grid_thw 20x26 patches of 14); the box is in those pixels
    answer = '```json\n[{"bbox_2d": [91, 70, 182, 140], "label": "star"}]\n```'
    loc = read_grounding(answer, QWEN2_5_VL, (400, 300), 8, input_size=(364, 280))
    assert loc.box.as_list() == pixel_box_to_grid([100, 75, 200, 150], (400, 300), 8) == [2, 2, 3, 3]
    assert read_grounding(answer, QWEN3_VL, (400, 300), 8).box != loc.box  # read as 0..1000 it would be elsewhere
    with pytest.raises(ValueError, match="input_size"):
        read_grounding(answer, QWEN2_5_VL, (400, 300), 8)


def test_several_boxes_union_reversed_corners_and_clamping():
    two = '[{"bbox_2d": [0, 0, 100, 100]}, {"bbox_2d": [800, 700, 900, 1000]}]'
    assert read_grounding(two, QWEN3_VL, (800, 800), 8).box == GridBox(0, 0, 7, 7)
    assert read_grounding('{"bbox_2d": [500, 500, 250, 0]}', QWEN3_VL, (400, 300), 8).box == GridBox(2, 0, 3, 3)
    assert read_grounding("(500,500),(250,0)", QWEN2_VL, (400, 300), 8).box == GridBox(2, 0, 3, 3)
    # out of range: clamped to the image
    assert read_grounding('{"bbox_2d": [-40, -1, 130, 1250]}', QWEN3_VL, (800, 800), 8).box == GridBox(0, 0, 1, 7)
    # an empty box beside a good one is ignored
    mixed = '[{"bbox_2d": [10, 10, 10, 500]}, {"bbox_2d": [0, 0, 120, 120]}]'
    assert read_grounding(mixed, QWEN3_VL, (800, 800), 8).box == GridBox(0, 0, 0, 0)


@pytest.mark.parametrize("answer,fmt", [
    ("garbage", QWEN3_VL),
    ("", QWEN2_VL),
    ('{"bbox_2d": [300, 300, 300, 600]}', QWEN3_VL),  # a line: no area
    ('{"bbox_2d": [1100, 0, 1400, 500]}', QWEN3_VL),  # entirely right of the image
    ('{"bbox_2d": [-300, -300, -1, -1]}', QWEN3_VL),  # entirely above-left
    ("(100,100),(100,100)", QWEN2_VL),  # a point
    ("(100,100),(200,200)", QWEN3_VL),  # the other family's format
    ('{"bbox_2d": [100, 100, 200, 200]}', QWEN2_VL),
    ('{"bbox_2d": [0.2, 0.2, 0.4, 0.4]}', QWEN3_VL),  # 0..1 fractions: under one pixel of a 400 px image
])
def test_unusable_answers_fall_back_to_the_full_image_flagged(answer, fmt, caplog):
    with caplog.at_level(logging.WARNING):
        loc = read_grounding(answer, fmt, (400, 300), 8, input_size=(364, 280))
    assert loc.box == FULL and loc.fallback and loc.raw == answer
    assert any("unusable" in r.message for r in caplog.records)


def _corners(box: list[int]) -> str:
    """``box`` as Qwen2-VL writes a box: ``(x1,y1),(x2,y2)``."""
    x1, y1, x2, y2 = box
    return f"({x1},{y1}),({x2},{y2})"


def test_a_perfect_answer_reproduces_the_synthetic_grid_box():
    """A model that writes the ground truth in its own format gets exactly the training data's grid box."""
    for index in range(12):
        s = generate_sample(index, split="test")
        w, h = s.image.size
        rel = [round(v * 1000 / side) for v, side in zip(s.box_px, (w, h, w, h), strict=True)]
        assert read_grounding(f'{{"bbox_2d": {rel}}}', QWEN3_VL, (w, h), 8).box.as_list() == s.box_grid
        assert read_grounding(_corners(rel), QWEN2_VL, (w, h), 8).box.as_list() == s.box_grid
        px = [round(v * 448 / w) for v in s.box_px]  # Qwen2.5-VL upscaled the image to 448x448
        assert read_grounding(f'{{"bbox_2d": {px}}}', QWEN2_5_VL, (w, h), 8, (448, 448)).box.as_list() == s.box_grid


def test_boxes_to_grid_is_none_without_a_usable_box():
    assert boxes_to_grid([], (1.0, 1.0), (100, 100), 8) is None
    assert boxes_to_grid([(5, 5, 5.2, 60)], (1.0, 1.0), (100, 100), 8) is None  # rounds to zero width
    assert boxes_to_grid([(5, 5, 5.6, 60)], (1.0, 1.0), (100, 100), 8) == GridBox(0, 0, 0, 4)


# -- the localizer on real (tiny, random) models ------------------------------------------------------


class _Scripted(torch.nn.Module):
    """A tiny Qwen whose ``generate`` writes scripted replies (a test double for a real instruct model)."""

    def __init__(self, model, tokenizer, replies):
        super().__init__()
        self.inner, self.tokenizer, self.replies = model, tokenizer, list(replies)
        self.config, self.generation_config = model.config, model.generation_config
        self.calls: list[dict] = []

    def generate(self, input_ids, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        rows = [self.tokenizer(self.replies.pop(0) if self.replies else "no box", add_special_tokens=False)["input_ids"]
                + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")] for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        rows = [r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_qwen25_localizer_reads_boxes_in_the_input_it_fed():
    model, proc = tiny("tiny-random-qwen2.5-vl")
    images = [random_image(1, (400, 300)), random_image(2, (200, 300))]
    questions = ["What color is the star?", "How many cards are there on the table to the left?"]
    probe = GroundingLocalizer(model, proc).prepare(images, questions)
    assert probe["image_grid_thw"].tolist() == [[1, 20, 26], [1, 22, 14]]  # 364x280 and 196x308 pixels
    replies = ['```json\n[{"bbox_2d": [91, 70, 182, 140], "label": "star"}]\n```', "I cannot tell."]
    scripted = _Scripted(model, proc.tokenizer, replies)
    loc = GroundingLocalizer(scripted, proc, batch_size=2)
    side = proc.tokenizer.padding_side
    results = loc.localize(images, questions)
    assert results[0].box == GridBox(2, 2, 3, 3) and not results[0].fallback
    assert results[0].raw.startswith("```json") and "<|im_end|>" not in results[0].raw
    assert results[1].box == FULL and results[1].fallback and results[1].raw == "I cannot tell."
    call = scripted.calls[0]
    assert call["do_sample"] is False and call["max_new_tokens"] == 128 and call["stopping_criteria"] is None
    mask = call["attention_mask"]
    assert not mask[:, 0].all() and mask[:, -1].all()  # the shorter prompt is padded on the left
    assert proc.tokenizer.padding_side == side
    prompt = proc.batch_decode(call["input_ids"])[1]
    assert "report the bbox coordinates in JSON format" in prompt and questions[1] in prompt
    assert prompt.index("<|vision_start|>") < prompt.index("Locate")


def test_qwen2_localizer_prompts_with_object_ref_tokens_and_reads_box_tokens():
    model, proc = tiny("tiny-random-qwen2-vl")
    scripted = _Scripted(model, proc.tokenizer, ["<|object_ref_start|>star<|object_ref_end|>"
                                                 "<|box_start|>(250,0),(500,500)<|box_end|>"])
    [result] = GroundingLocalizer(scripted, proc, grid=16).localize([random_image(3, (400, 300))], ["Which star?"])
    assert result.box == GridBox(4, 0, 7, 7, 16) and not result.fallback
    assert result.raw.endswith("<|box_end|>")
    prompt = proc.batch_decode(scripted.calls[0]["input_ids"])[0]
    assert '<|object_ref_start|>the region of the image needed to answer the question "Which star?"' in prompt


def test_custom_prompt_and_bad_arguments():
    model, proc = tiny("tiny-random-qwen2-vl")
    loc = GroundingLocalizer(model, proc, prompt="Box for: {question}")
    assert loc.messages(" Why? ")[0]["content"][1]["text"] == "Box for: Why?"
    with pytest.raises(ValueError, match="question"):
        GroundingLocalizer(model, proc, prompt="no field")
    with pytest.raises(ValueError, match="max_new_tokens"):
        GroundingLocalizer(model, proc, max_new_tokens=0)
    llava, llava_proc = tiny("tiny-random-llava")
    with pytest.raises(ValueError, match="supported: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe"):
        GroundingLocalizer(llava, llava_proc)


@pytest.mark.parametrize("name", ["tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl"])
def test_random_models_answer_gibberish_and_fall_back_flagged(name):
    from crop.eval.flops import vlm_localization_flops

    model, proc = tiny(name)
    loc = GroundingLocalizer(model, proc, max_new_tokens=8)
    images = [random_image(4), random_image(5, (200, 300))]
    results = loc.localize(images, ["Where is the dog?", "What number is on the card?"])
    assert [r.box for r in results] == [FULL, FULL] and all(r.fallback for r in results)
    assert all(isinstance(r.raw, str) and r.raw for r in results)
    assert vlm_localization_flops(loc, "Where is the dog?", images[0]) > 0  # its cost is counted


def _tiny_qwen3_vl():
    """A seeded random Qwen3-VL (2 layers, 64 wide, DeepStack at vision block 0) and an image-only processor."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen3-VL")
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from crop.models.processors import qwen_image_only_processor_class
    from crop.models.tiny import qwen_tokenizer
    from crop.models.tokenizers import QWEN_CHAT_TEMPLATE

    tok = qwen_tokenizer("bytes")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=320 * 320, patch_size=16, merge_size=2,
                                               temporal_patch_size=2)
    proc = qwen_image_only_processor_class(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                             chat_template=QWEN_CHAT_TEMPLATE)
    # Qwen3VLProcessor sets these after ProcessorMixin.__init__, which the image-only class calls directly
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    proc.vision_start_token_id, proc.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    return model, proc


def test_qwen3_vl_relative_boxes_and_random_fallback():
    from crop.eval.flops import vlm_localization_flops

    model, proc = _tiny_qwen3_vl()
    assert model.config.model_type == "qwen3_vl"
    images = [random_image(6, (400, 300)), random_image(7, (200, 300))]
    questions = ["What color is the star?", "Which card is red?"]
    results = GroundingLocalizer(model, proc, max_new_tokens=8).localize(images, questions)
    assert [r.box for r in results] == [FULL, FULL] and all(r.fallback and isinstance(r.raw, str) for r in results)
    scripted = _Scripted(model, proc.tokenizer, ['```json\n[{"bbox_2d": [250, 0, 500, 500], "label": "star"}]\n```'])
    [found] = GroundingLocalizer(scripted, proc).localize(images[:1], questions[:1])
    assert found.box == GridBox(2, 0, 3, 3) and not found.fallback  # 0..1000 of the original, not input pixels
    assert vlm_localization_flops(GroundingLocalizer(model, proc, max_new_tokens=4), questions[0], images[0]) > 0


# -- through make_localizer, the pipeline and crop eval ------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """A tiny random Qwen2-VL saved as a checkpoint folder (what a hub snapshot looks like)."""
    model, proc = tiny("tiny-random-qwen2-vl")
    folder = tmp_path_factory.mktemp("qwen2-vl-instruct")
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def test_make_localizer_grounding_through_the_pipeline(qwen2_folder, llava_sdpa):
    from crop.config import CropILPConfig
    from crop.pipeline import CropPipeline

    loc = make_localizer(f"grounding:{qwen2_folder}", device="cpu")
    assert isinstance(loc, GroundingLocalizer) and loc.format is QWEN2_VL and loc.grid == 8
    model, proc = llava_sdpa
    pipe = CropPipeline(model, proc, loc, CropILPConfig(keep_tokens=64))
    result = pipe(random_image(8), "What color is the star?", max_new_tokens=2)
    assert result.localizer_fallback and isinstance(result.localizer_output, str) and result.box == [0, 0, 7, 7]
    assert result.timings["localizer_s"] > 0
    # a grounding answer that parses: its region goes to the answerer
    inner = loc.model
    loc.model = _Scripted(inner, loc.processor.tokenizer, ["<|box_start|>(0,0),(500,500)<|box_end|>"])
    result = pipe(random_image(8), "What color is the star?", max_new_tokens=2)
    assert result.box == [0, 0, 3, 3] and not result.localizer_fallback
    assert result.visual_tokens_kept == {"llm_input": 576, "after_layer_2": 64}


def test_make_localizer_grounding_errors(tmp_path):
    with pytest.raises(CropInputError, match="needs a model"):
        make_localizer("grounding:")
    llava, _ = tiny("tiny-random-llava")
    llava.config.save_pretrained(tmp_path)  # a config without weights: refused before loading any
    with pytest.raises(CropInputError, match="'llava' has no known grounding format; supported: qwen2_vl"):
        make_localizer(f"grounding:{tmp_path}")
    assert set(GROUNDING_FORMATS) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def test_crop_eval_reports_the_grounding_localizers_iou_and_containment(qwen2_folder, tmp_path):
    from crop.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-random-llava", "--localizer", f"grounding:{qwen2_folder}", "--n", "3",
                 "--batch-size", "3", "--keep-tokens", "64", "--methods", "full,crop-ilp", "--max-new-tokens", "1",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["localizer"] == f"grounding:{qwen2_folder}" and results["localizer_gflops"] > 0
    loc = results["localization"]["all"]
    samples = [generate_sample(i, split="test") for i in range(3)]
    assert loc["n"] == 3 and loc["fallbacks"] == 3  # random weights: every answer falls back, flagged
    assert loc["contains_gt"] == 1.0  # the full image contains every ground truth ...
    expected = sum(GridBox.from_list(s.box_grid).area / 64 for s in samples) / 3  # ... with IoU = its share
    assert loc["mean_iou"] == pytest.approx(expected)
    ilp = next(r for r in results["runs"] if r["method"] == "crop-ilp")
    assert all(p["fallback"] for p in ilp["predictions"]) and all(p["flops"]["localizer"] > 0
                                                                   for p in ilp["predictions"])


def test_eval_localization_metrics_of_a_grounding_localizer_that_finds_the_box():
    from crop.eval.runner import EvalSpec, load_samples, run_eval

    model, proc = tiny("tiny-random-llava")
    qwen, qproc = tiny("tiny-random-qwen2-vl")
    spec = EvalSpec(methods=["crop-ilp"], keep_tokens=[64], n=3, split="test", batch_size=3, max_new_tokens=1)
    samples = load_samples(spec)
    replies = []
    for s in samples:  # the ground truth, as Qwen2-VL writes boxes (0..1000)
        w, h = s.image.size
        replies.append(_corners([round(v * 1000 / d) for v, d in zip(s.box_px, (w, h, w, h), strict=True)]))
    replies[2] = "garbage"
    loc = GroundingLocalizer(_Scripted(qwen, qproc.tokenizer, replies), qproc)
    results = run_eval(model, proc, loc, spec, "grounding:scripted", "tiny-random-llava")
    metrics = results["localization"]["all"]
    full_iou = GridBox.from_list(samples[2].box_grid).area / 64
    assert metrics["n"] == 3 and metrics["fallbacks"] == 1 and metrics["contains_gt"] == 1.0
    assert metrics["mean_iou"] == pytest.approx((1 + 1 + full_iou) / 3)
    ilp = next(r for r in results["runs"] if r["method"] == "crop-ilp")
    assert [p["box"] for p in ilp["predictions"]] == [s.box_grid for s in samples[:2]] + [[0, 0, 7, 7]]
    assert [p["fallback"] for p in ilp["predictions"]] == [False, False, True]
