"""Checkpoints in the hub layout load without torchvision (issue 28, item 3), and the real-geometry configs.

A Qwen2-VL / Qwen2.5-VL checkpoint names its stock processor (``Qwen2VLProcessor``,
``Qwen2_5_VLProcessor``) and a video processor, which needs torchvision; ``load_model`` must
still return a working model and an image-only processor. The folders below hold the files the
way the hub has them (file names and keys of Qwen/Qwen2.5-VL-7B-Instruct's
``preprocessor_config.json`` and ``chat_template.json``, a Qwen2.5-VL ``video_preprocessor_config.json``,
tokenizer files naming the processor class) or the way ``save_pretrained`` of the stock processor
writes them in transformers 5 (one ``processor_config.json`` with the image and video processors,
``chat_template.jinja``), around a tiny random model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crop.errors import CropInputError
from crop.localizers import make_localizer
from crop.methods import build_config
from crop.models import loading
from crop.models.loading import load_model
from crop.models.processors import save_hub_layout
from crop.models.real_geometry import (
    FULL_DEPTH_NAMES,
    QWEN_VL_CHAT_TEMPLATE,
    REAL_GEOMETRY_NAMES,
    build_real_geometry,
    llava_15_tokenizer,
    qwen25_tokenizer,
)
from crop.models.tiny import build_tiny_llava, build_tiny_qwen
from crop.pipeline import CropPipeline
from tests.conftest import chat_inputs, random_image

STOCK = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json (350 bytes; the same keys and values in
# Qwen/Qwen2-VL-7B-Instruct's, 347 bytes, with "Qwen2VLProcessor")
HUB_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                    "image_processor_type": "Qwen2VLImageProcessor"}
# a Qwen2.5-VL video_preprocessor_config.json (hf-tiny-v2/tiny-random-Qwen2_5_VLForConditionalGeneration @ e05c980)
HUB_VIDEO_PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                          "do_sample_frames": False, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "max_frames": 768,
                          "merge_size": 2, "min_frames": 4, "patch_size": 14, "resample": 3,
                          "rescale_factor": 0.00392156862745098, "return_metadata": False,
                          "size": {"longest_edge": 12845056, "shortest_edge": 3136}, "temporal_patch_size": 2,
                          "video_processor_type": "Qwen2VLVideoProcessor"}


# Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json and video_preprocessor_config.json (16 px patches, mean/std 0.5)
QWEN3_HUB_PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                          "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                          "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast"}
QWEN3_HUB_VIDEO_PREPROCESSOR = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                                "image_std": [0.5, 0.5, 0.5], "fps": 2, "do_sample_frames": True,
                                "min_frames": 4, "max_frames": 768, "processor_class": "Qwen3VLProcessor",
                                "video_processor_type": "Qwen3VLVideoProcessor"}
HUB_FILES = {"qwen2_vl": (HUB_PREPROCESSOR, HUB_VIDEO_PREPROCESSOR),
             "qwen2_5_vl": (HUB_PREPROCESSOR, HUB_VIDEO_PREPROCESSOR),
             "qwen3_vl": (QWEN3_HUB_PREPROCESSOR, QWEN3_HUB_VIDEO_PREPROCESSOR)}


# the image processor's geometry as transformers 5 saves it, per version
HUB_SIZES = {version: {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "patch_size": 14,
                       "size": {"longest_edge": 12845056, "shortest_edge": 3136}}
             for version in ("qwen2_vl", "qwen2_5_vl")}
HUB_SIZES["qwen3_vl"] = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16,
                         "size": {"longest_edge": 16777216, "shortest_edge": 65536}}


def _write(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2) if not isinstance(content, str) else content)


def _tokenizer_files(tokenizer, folder: Path, processor_class: str) -> None:
    tokenizer.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    _write(folder / "tokenizer_config.json", {**config, "processor_class": processor_class})


def hub_qwen_folder(folder: Path, version: str, layout: str):
    """A tiny random Qwen checkpoint with the stock processor's files in ``layout``; returns the in-memory model."""
    model, proc = build_tiny_qwen(version)
    model.save_pretrained(str(folder))
    stock = STOCK[version]
    _tokenizer_files(proc.tokenizer, folder, stock)
    preprocessor, video = HUB_FILES[version]
    if layout == "hub":  # the files a hub download brings
        _write(folder / "preprocessor_config.json", {**preprocessor, "processor_class": stock})
        _write(folder / "video_preprocessor_config.json", video)
        _write(folder / "chat_template.json", {"chat_template": QWEN_VL_CHAT_TEMPLATE})
    else:  # "save_pretrained": what transformers 5's stock processor save writes
        image = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "resample": 3,
                 "rescale_factor": 0.00392156862745098, "temporal_patch_size": 2, **HUB_SIZES[version]}
        _write(folder / "processor_config.json", {"image_processor": image, "processor_class": stock,
                                                  "video_processor": video})
        _write(folder / "chat_template.jinja", QWEN_VL_CHAT_TEMPLATE)
    return model


@pytest.mark.parametrize("layout", ["hub", "save_pretrained"])
@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_hub_layout_qwen_loads_without_torchvision_and_answers(tmp_path, version, layout):
    reference = hub_qwen_folder(tmp_path, version, layout)
    model, proc = load_model(str(tmp_path))
    # the stock class's image-only variant, with the checkpoint's own image processor and chat template
    assert type(proc).__name__ == f"{STOCK[version]}ImageOnly"
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert proc.image_processor.size == HUB_SIZES[version]["size"]
    assert proc.image_processor.patch_size == HUB_SIZES[version]["patch_size"]
    assert "You are a helpful assistant." in proc.chat_template
    inputs = chat_inputs(proc, [random_image(1)], ["What is it?"])
    assert inputs["input_ids"].tolist()[0].count(model.config.image_token_id) == int(inputs["image_grid_thw"][0].prod()) // 4
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)  # the saved weights
    pipe = CropPipeline(model, proc, make_localizer("box:1,1,4,4"), build_config("crop-ilp", 16))
    result = pipe(random_image(2), "What color is the star?", max_new_tokens=2)
    assert isinstance(result.answer, str)
    assert result.visual_tokens_kept["after_layer_2"] == 16 < result.visual_tokens_kept["llm_input"]


def test_other_import_errors_are_not_hidden(tmp_path, monkeypatch):
    hub_qwen_folder(tmp_path, "qwen2_5_vl", "hub")

    def needs_another_package(*args, **kwargs):
        raise ImportError("Qwen2_5_VLProcessor requires the foo library")

    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", needs_another_package)
    with pytest.raises(CropInputError, match="requires the foo library"):
        load_model(str(tmp_path))


def test_hub_layout_writer_llava_round_trip(tmp_path):
    model, proc = build_tiny_llava()
    model.save_pretrained(str(tmp_path))
    files = save_hub_layout(proc, tmp_path, "LlavaProcessor",
                            processor_kwargs={"patch_size": 14, "vision_feature_select_strategy": "default",
                                              "num_additional_image_tokens": 1})
    assert {"preprocessor_config.json", "processor_config.json", "chat_template.json", "tokenizer_config.json"} <= set(files)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["processor_class"] == "LlavaProcessor"
    loaded, loaded_proc = load_model(str(tmp_path))
    inputs = chat_inputs(loaded_proc, [random_image(1)], ["What?"])
    assert inputs["input_ids"].tolist() == chat_inputs(proc, [random_image(1)], ["What?"])["input_ids"].tolist()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_hub_layout_writer_qwen_names_the_stock_classes(tmp_path):
    model, proc = build_tiny_qwen("qwen2_5_vl")
    model.save_pretrained(str(tmp_path))
    save_hub_layout(proc, tmp_path, "Qwen2_5_VLProcessor", video=True)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    video = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (pre["image_processor_type"], pre["processor_class"]) == ("Qwen2VLImageProcessor", "Qwen2_5_VLProcessor")
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and tok["processor_class"] == "Qwen2_5_VLProcessor"
    assert (pre["min_pixels"], pre["max_pixels"]) == (56 * 56, 336 * 336)  # the tiny model's bounds, as the hub names them
    loaded, loaded_proc = load_model(str(tmp_path))
    inputs = chat_inputs(loaded_proc, [random_image(1)], ["What?"])
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


# -- the 7B real-geometry models: configs only (no weights allocated) ----------------------------


@pytest.mark.parametrize("name,layers,params", [
    ("llava-1.5-7b-geometry", 32, 7_063_427_072),  # llava-hf/llava-1.5-7b-hf: 7.06B parameters
    ("qwen2.5-vl-7b-geometry", 28, 8_292_166_656),  # Qwen/Qwen2.5-VL-7B-Instruct: 8.29B parameters
])
def test_real_geometry_at_full_depth_has_the_checkpoints_parameter_count(name, layers, params):
    model, _ = build_real_geometry(name, decoder_layers=layers, device="meta")
    assert sum(p.numel() for p in model.parameters()) == params
    two, _ = build_real_geometry(name, device="meta")  # the CPU variant: 2 decoder layers, everything else equal
    assert two.config.get_text_config().num_hidden_layers == 2 and two.dtype == torch.bfloat16
    full, _ = build_real_geometry(f"{name}-full", device="meta")  # the GPU-timing name: the checkpoint's depth
    assert sum(p.numel() for p in full.parameters()) == params and f"{name}-full" in FULL_DEPTH_NAMES


def test_real_geometry_tokenizers_have_the_real_ids():
    llava = llava_15_tokenizer()
    assert len(llava) == 32002 and llava.convert_tokens_to_ids(["<image>", "<pad>", "<s>", "</s>"]) == [32000, 32001, 1, 2]
    qwen = qwen25_tokenizer()
    ids = qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                                      "<|video_pad|>", "<|file_sep|>"])
    assert len(qwen) == 151665 and ids == [151643, 151645, 151652, 151655, 151656, 151664]
    assert (qwen.eos_token_id, qwen.pad_token_id) == (151645, 151643)
    assert qwen.decode(qwen("a <|image_pad|> b").input_ids) == "a <|image_pad|> b"


def test_real_geometry_llava_processor_is_the_hub_one(tmp_path):
    from crop.models.real_geometry import llava_15_7b_processor

    proc = llava_15_7b_processor()
    save_hub_layout(proc, tmp_path, "LlavaProcessor")
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["crop_size"] == {"height": 336, "width": 336}
    inputs = chat_inputs(proc, [random_image(1)], ["What?"])
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    assert inputs["input_ids"][0].tolist().count(32000) == 576


def test_load_model_builds_real_geometry_names_in_the_target_dtype(monkeypatch):
    calls = []

    def fake(name, dtype, device, attn_implementation):
        calls.append((name, dtype, str(device), attn_implementation))
        return build_tiny_llava()

    monkeypatch.setattr(loading, "build_real_geometry", fake)
    model, _ = load_model(REAL_GEOMETRY_NAMES[0], dtype="bfloat16")
    assert calls == [("llava-1.5-7b-geometry", torch.bfloat16, "cpu", "sdpa")] and model.dtype == torch.bfloat16
    load_model("llava-1.5-7b-geometry-full", dtype="bfloat16")  # built where it will run (here the CPU)
    assert calls[-1] == ("llava-1.5-7b-geometry-full", torch.bfloat16, "cpu", "sdpa")
