"""The embedded models: shipped weights load and run; save/load round-trips; missing weights are clear."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from crop.embedded import (
    WEIGHTS_DIR,
    build_from_shape,
    embedded_dir,
    load_embedded_answerer,
    load_embedded_from,
    load_embedded_localizer,
    load_embedded_metadata,
    save_embedded,
)
from crop.models.tiny import LlavaShape, QwenShape

TINY_LLAVA = asdict(LlavaShape(image_size=112, patch_size=14, vision_hidden=32, text_hidden=32, text_intermediate=64,
                               text_layers=2))
TINY_QWEN = asdict(QwenShape(vision_hidden=32, text_hidden=32, text_heads=2, text_kv_heads=1, text_intermediate=64,
                             text_layers=2, min_pixels=112 * 112, max_pixels=112 * 112))
# the shipped localizer's geometry: 28 px patches, no merge (one LLM token per patch)
TINY_QWEN_P28 = dict(TINY_QWEN, patch_size=28, merge_size=1)


@pytest.fixture(scope="module")
def sample():
    from crop.data.synth import generate_sample

    return generate_sample(1, seed=0, split="test")  # a text question


def test_shipped_answerer_loads_and_answers(sample):
    from transformers import LlavaForConditionalGeneration

    from crop.train.answerer import answerer_prompt

    model, processor = load_embedded_answerer()
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert grid % 8 == 0
    inputs = processor(images=[sample.image], text=[answerer_prompt(processor, sample.question)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == grid * grid
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert isinstance(text, str)
    meta = load_embedded_metadata("answerer")
    assert meta["architecture"] == "llava" and "metrics" in meta["training"]
    assert (WEIGHTS_DIR / "answerer" / "MODEL_CARD.md").is_file()


def test_shipped_localizer_emits_a_box(sample):
    from transformers import Qwen2VLForConditionalGeneration

    from crop.localizers import make_localizer

    localizer = make_localizer("embedded")  # what `crop answer` uses
    assert isinstance(localizer.model, Qwen2VLForConditionalGeneration)
    (result,) = localizer.localize([sample.image], [sample.question])
    assert result.box.grid == 8
    meta = load_embedded_metadata("localizer")
    assert meta["architecture"] == "qwen2_vl" and meta["grid"] == 8
    assert localizer.image_first == meta.get("image_first", True)


def test_the_shipped_answerer_is_the_neutral_judge():
    """Issue 13: image-first like real LLaVA-1.5, >= 12 LM layers, no signal from the question's region."""
    from crop.train.answerer import answerer_prompt

    meta = load_embedded_metadata("answerer")
    assert meta["shape"]["text_layers"] >= 12 and meta["shape"]["question_first"] is False
    assert meta["training"]["config"]["attn_weight"] == 0  # no attention supervision toward the box
    _, processor = load_embedded_answerer()
    assert answerer_prompt(processor, "Where?") == "USER: <image>\nWhere? ASSISTANT:"
    card = (WEIGHTS_DIR / "answerer" / "MODEL_CARD.md").read_text(encoding="utf-8")
    not_used = next(line for line in card.splitlines() if line.startswith("- **Not used:**"))
    assert "attention supervision" in not_used and "region-membership probes" in not_used


def test_the_shipped_compressor_belongs_to_the_shipped_answerer():
    """Issue 17: a trained PLC compressor ships for the default answerer, trained with the default setting."""
    from crop.compressor import load_compressor
    from crop.config import CropPLCTrainedConfig
    from crop.methods.plc_trained import DEFAULT_COMPRESSOR

    compressor, meta = load_compressor(DEFAULT_COMPRESSOR)
    model, _ = load_embedded_answerer()
    assert compressor.config.dim == model.config.text_config.hidden_size
    default = CropPLCTrainedConfig()
    assert {k: meta["method"][k] for k in ("anchors", "attend", "context_share")} == {
        "anchors": default.anchors, "attend": default.attend, "context_share": default.context_share}
    assert (DEFAULT_COMPRESSOR / "MODEL_CARD.md").is_file()


def test_shipped_weights_are_small():
    for path in (WEIGHTS_DIR / "answerer" / "model.safetensors", WEIGHTS_DIR / "localizer" / "model.safetensors",
                 WEIGHTS_DIR / "plc-compressor" / "compressor.safetensors"):
        assert path.stat().st_size < 12 * 2**20, f"{path} is {path.stat().st_size} bytes"


@pytest.mark.parametrize("architecture,shape", [("llava", TINY_LLAVA), ("qwen2_vl", TINY_QWEN),
                                                ("qwen2_vl", TINY_QWEN_P28)])
def test_save_load_round_trip(tmp_path, architecture, shape, sample):
    torch.manual_seed(0)
    model, processor = build_from_shape(architecture, shape)
    save_embedded(model, architecture, shape, tmp_path / "m", meta={"note": "test"}, card="# card\n")
    loaded, processor2 = load_embedded_from(tmp_path / "m")
    assert type(loaded) is type(model)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (tmp_path / "m" / "MODEL_CARD.md").read_text() == "# card\n"
    assert (tmp_path / "m" / "config.json").is_file()
    # same outputs on a real input
    if architecture == "llava":
        from crop.train.answerer import answerer_prompt as prompt
    else:
        from crop.train.localizer import localizer_chat as prompt
    inputs = processor2(images=[sample.image], text=[prompt(processor2, sample.question)], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


@pytest.mark.parametrize("patch,merge", [(14, 2), (28, 1)])
def test_qwen_shape_sets_the_token_grid(patch, merge, sample):
    """Both geometries give one LLM token per 28 px square: 4x4 = 16 image tokens at 112 px."""
    model, processor = build_from_shape("qwen2_vl", dict(TINY_QWEN, patch_size=patch, merge_size=merge))
    assert model.config.vision_config.patch_size == patch
    assert model.config.vision_config.spatial_merge_size == merge
    from crop.train.localizer import localizer_chat

    inputs = processor(images=[sample.image], text=[localizer_chat(processor, sample.question)], return_tensors="pt")
    assert inputs["pixel_values"].shape == (16 * merge * merge, 3 * 2 * patch * patch)  # (patches, C * T * p * p)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_missing_weights_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="crop train answerer"):
        load_embedded_answerer(tmp_path)
    with pytest.raises(FileNotFoundError, match="crop train localizer"):
        load_embedded_localizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_embedded_metadata("answerer", tmp_path)


def test_bad_kind_and_shape_raise(tmp_path):
    with pytest.raises(ValueError, match="answerer"):
        embedded_dir("nope")
    with pytest.raises(ValueError, match="unknown LlavaShape fields"):
        build_from_shape("llava", {"bogus": 1})
    with pytest.raises(ValueError, match="architecture"):
        build_from_shape("gpt", {})
