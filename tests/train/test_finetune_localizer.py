"""The localizer fine-tuning recipe for real checkpoints, run end to end on a tiny random Qwen2-VL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from crop.data.region_vqa import ocr_answer_box, read_region_jsonl, to_grid_box
from crop.data.synth import generate
from crop.models.tiny import build_tiny_qwen
from crop.regions import GridBox
from crop.train.finetune_localizer import FinetuneConfig, build_batch, finetune_localizer


@pytest.fixture(scope="module")
def region_jsonl(tmp_path_factory):
    """Six synthetic samples written in four annotation styles."""
    root = tmp_path_factory.mktemp("regions")
    lines = []
    for i, s in enumerate(generate(6, seed=3, split="val")):
        name = f"img{i}.png"
        s.image.save(root / name)
        rec = {"image": name, "question": s.question, "answer": s.answer}
        if i % 3 == 0:
            rec["box_grid"] = list(s.box_grid)
        elif i % 3 == 1:
            rec["box_px"] = list(s.box_px)
        else:
            x0, y0, x1, y1 = s.box_px
            rec["phrase_boxes_px"] = [[x0, y0, (x0 + x1) // 2 + 1, y1], [(x0 + x1) // 2, y0, x1, y1]]
        lines.append(json.dumps(rec))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rounding_rule_and_styles():
    assert to_grid_box({"box_px": [0, 0, 42, 42]}, 336, 336) == GridBox(0, 0, 0, 0)
    assert to_grid_box({"box_px": [41, 0, 43, 10]}, 336, 336) == GridBox(0, 0, 1, 0)  # 1 px of overlap counts
    assert to_grid_box({"box_px": [0, 0, 400, 400]}, 336, 336) == GridBox.full()  # clipped to the image
    assert to_grid_box({"phrase_boxes_px": [[0, 0, 10, 10], [300, 300, 336, 336]]}, 336, 336) == GridBox.full()
    assert to_grid_box({"box_grid": [1, 2, 3, 4]}, 10, 10) == GridBox(1, 2, 3, 4)
    ocr = [{"text": "Stop", "box_px": [100, 100, 140, 120]}, {"text": "here", "box_px": [0, 0, 20, 20]},
           {"text": "now!", "box_px": [150, 100, 190, 120]}]
    assert ocr_answer_box(ocr, "stop now") == [100, 100, 190, 120]
    assert to_grid_box({"ocr": ocr, "answer": "stop now"}, 336, 336) == GridBox(2, 2, 4, 2)
    for bad in [{}, {"box_grid": [0, 0, 1, 1], "box_px": [0, 0, 5, 5]}, {"box_grid": [0, 0, 9, 9]},
                {"ocr": ocr, "answer": "missing"}, {"ocr": ocr}, {"box_px": [50, 50, 40, 60]}]:
        with pytest.raises(ValueError):
            to_grid_box(bad, 336, 336)


def test_read_region_jsonl_reports_file_and_line(tmp_path, region_jsonl):
    samples = read_region_jsonl(region_jsonl)
    assert len(samples) == 6
    truth = list(generate(6, seed=3, split="val"))
    for sample, s in zip(samples, truth, strict=True):
        assert sample.box.contains(GridBox(*s.box_grid))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(samples[0].image), "question": "q", "box_grid": [0, 0, 1, 1]}) + "\n" +
                   json.dumps({"image": str(samples[0].image), "question": " "}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_region_jsonl(bad)


def test_batch_labels_cover_only_the_target(region_jsonl):
    _, processor = build_tiny_qwen("qwen2_vl")
    samples = read_region_jsonl(region_jsonl)[:2]
    batch = build_batch(processor, samples, 8)
    tok = processor.tokenizer
    for row, labels, sample in zip(batch["input_ids"], batch["labels"], samples, strict=True):
        target = labels[labels != -100]
        assert tok.decode(target) == str(sample.box) + tok.eos_token
        assert (row == processor.image_token_id).sum() > 0
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_runs_resumes_evaluates_and_exports(tmp_path, region_jsonl, lora):
    if lora:
        pytest.importorskip("peft")
    model, processor = build_tiny_qwen("qwen2_vl")
    samples = read_region_jsonl(region_jsonl)
    config = FinetuneConfig(steps=2, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1, lora=lora,
                            checkpoint_every=1, lora_rank=4)
    with torch.enable_grad():
        _, first = finetune_localizer(model, processor, samples, config, tmp_path / "run", samples[:2], progress=False)
        assert first["steps"] == 2 and first["eval_before"]["n"] == 2 and first["eval_after"]["n"] == 2
        longer = FinetuneConfig(**{**config.__dict__, "steps": 3})
        model2, processor2 = build_tiny_qwen("qwen2_vl")
        trained, summary = finetune_localizer(model2, processor2, samples, longer, tmp_path / "run", samples[:2],
                                              resume=True, progress=False)
    assert summary["steps"] == 3 and summary["eval_before"] is None
    assert 0.0 <= summary["eval_after"]["mean_iou"] <= 1.0
    assert not any("lora" in name for name, _ in trained.named_parameters())  # merged before export
    changed = any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                        build_tiny_qwen("qwen2_vl")[0].state_dict().values(),
                                                        strict=True))
    assert changed


def test_cli_finetune_then_serve_by_path(tmp_path, region_jsonl, capsys):
    from crop.cli import main
    from crop.localizers import VLMLocalizer, make_localizer

    out = tmp_path / "localizer"
    assert main(["train", "localizer", "--base", "tiny-random-qwen2-vl", "--data", str(region_jsonl), "--eval-data",
                 str(region_jsonl), "--steps", "1", "--batch-size", "2", "--run-dir", str(tmp_path / "run"),
                 "--out", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 1 and printed["eval_after"]["n"] == 6
    assert (out / "model.safetensors").exists() and (out / "crop_localizer.json").exists()
    localizer = make_localizer(str(out))  # the generative localizer accepts the checkpoint by path
    assert isinstance(localizer, VLMLocalizer)
    assert main(["train", "localizer", "--base", "tiny-random-qwen2-vl", "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err


def test_micro_batches_partition_each_step_over_processes(region_jsonl):
    from crop.train.finetune_localizer import micro_batch

    samples = read_region_jsonl(region_jsonl)
    one = FinetuneConfig(batch_size=2, grad_accum=2)
    two = FinetuneConfig(batch_size=1, grad_accum=2)
    for step in range(3):  # crosses an epoch boundary (6 examples, 4 per step)
        for micro in range(2):
            split = micro_batch(samples, two, step, micro, 0, 2) + micro_batch(samples, two, step, micro, 1, 2)
            assert split == micro_batch(samples, one, step, micro, 0, 1)


def _train_cli(tmp_path, region_jsonl, name: str, launcher: list[str], batch: int, *extra: str):
    out = tmp_path / name
    proc = subprocess.run([*launcher, "-m", "crop", "train", "localizer", "--base", "tiny-random-qwen2-vl", "--data",
                           str(region_jsonl), "--steps", "2", "--batch-size", str(batch), "--grad-accum", "2",
                           "--run-dir", str(tmp_path / f"run-{name}"), "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout[proc.stdout.index("{"):])


def test_two_processes_train_what_one_process_trains(tmp_path, region_jsonl):
    """Data parallel through accelerate (2 CPU processes, gloo; what ``accelerate launch`` runs on GPUs):
    2 processes x 1 example per micro-batch end where 1 process x 2 examples does."""
    from safetensors.torch import load_file

    single, s1 = _train_cli(tmp_path, region_jsonl, "one", [sys.executable], 2)
    double, s2 = _train_cli(tmp_path, region_jsonl, "two", [sys.executable, "-m", "torch.distributed.run",
                                                           "--nproc_per_node", "2", "--master_port", "29533"], 1)
    assert (s1["processes"], s2["processes"]) == (1, 2)
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    base = build_tiny_qwen("qwen2_vl")[0].state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_mixed_precision_bf16_runs_on_the_cpu(tmp_path, region_jsonl):
    _, summary = _train_cli(tmp_path, region_jsonl, "bf16", [sys.executable], 2, "--mixed-precision", "bf16")
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
