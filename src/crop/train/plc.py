"""Recipe: train CROP's PLC compressor with the answerer's own language-model loss.

For each training example (a synthetic sample, or a line of a region-annotated JSONL file as
``crop train localizer`` reads it, with its ``answer``), the answerer's visual features are
computed without gradient, compressed by :func:`crop.methods.plc_trained.compress_with` (the
code that serves the method: the region's anchors + the compressor's tokens, under a budget drawn
from ``budgets``), and the answerer, frozen by default, is run on the compressed prompt followed
by the reference answer; the loss is its cross-entropy on the answer tokens only. With ``lora``
the LLM's attention projections get LoRA adapters (peft) trained alongside (merged before the
answerer is saved next to the compressor).

Training signals, all listed in the card: the answer tokens (LM loss) and the example's region
(ground-truth box: it picks the anchors and what the queries read, as a localizer's box does when
serving). Nothing else: no attention or region-membership supervision.

AdamW, linear warm-up then cosine decay, gradient clipping; checkpoints (compressor + LoRA +
optimizer + step) every ``checkpoint_every`` steps and ``resume``; seeded data order; a wall-clock
budget. The same code runs the embedded answerer on a CPU and a real checkpoint on a GPU.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from crop.compressor import CompressorConfig, RegionCompressor, save_compressor
from crop.config import CropPLCTrainedConfig
from crop.methods.plc_trained import compress_with
from crop.models import get_adapter
from crop.pipeline import chat_prompt
from crop.regions import GridBox
from crop.train.finetune_localizer import IGNORE, add_lora

logger = logging.getLogger(__name__)


@dataclass
class PLCTrainConfig:
    """Hyper-parameters of ``crop train plc``.

    Args:
        steps: optimizer steps.
        batch_size: examples per step (run one by one, gradients accumulated).
        lr: peak learning rate of the compressor (LoRA uses ``lora_lr``).
        warmup_steps: linear warm-up steps.
        weight_decay, grad_clip: AdamW weight decay, gradient-norm clip.
        seed: weights and data-order seed.
        budgets: visual tokens per image reaching the LLM, as counts of 576 (scaled to the
            answerer's tokens); each example draws one, so the compressor serves all of them.
        context_share, anchors, attend: the method's split and queries (see
            :class:`crop.config.CropPLCTrainedConfig`).
        max_queries, key_dim: the compressor's query bank and key size.
        lora, lora_rank, lora_lr: fine-tune the LLM too, with LoRA adapters.
        checkpoint_every: steps between checkpoints.
        max_minutes: wall-clock budget over all resumed runs (stops cleanly, then saves).
        device: ``"cpu"`` forces the CPU; anything else lets ``accelerate`` place each process
            (its GPU under ``accelerate launch``, else the first GPU, else the CPU).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (autocast through ``accelerate``).
        grid: the region grid.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    budgets: tuple[int, ...] = (64, 128, 192)
    context_share: float = 0.25
    anchors: bool = True
    attend: str = "outside"
    max_queries: int = 64
    key_dim: int = 64
    lora: bool = False
    lora_rank: int = 16
    lora_lr: float = 2e-4
    checkpoint_every: int = 100
    max_minutes: float | None = None
    device: str = "cpu"
    mixed_precision: str = "no"
    grid: int = 8
    signals: list[str] = field(default_factory=lambda: [
        "the answerer's cross-entropy on the reference answer tokens (the answerer frozen unless --lora)",
        "the example's ground-truth region box: it picks the anchors and what the queries read, as the "
        "localizer's box does when serving"])

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "max_queries", "key_dim", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be positive ints, got {self.budgets!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        CropPLCTrainedConfig(keep_tokens=max(self.budgets), context_share=self.context_share, anchors=self.anchors,
                             attend=self.attend, grid=self.grid)  # the method's own checks


@dataclass
class Example:
    """One training example: an image, a question, its reference answer and region."""

    image: Image.Image
    question: str
    answer: str
    box: GridBox


def synth_examples(n: int, seed: int, split: str = "train") -> list[Example]:
    """``n`` examples of the synthetic benchmark's ``split`` (its ground-truth boxes and answers)."""
    from crop.train.data import stream_sample

    out = []
    for i in range(n):
        s = stream_sample(split, i, seed, seed)
        out.append(Example(s.image, s.question, s.answer, GridBox(*s.box_grid)))
    return out


def jsonl_examples(path: str, grid: int = 8) -> list[Example]:
    """The examples of a region-annotated JSONL file (the format ``crop train localizer`` reads), with answers.

    Raises:
        ValueError: if a line has no ``answer``.
    """
    from crop.data.region_vqa import read_region_jsonl

    out = []
    for s in read_region_jsonl(path, grid):
        if not s.answer:
            raise ValueError(f"{path}: example {s.id or s.question!r} has no answer; the PLC is trained on answers")
        out.append(Example(Image.open(s.image).convert("RGB"), s.question, s.answer, s.box))
    return out


def example_loss(model, processor, compressor: RegionCompressor, method_config: CropPLCTrainedConfig,
                 example: Example) -> torch.Tensor:
    """The answerer's cross-entropy on ``example.answer`` after the prompt with the compressed image."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    inputs = processor(images=[example.image], text=[chat_prompt(processor, example.question)], return_tensors="pt")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tokenizer = getattr(processor, "tokenizer", processor)
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tail = torch.tensor([answer], device=device)  # (1, T)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)  # (1, L + T) the prompt exactly as served
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
    spans = adapter.image_spans(full)
    with torch.no_grad():
        features = adapter.encode_images(full)  # per image (length, D); the vision side is frozen
    box = adapter.view_box(example.box, example.image.size, getattr(processor, "image_processor", None))
    image, _ = compress_with(compressor, adapter, method_config, features[0], spans[0],
                             box or GridBox.full(example.box.grid))  # the region where the model sees it
    run = adapter.compressed_inputs(full, spans, [image])
    labels = torch.full_like(run["input_ids"], IGNORE)
    labels[:, -tail.shape[1]:] = tail
    return model(**run, labels=labels).loss


def _lr_factor(step: int, config: PLCTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_plc(model, processor, train: list[Example], config: PLCTrainConfig, run_dir: str | Path,
              out_dir: str | Path, answerer_name: str, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train a compressor for ``model``; save it (and the LoRA-merged answerer with ``lora``) into ``out_dir``.

    ``accelerate`` runs the loop: one process as it is, or data parallel under ``accelerate
    launch`` (every process draws the step's examples from the same seeded stream and computes
    the gradient of its share; the gradients are summed over processes before the step, so the
    update is the one-process update). Only the main process checkpoints and saves.

    Returns:
        The training summary (also in ``run_dir/summary.json`` and the compressor's metadata).
    """
    from accelerate import Accelerator
    from tqdm import tqdm

    from crop.eval.matching import scale_budget

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    compressor = RegionCompressor(CompressorConfig(dim=adapter.text_config.hidden_size,
                                                   max_queries=config.max_queries, key_dim=config.key_dim))
    compressor.to(accelerator.device)
    model.to(accelerator.device)
    if config.lora:
        model = add_lora(model, config.lora_rank, 2 * config.lora_rank)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": list(compressor.parameters()), "lr": config.lr, "base_lr": config.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lora_lr, "base_lr": config.lora_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    probe = processor(images=[train[0].image], text=[chat_prompt(processor, train[0].question)], return_tensors="pt")
    visual = adapter.image_spans(probe)[0].visual_tokens
    budgets = [scale_budget(b, visual) for b in config.budgets]

    ckpt = run_dir / "checkpoint.pt"
    step, elapsed, losses = 0, 0.0, []
    if resume:
        if not ckpt.exists():
            raise ValueError(f"nothing to resume: {ckpt} does not exist")
        state = torch.load(ckpt, map_location=accelerator.device, weights_only=False)
        compressor.load_state_dict(state["compressor"])
        if state.get("lora"):
            model.load_state_dict(state["lora"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    start = time.perf_counter() - elapsed

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        if not main:
            return
        lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"compressor": compressor.state_dict(), "lora": lora, "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed": time.perf_counter() - start, "losses": losses,
                    "config": asdict(config)}, ckpt)

    bar = tqdm(total=config.steps, initial=step, desc="train plc", unit="step", disable=not (progress and main))
    trainable = [p for g in groups for p in g["params"]]
    compressor.train()
    stopped_by_time = False
    with torch.enable_grad():
        while step < config.steps:
            out_of_time = config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes
            if world > 1:  # every process stops at the same step, or the gradient sum would wait forever
                out_of_time = bool(accelerator.reduce(torch.tensor(int(out_of_time), device=accelerator.device),
                                                      reduction="sum"))
            if out_of_time:
                stopped_by_time = True
                break
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(step, config)
            rng = random.Random(config.seed * 1_000_003 + step)  # the step's examples and budgets, resumable
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(config.batch_size):
                example = train[rng.randrange(len(train))]
                keep = rng.choice(budgets)
                if i % world != rank:  # another process's share of the step
                    continue
                method_config = CropPLCTrainedConfig(keep_tokens=keep, context_share=config.context_share,
                                                     anchors=config.anchors, attend=config.attend, grid=config.grid)
                with accelerator.autocast():
                    loss = example_loss(model, processor, compressor, method_config, example) / config.batch_size
                accelerator.backward(loss)
                total += float(loss.detach())
            if world > 1:  # data parallel: sum the shares' gradients (each is already / batch_size)
                for param in trainable:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    param.grad = accelerator.reduce(param.grad, reduction="sum")
                total = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="sum"))
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            step += 1
            losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                recent = losses[-config.checkpoint_every:]
                logger.info("step %d loss %.4f (mean of the last %d steps)", step, sum(recent) / len(recent),
                            len(recent))
                save_checkpoint()
    save_checkpoint()
    bar.close()
    compressor.eval()
    summary = {"kind": "plc-compressor", "answerer": answerer_name, "steps_run": step, "steps_planned": config.steps,
               "processes": world, "main_process": main,
               "stopped_by_time_budget": stopped_by_time, "train_examples": len(train),
               "train_wall_minutes": (time.perf_counter() - start) / 60,
               "loss_first_10": sum(losses[:10]) / max(1, len(losses[:10])),
               "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
               "budgets_scaled": budgets, "config": asdict(config)}
    if not main:
        return summary
    save_compressor(compressor, out_dir, {"answerer": answerer_name, "training": summary,
                                          "method": {"context_share": config.context_share, "anchors": config.anchors,
                                                     "attend": config.attend}})
    (out_dir / "MODEL_CARD.md").write_text(compressor_card(summary), encoding="utf-8")
    if config.lora:
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir / "answerer")
        processor.save_pretrained(out_dir / "answerer")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def compressor_card(summary: dict[str, Any]) -> str:
    """The compressor's model card: what it is for, how it was trained, every training signal."""
    cfg = summary["config"]
    lines = [
        "# CROP trained-PLC compressor", "",
        f"Learnable-query compressor (`crop.compressor.RegionCompressor`) for the answerer `{summary['answerer']}`: "
        f"it makes the non-anchor tokens of `crop-plc-trained` (anchors = the region's own tokens; "
        f"context share {cfg['context_share']}, anchors {cfg['anchors']}, queries read `{cfg['attend']}`).", "",
        "## Training", "",
        f"- Steps: {summary['steps_run']} of {summary['steps_planned']} "
        f"({summary['train_wall_minutes']:.1f} min{', stopped by the time budget' if summary['stopped_by_time_budget'] else ''}), "
        f"batch {cfg['batch_size']}, lr {cfg['lr']}, budgets {cfg['budgets']} of 576 "
        f"(scaled: {summary['budgets_scaled']}), seed {cfg['seed']}, LoRA {cfg['lora']}.",
        f"- Examples: {summary['train_examples']}. Loss (answer tokens): first 10 steps {summary['loss_first_10']:.3f}, "
        f"last 10 {summary['loss_last_10']:.3f}.",
        "- Training signals (nothing else):", *[f"  - {s}" for s in cfg["signals"]], "",
        "Reproduce with `crop train plc` and the configuration in `compressor.json`.", ""]
    return "\n".join(lines)
