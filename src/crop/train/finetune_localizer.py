"""Recipe: fine-tune a pretrained Qwen2-VL-style checkpoint into a CROP localizer.

The CROP paper fine-tunes Qwen2-VL-2B to answer a localization prompt with the grid box of the
region a question needs. This is that recipe for any checkpoint that ``crop.models.loading``
can load (a hub id, a local path, or ``tiny-random-qwen2-vl`` for the smoke test) and any
region-annotated JSONL (:mod:`crop.data.region_vqa`):

- the prompt is :func:`crop.localizers.prompt.localizer_prompt` in the model's chat template,
  the target :func:`crop.localizers.prompt.format_box` + end-of-sequence; the loss covers the
  target tokens only, and the prompt is tokenized exactly as the localizer sees it when
  serving (prompt ids + target ids, never a re-tokenized concatenation);
- full fine-tuning or LoRA (peft, optional dependency) on the language model's attention
  projections; LoRA weights are merged before export, so the result loads by path like any
  checkpoint;
- AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping;
- checkpoints (trainable weights + optimizer + step) every ``checkpoint_every`` steps and
  ``resume``; a seeded data order that a resumed run continues exactly;
- evaluation (mean IoU, ground truth contained, fallbacks) on a held-out file through
  :class:`crop.localizers.vlm.VLMLocalizer`, the code that serves the localizer.

The same code runs a 2B model on a GPU (move the model with ``device``) and a tiny random
model on a CPU.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from crop.data.region_vqa import RegionSample
from crop.localizers.prompt import format_box, localizer_messages
from crop.localizers.vlm import VLMLocalizer

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class FinetuneConfig:
    """Hyper-parameters of a localizer fine-tuning run.

    Args:
        steps: optimizer steps.
        batch_size: examples per forward pass.
        grad_accum: forward passes per optimizer step.
        lr: peak learning rate.
        warmup_steps: linear warm-up length.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm.
        lora: train LoRA adapters (rank ``lora_rank``) instead of every weight.
        lora_rank, lora_alpha: LoRA sizes.
        grid: the region grid side.
        seed: seed of the data order and of LoRA's initialization.
        checkpoint_every: steps between checkpoints.
        eval_batch_size: localizer batch size at evaluation.
        device: torch device of the run.
    """

    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    grid: int = 8
    seed: int = 0
    checkpoint_every: int = 50
    eval_batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "eval_batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")


def _prompt_inputs(processor, images: list[Image.Image], questions: list[str], grid: int):
    """Processor inputs of the localization prompts (what the localizer sees before it answers)."""
    texts = [processor.apply_chat_template(localizer_messages(q, grid), add_generation_prompt=True) for q in questions]
    return [processor(images=[im], text=[t], return_tensors="pt") for im, t in zip(images, texts, strict=True)]


def build_batch(processor, samples: list[RegionSample], grid: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch: prompt ids + target ids, labels on the target only.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)``, the pixel inputs, and
        ``mm_token_type_ids`` when the processor makes them.
    """
    tokenizer = processor.tokenizer
    images = [Image.open(s.image).convert("RGB") for s in samples]
    prompts = _prompt_inputs(processor, images, [s.question for s in samples], grid)
    rows, labels = [], []
    for enc, sample in zip(prompts, samples, strict=True):
        target = tokenizer(format_box(sample.box.as_list()), add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        prompt_ids = enc["input_ids"][0].tolist()
        rows.append(prompt_ids + target)
        labels.append([IGNORE] * len(prompt_ids) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),  # (B, L)
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),  # (B, L)
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),  # (B, L)
    }
    if "mm_token_type_ids" in prompts[0]:
        batch["mm_token_type_ids"] = torch.tensor([
            enc["mm_token_type_ids"][0].tolist() + [0] * (width - enc["mm_token_type_ids"].shape[1])
            for enc in prompts])  # (B, L)
    for key in prompts[0]:
        if key not in batch and key not in ("input_ids", "attention_mask"):
            values = [enc[key] for enc in prompts]
            batch[key] = torch.cat(values, dim=0)  # pixel_values: patches of every image; grid_thw: (B, 3)
    return batch


def add_lora(model, rank: int, alpha: int):
    """``model`` with LoRA adapters (peft) on its language model's attention projections.

    Raises:
        ValueError: if peft is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora needs peft: pip install 'crop-vlm[train]'") from None
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    return get_peft_model(model, lora)


def evaluate_localizer_file(model, processor, samples: list[RegionSample], grid: int = 8,
                            batch_size: int = 8) -> dict[str, float]:
    """Mean IoU, ground-truth containment and fallback rate of ``model`` as a localizer on ``samples``."""
    localizer = VLMLocalizer(model, processor, grid=grid, batch_size=batch_size)
    ious, contains, fallbacks = [], [], 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        results = localizer.localize([Image.open(s.image).convert("RGB") for s in chunk], [s.question for s in chunk])
        for sample, result in zip(chunk, results, strict=True):
            ious.append(result.box.iou(sample.box))
            contains.append(float(result.box.contains(sample.box)))
            fallbacks += int(result.fallback)
    return {"mean_iou": statistics.fmean(ious), "contains_gt": statistics.fmean(contains),
            "fallback_rate": fallbacks / len(samples), "n": len(samples)}


def _lr_at(step: int, config: FinetuneConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _train_steps(model, processor, train, config: FinetuneConfig, optimizer, params, step: int, start_time: float,
                 ckpt: Path, losses: list[float], bar) -> int:
    """Optimizer steps from ``step`` to ``config.steps``, checkpointing on the way; returns the last step."""
    per_step = config.batch_size * config.grad_accum
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accum):
            first = step * per_step + micro * config.batch_size
            epoch, offset = divmod(first, len(train))
            order = _order(len(train), config.seed, epoch) + _order(len(train), config.seed, epoch + 1)
            chunk = [train[i] for i in order[offset:offset + config.batch_size]]
            batch = {k: v.to(config.device) for k, v in build_batch(processor, chunk, config.grid).items()}
            loss = model(**batch).loss / config.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        step += 1
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": time.perf_counter() - start_time, "config": asdict(config)}, ckpt)
    return step


def finetune_localizer(model, processor, train: list[RegionSample], config: FinetuneConfig, run_dir: str | Path,
                       eval_samples: list[RegionSample] | None = None, resume: bool = False,
                       progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``model`` as a localizer; returns the trained (LoRA-merged) model and a summary.

    Args:
        model, processor: the base checkpoint (any image-text-to-text model with a chat template).
        train: training examples.
        config: hyper-parameters.
        run_dir: checkpoints (``checkpoint.pt``) and ``summary.json``.
        eval_samples: held-out examples, evaluated before and after training.
        resume: continue from ``run_dir/checkpoint.pt``.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model.to(config.device)
    if config.lora:
        model = add_lora(model, config.lora_rank, config.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, elapsed = 0, 0.0
    ckpt = run_dir / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise ValueError(f"nothing to resume: {ckpt} does not exist")
        state = torch.load(ckpt, map_location=config.device, weights_only=False)
        if state["config"] != asdict(config):
            logger.warning("resuming with a different config than the checkpoint's")
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    before = evaluate_localizer_file(model.eval(), processor, eval_samples, config.grid, config.eval_batch_size) \
        if eval_samples and step == 0 else None
    start_time = time.perf_counter() - elapsed
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=step, desc="finetune localizer", unit="step", disable=not progress)
    model.train()
    with torch.enable_grad():
        step = _train_steps(model, processor, train, config, optimizer, params, step, start_time, ckpt, losses, bar)
    bar.close()
    model.eval()
    if config.lora:
        model = model.merge_and_unload()
    after = evaluate_localizer_file(model, processor, eval_samples, config.grid, config.eval_batch_size) \
        if eval_samples else None
    summary = {"config": asdict(config), "steps": step, "train_examples": len(train),
               "wall_minutes": (time.perf_counter() - start_time) / 60, "final_loss": losses[-1] if losses else None,
               "eval_before": before, "eval_after": after}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return model, summary



def add_finetune_arguments(parser) -> None:
    """The ``crop train localizer`` options that switch it to fine-tuning a pretrained checkpoint."""
    group = parser.add_argument_group(
        "fine-tuning a pretrained checkpoint (the paper's recipe; enabled by --base)",
        "With --base, the localizer is fine-tuned from that checkpoint on --data (region-annotated JSONL: image, "
        "question, and box_grid | box_px | ocr+answer | phrase_boxes_px) instead of trained from scratch on the "
        "synthetic benchmark. --steps, --batch-size, --warmup-steps, --seed, --checkpoint-every, --run-dir, --out, "
        "--resume apply; --lr defaults to 1e-5 (full) or 2e-4 (--lora) unless given.")
    group.add_argument("--base", default=None, metavar="CKPT",
                       help="hub id or path of a Qwen2-VL-style checkpoint (or tiny-random-qwen2-vl for a smoke run)")
    group.add_argument("--data", default=None, metavar="JSONL", help="training examples")
    group.add_argument("--eval-data", default=None, metavar="JSONL", help="held-out examples (IoU, containment)")
    group.add_argument("--lora", action="store_true", help="train LoRA adapters (peft), merged before export")
    group.add_argument("--lora-rank", type=int, default=16)
    group.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step")
    group.add_argument("--grid", type=int, default=8, help="region grid side (default 8)")
    group.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")


def run_finetune_cli(args, scratch_lr: float) -> int:
    """``crop train localizer --base ...``: fine-tune, evaluate, export with ``save_pretrained``."""
    import torch as _torch

    from crop.data.region_vqa import read_region_jsonl
    from crop.errors import CropInputError
    from crop.models.loading import load_model

    if not args.data or not args.out:
        raise CropInputError("--base needs --data (training JSONL) and --out (where to save the localizer)")
    try:
        train = read_region_jsonl(args.data, args.grid)
        held_out = read_region_jsonl(args.eval_data, args.grid) if args.eval_data else None
        lr = args.lr if args.lr != scratch_lr else (2e-4 if args.lora else 1e-5)
        config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                                warmup_steps=min(args.warmup_steps, max(args.steps // 10, 1)), lora=args.lora,
                                lora_rank=args.lora_rank, grid=args.grid, seed=args.seed,
                                checkpoint_every=args.checkpoint_every, device=args.device)
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    _torch.set_num_threads(max(1, args.threads))
    model, processor = load_model(args.base, role="localizer")
    model, summary = finetune_localizer(model, processor, train, config, args.run_dir, held_out, resume=args.resume,
                                        progress=not args.no_progress)
    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "crop_localizer.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("steps", "wall_minutes", "final_loss", "eval_before", "eval_after")},
                     indent=2))
    return 0
