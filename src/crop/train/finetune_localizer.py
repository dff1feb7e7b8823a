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
- Hugging Face ``accelerate`` runs the loop: one process on the CPU or a GPU as it is, several
  GPUs (or CPU processes) under ``accelerate launch`` with data parallelism (each process takes
  its own micro-batches of every optimizer step), mixed precision (``bf16``/``fp16``);
- checkpoints (trainable weights + optimizer + step, written by the main process) every
  ``checkpoint_every`` steps and ``resume``; a seeded data order that a resumed run continues
  exactly, whatever the number of processes;
- evaluation (mean IoU, ground truth contained, fallbacks) on a held-out file through
  :class:`crop.localizers.vlm.VLMLocalizer`, the code that serves the localizer.

The same code runs a 2B model on several GPUs and a tiny random model on a CPU.
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
        device: ``"cpu"`` forces the CPU; anything else lets ``accelerate`` place each process
            (its GPU under ``accelerate launch``, else the first GPU, else the CPU).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (autocast through ``accelerate``).
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
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "eval_batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


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


def micro_batch(train: list, config: FinetuneConfig, step: int, micro: int, rank: int, world: int) -> list:
    """The examples process ``rank`` of ``world`` trains on in micro-batch ``micro`` of optimizer step ``step``.

    The seeded order is the same for any ``world``: an optimizer step consumes ``batch_size x
    grad_accum x world`` consecutive examples of it, process ``rank`` the ``rank``-th slice of
    each micro-batch's share.
    """
    per_step = config.batch_size * config.grad_accum * world
    first = step * per_step + (micro * world + rank) * config.batch_size
    epoch, offset = divmod(first, len(train))
    order = _order(len(train), config.seed, epoch) + _order(len(train), config.seed, epoch + 1)
    return [train[i] for i in order[offset:offset + config.batch_size]]


def _train_steps(accelerator, model, processor, train, config: FinetuneConfig, optimizer, step: int,
                 start_time: float, ckpt: Path, losses: list[float], bar) -> int:
    """Optimizer steps from ``step`` to ``config.steps``, checkpointing on the way; returns the last step."""
    rank, world = accelerator.process_index, accelerator.num_processes
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        total = 0.0
        for micro in range(config.grad_accum):
            chunk = micro_batch(train, config, step, micro, rank, world)
            batch = {k: v.to(accelerator.device) for k, v in build_batch(processor, chunk, config.grid).items()}
            with accelerator.accumulate(model), accelerator.autocast():
                loss = model(**batch).loss
                accelerator.backward(loss)  # divided by grad_accum inside
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) / config.grad_accum
        total = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="mean"))
        step += 1
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                trainable = {n: p.detach() for n, p in accelerator.unwrap_model(model).named_parameters()
                             if p.requires_grad}
                torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step,
                            "elapsed": time.perf_counter() - start_time, "config": asdict(config)}, ckpt)
    return step


def finetune_localizer(model, processor, train: list[RegionSample], config: FinetuneConfig, run_dir: str | Path,
                       eval_samples: list[RegionSample] | None = None, resume: bool = False,
                       progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``model`` as a localizer; returns the trained (LoRA-merged) model and a summary.

    Under ``accelerate launch`` every process runs this; only the main one evaluates, writes
    ``summary.json`` and should export (``summary["main_process"]``).

    Args:
        model, processor: the base checkpoint (any image-text-to-text model with a chat template).
        train: training examples.
        config: hyper-parameters.
        run_dir: checkpoints (``checkpoint.pt``) and ``summary.json``.
        eval_samples: held-out examples, evaluated before and after training (main process).
        resume: continue from ``run_dir/checkpoint.pt``.
        progress: show a progress bar (main process).
    """
    from accelerate import Accelerator
    from tqdm import tqdm

    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.device == "cpu")
    main = accelerator.is_main_process
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model.to(accelerator.device)
    if config.lora:
        model = add_lora(model, config.lora_rank, config.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, elapsed = 0, 0.0
    ckpt = run_dir / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise ValueError(f"nothing to resume: {ckpt} does not exist")
        state = torch.load(ckpt, map_location=accelerator.device, weights_only=False)
        if state["config"] != asdict(config):
            logger.warning("resuming with a different config than the checkpoint's")
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
    before = evaluate_localizer_file(model.eval(), processor, eval_samples, config.grid, config.eval_batch_size) \
        if eval_samples and step == 0 and main else None
    prepared, optimizer = accelerator.prepare(model, optimizer)
    start_time = time.perf_counter() - elapsed
    losses: list[float] = []
    bar = tqdm(total=config.steps, initial=step, desc="finetune localizer", unit="step", disable=not (progress and main))
    prepared.train()
    with torch.enable_grad():
        step = _train_steps(accelerator, prepared, processor, train, config, optimizer, step, start_time, ckpt,
                            losses, bar)
    bar.close()
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(prepared).eval()
    if config.lora:
        model = model.merge_and_unload()
    after = evaluate_localizer_file(model, processor, eval_samples, config.grid, config.eval_batch_size) \
        if eval_samples and main else None
    summary = {"config": asdict(config), "steps": step, "train_examples": len(train),
               "processes": accelerator.num_processes, "main_process": main,
               "wall_minutes": (time.perf_counter() - start_time) / 60, "final_loss": losses[-1] if losses else None,
               "eval_before": before, "eval_after": after}
    if main:
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
    group.add_argument("--device", default="cpu",
                       help="'cpu' (default), or 'cuda': accelerate places each process (its own GPU under "
                            "accelerate launch)")
    group.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                       help="autocast through accelerate (default no)")


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
                                checkpoint_every=args.checkpoint_every, device=args.device,
                                mixed_precision=args.mixed_precision)
    except ValueError as exc:
        raise CropInputError(str(exc)) from None
    _torch.set_num_threads(max(1, args.threads))
    model, processor = load_model(args.base, role="localizer")
    model, summary = finetune_localizer(model, processor, train, config, args.run_dir, held_out, resume=args.resume,
                                        progress=not args.no_progress)
    if not summary["main_process"]:  # accelerate launch: the main process exports
        return 0
    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "crop_localizer.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("steps", "processes", "wall_minutes", "final_loss", "eval_before",
                                              "eval_after")},
                     indent=2))
    return 0
