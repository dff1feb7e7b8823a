"""The training loop shared by the embedded-model recipes: seeded, resumable, time-boxed.

A recipe (:mod:`crop.train.answerer`, :mod:`crop.train.localizer`) supplies a :class:`Task`:
how to build the model, how to turn sample indices into a batch, the loss, and the final
evaluation. This module owns everything else: AdamW with linear warmup and cosine decay
(:func:`crop.train.config.lr_factor`), gradient clipping, checkpoints (model + optimizer +
auxiliary heads + step + elapsed time) every ``checkpoint_every`` steps and at the end,
``resume``, a wall-clock budget (``max_minutes``) that stops cleanly and still evaluates and
saves, a warm start from an exported model (:func:`warm_start`), and the export of the trained
model into the package (:func:`crop.embedded.save_embedded`).

Training data are generated on the fly: sample ``i`` of the train split is a pure function of
``(data_seed, i)`` (see :mod:`crop.data.synth`), and step ``s`` uses samples
``s * batch_size .. (s + 1) * batch_size - 1`` (from the streams
:func:`crop.train.config.batch_streams` names), so a resumed run sees exactly the data an
uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from crop.train.config import VISION_PARTS, WARM_START_PARTS, TrainConfig, batch_streams, lr_factor

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What a recipe provides to :func:`train`."""

    kind: str  # "answerer" or "localizer"

    def build(self, config: TrainConfig) -> tuple[nn.Module, Any]:
        """A freshly initialized ``(model, processor)``."""

    def aux_heads(self, model: nn.Module) -> nn.ModuleDict:
        """Auxiliary heads trained alongside (not exported)."""

    def collate(self, items: list[tuple[str, int]]) -> dict:
        """A batch from ``(split, index)`` pairs."""

    def loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict, aux_weight: float) -> tuple[torch.Tensor, dict]:
        """Training loss and scalar logs."""

    def quick_val(self, model: nn.Module, batch: dict) -> dict:
        """Teacher-forced metrics on one validation batch."""

    def evaluate(self, model: nn.Module, processor: Any, config: TrainConfig) -> dict:
        """Final held-out metrics."""

    def export(self, model: nn.Module, processor: Any, out_dir: Path, meta: dict) -> None:
        """Write the shipped files."""


def warm_start(model: nn.Module, warm: nn.Module, parts: str = "all") -> list[str]:
    """Copy ``warm``'s weights into ``model``: all of them, or only the parts ``parts`` names.

    Args:
        model: the freshly built model.
        warm: a trained model of the same architecture (same sizes for the copied parts).
        parts: a key of :data:`crop.train.config.WARM_START_PARTS`.

    Returns:
        The names of the copied tensors.

    Raises:
        ValueError: if a copied tensor's shape differs, or ``parts`` selects nothing.
    """
    prefixes = WARM_START_PARTS[parts]
    source = warm.state_dict()
    if prefixes is None:
        model.load_state_dict(source)
        return list(source)
    chosen = {k: v for k, v in source.items() if k.startswith(prefixes)}
    if not chosen:
        raise ValueError(f"init_parts={parts!r} matched no weights of the warm-start model")
    own = model.state_dict()
    bad = [k for k, v in chosen.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"warm-start tensors missing or of another shape in the new model: {bad[:4]}")
    model.load_state_dict(chosen, strict=False)
    return list(chosen)


class _IndexDataset(torch.utils.data.Dataset):
    """Batches of ``(split, index)`` pairs; each item is one collated batch."""

    def __init__(self, task: Task, batches: list[list[tuple[str, int]]]):
        self.task, self.batches = task, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.task.collate(self.batches[i])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _param_groups(model: nn.Module, heads: nn.ModuleDict, weight_decay: float) -> list[dict]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in (model, heads):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(task: Task, config: TrainConfig, run_dir: str | Path, out_dir: str | Path | None, resume: bool = False,
          progress: bool = True) -> dict:
    """Train ``task``'s model, evaluate it on the held-out split, and export it.

    Args:
        task: the recipe.
        config: hyper-parameters.
        run_dir: where checkpoints (``checkpoint.pt``) and ``metrics.json`` go.
        out_dir: where the shipped files go (``None`` = do not export).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists (its config wins for
            everything but ``max_minutes``, ``eval_n``, ``threads`` and ``workers``).
        progress: show a tqdm progress bar.

    Returns:
        The metrics dict (also written to ``run_dir/metrics.json``).
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    torch.set_num_threads(config.threads)

    state = None
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = TrainConfig(**state["config"])
        for name in ("max_minutes", "eval_n", "threads", "workers", "attn_weight"):
            setattr(saved, name, getattr(config, name))
        config = saved
        logger.info("resuming from %s at step %d", ckpt_path, state["step"])
    elif resume:
        logger.info("no checkpoint at %s; starting fresh", ckpt_path)

    _seed_everything(config.seed)
    model, processor = task.build(config)
    if config.freeze_parts == "vision":
        for name, param in model.named_parameters():
            if name.startswith(VISION_PARTS):
                param.requires_grad_(False)
    heads = task.aux_heads(model)
    if state is not None:  # a checkpoint from a recipe with fewer probes: keep only the heads it has
        saved_heads = {key.split(".")[0] for key in state["heads"]}
        heads = nn.ModuleDict({k: v for k, v in heads.items() if k in saved_heads})
    optimizer = torch.optim.AdamW(_param_groups(model, heads, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))
    step, elapsed_before, history = 0, 0.0, []
    if state is None and config.init_from:
        from crop.embedded import load_embedded_from

        warm, _ = load_embedded_from(config.init_from)
        copied = warm_start(model, warm, config.init_parts)
        logger.info("%d weight tensors (%s) initialized from %s", len(copied), config.init_parts, config.init_from)
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before, history = state["step"], state["elapsed_s"], state.get("history", [])

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed_s": elapsed(), "config": asdict(config), "history": history}, tmp)
        os.replace(tmp, ckpt_path)

    start_time = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - start_time

    batches = [list(zip(batch_streams(s, config), range(s * config.batch_size, (s + 1) * config.batch_size),
                        strict=True)) for s in range(step, config.steps)]
    loader = torch.utils.data.DataLoader(
        _IndexDataset(task, batches), batch_size=None, shuffle=False, num_workers=config.workers,
        worker_init_fn=_worker_init if config.workers else None, prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
    )
    val_batch = task.collate([("val", i) for i in range(config.val_n)]) if config.val_every else None

    model.train()
    heads.train()
    stopped_by_time = False
    bar = tqdm(total=config.steps, initial=step, desc=f"train {task.kind}", unit="step", disable=not progress,
               mininterval=5.0)
    running: dict[str, float] = {}
    for batch in loader:
        if config.max_minutes is not None and elapsed() > config.max_minutes * 60:
            stopped_by_time = True
            logger.info("time budget of %.1f min reached at step %d", config.max_minutes, step)
            break
        factor = lr_factor(step, config, elapsed())
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor
        with torch.enable_grad():  # also when the caller runs under no_grad (e.g. a test fixture)
            loss, logs = task.loss(model, heads, batch, config.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   config.grad_clip)
        optimizer.step()
        step += 1
        for k, v in logs.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items() if k in ("loss", "ans", "aux")}, refresh=False)
        if step % 50 == 0:
            logger.info("step %d lr %.2e gnorm %.2f %s", step, config.lr * factor, float(grad_norm),
                        " ".join(f"{k} {v:.4f}" for k, v in running.items()))
        if val_batch is not None and step % config.val_every == 0:
            model.eval()
            with torch.no_grad():
                val = task.quick_val(model, val_batch)
            model.train()
            history.append({"step": step, "elapsed_s": round(elapsed(), 1), **{k: round(v, 4) for k, v in running.items()},
                            **{f"val_{k}": round(v, 4) for k, v in val.items()}})
            logger.info("val @ %d: %s", step, val)
            bar.write(f"[{task.kind}] step {step} {elapsed() / 60:.1f} min: " + json.dumps(history[-1]))
        if step % config.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    train_s = elapsed()

    model.eval()
    t0 = time.time()
    metrics = task.evaluate(model, processor, config)
    eval_s = time.time() - t0
    summary: dict[str, Any] = {
        "kind": task.kind,
        "steps_run": step,
        "steps_planned": config.steps,
        "samples_seen": step * config.batch_size,
        "stopped_by_time_budget": stopped_by_time,
        "train_wall_minutes": round(train_s / 60, 2),
        "eval_wall_minutes": round(eval_s / 60, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(config),
        "metrics": metrics,
        "history": history,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }
    try:
        import transformers

        summary["environment"]["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if out_dir is not None:
        task.export(model, processor, Path(out_dir), summary)
        logger.info("exported %s to %s", task.kind, out_dir)
    return summary
