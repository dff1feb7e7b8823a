"""The training loop shared by the embedded-model recipes: seeded, resumable, time-boxed.

A recipe (:mod:`crop.train.answerer`, :mod:`crop.train.localizer`) supplies a :class:`Task`:
how to build the model, how to turn sample indices into a batch, the loss, and the final
evaluation. This module owns everything else: AdamW with linear warmup and cosine decay,
gradient clipping, checkpoints (model + optimizer + auxiliary heads + step + elapsed time)
every ``checkpoint_every`` steps and at the end, ``resume``, a wall-clock budget
(``max_minutes``) that stops cleanly and still evaluates and saves, and the export of the
trained model into the package (:func:`crop.embedded.save_embedded`).

Training data are generated on the fly: sample ``i`` of the train split is a pure function of
``(data_seed, i)`` (see :mod:`crop.data.synth`), and step ``s`` uses samples
``s * batch_size .. (s + 1) * batch_size - 1``, so a resumed run sees exactly the data an
uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crop.data.synth import COLOR_NAMES, DIGITS, FAMILIES, SHAPES, SceneObject

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the checkpoint and the model card).

    Args:
        steps: optimizer steps planned (the LR schedule spans them).
        batch_size: samples per step.
        lr: peak learning rate (AdamW).
        min_lr_ratio: final LR as a fraction of ``lr`` (cosine floor).
        warmup_steps: linear warmup length.
        weight_decay: AdamW weight decay (not applied to norms, biases, embeddings).
        grad_clip: max global gradient norm.
        seed: torch/numpy seed for the weights and the auxiliary heads.
        data_seed: seed of the synthetic train split.
        eval_seed: seed of the held-out split the final evaluation uses.
        eval_split: ``"test"`` (shifted knobs) or ``"val"``.
        eval_n: samples in the final evaluation.
        val_every: steps between quick teacher-forced validations (0 = never).
        val_n: samples per quick validation.
        checkpoint_every: steps between checkpoints.
        max_minutes: wall-clock budget over all (resumed) runs; when it binds the run stops,
            evaluates and saves. ``None`` = no budget.
        time_aware_schedule: if True, the schedule's progress is ``max(step / steps,
            elapsed / max_minutes)`` so a run cut short by the budget still anneals its LR.
        aux_weight: weight of the auxiliary per-visual-token losses (0 disables them).
        curriculum_fraction: fraction of the steps trained on sparse scenes (3-8 objects)
            before the default scene mix.
        tiny_fraction: fraction of the steps, before the sparse ones, on scenes of 3-4 objects
            (the first rung for a model that must learn to find the asked-about object).
        dense_fraction: share of each batch of the default mix drawn from dense scenes (12-16
            small objects, the hard end of the training range); 0 = the plain mix.
        threads: ``torch.set_num_threads`` (the CPU is shared).
        workers: data-loader worker processes generating samples (0 = in the main process).
        turns: questions per training image (answerer): the benchmark question first, then
            up to ``turns - 1`` other questions the same scene answers
            (:func:`crop.data.synth.scene_questions`) as further chat turns. The image costs
            most of a forward pass, so extra turns multiply the answer supervision cheaply.
            Evaluation is always single-turn.
        question_layer: LLM layer whose output at each answer's first position feeds the
            question probes (what the question asks about), when ``aux_weight > 0``.
        attn_weight: weight of the attention-supervision loss (0 = off; needs eager attention
            during training): head 0 of LLM layer ``attn_layer``, at each answer's first
            position, is trained to attend to the image tokens of the question's region.
            Without it a from-scratch model sits on a plateau where its answer ignores the
            image (a constant box, a prior-guess answer) for many hundreds of steps.
        attn_layer: the supervised LLM layer.
        digit_weight: weight of the digit probe among the per-token probes (shape and colour
            weigh 1); reading digits is what a from-scratch answerer learns last.
        init_from: folder of an exported model (:func:`crop.embedded.save_embedded`) whose
            weights start the run instead of random ones: a warm-started continuation with
            fresh probes, optimizer and schedule. Its sizes must match ``shape`` (for the parts loaded).
        freeze_parts: ``"none"``, or ``"vision"``: the vision tower and projector are not trained
            (typically after ``init_parts="vision"``: the steps then train the language model
            only, and cost no backward pass through the tower).
        init_parts: what ``init_from`` initializes: ``"all"`` (every weight), or ``"vision"``
            (the vision tower and the projector only; the language model starts random). The
            vision tower never sees the question, so a new answerer may reuse an earlier one's.
        shape: the model sizes (fields of ``LlavaShape`` / ``QwenShape``).
    """

    steps: int = 3000
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 0
    eval_seed: int = 0
    eval_split: str = "test"
    eval_n: int = 800
    val_every: int = 250
    val_n: int = 128
    checkpoint_every: int = 200
    max_minutes: float | None = None
    time_aware_schedule: bool = True
    aux_weight: float = 0.5
    curriculum_fraction: float = 0.1
    tiny_fraction: float = 0.0
    dense_fraction: float = 0.0
    threads: int = 1
    workers: int = 1
    turns: int = 1
    question_layer: int = 1
    attn_weight: float = 1.0
    attn_layer: int = 2
    digit_weight: float = 1.0
    init_from: str | None = None
    init_parts: str = "all"
    freeze_parts: str = "none"
    shape: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', got {self.eval_split!r}")
        if not 0 <= self.curriculum_fraction < 1 or not 0 <= self.tiny_fraction < 1 \
                or self.curriculum_fraction + self.tiny_fraction >= 1:
            raise ValueError("curriculum_fraction and tiny_fraction must be in [0, 1) and sum to less than 1")
        if not 0 <= self.dense_fraction <= 1:
            raise ValueError(f"dense_fraction must be in [0, 1], got {self.dense_fraction}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.freeze_parts not in ("none", "vision"):
            raise ValueError(f"freeze_parts must be 'none' or 'vision', got {self.freeze_parts!r}")
        if self.init_parts not in WARM_START_PARTS:
            raise ValueError(f"init_parts must be one of {sorted(WARM_START_PARTS)}, got {self.init_parts!r}")


def batch_streams(step: int, config: TrainConfig) -> list[str]:
    """The sample stream of each row of optimizer step ``step``'s batch (see :func:`crop.train.data.stream_config`).

    The first ``tiny_fraction`` of the steps draw from ``train-tiny``, the next
    ``curriculum_fraction`` from ``train-easy``; after that ``dense_fraction`` of each batch's
    rows come from ``train-dense`` and the rest from ``train``.
    """
    n_tiny = int(config.tiny_fraction * config.steps)
    n_curriculum = n_tiny + int(config.curriculum_fraction * config.steps)
    if step < n_tiny:
        return ["train-tiny"] * config.batch_size
    if step < n_curriculum:
        return ["train-easy"] * config.batch_size
    n_dense = round(config.dense_fraction * config.batch_size)
    return ["train-dense"] * n_dense + ["train"] * (config.batch_size - n_dense)


# state-dict prefixes each ``init_parts`` value loads (None: everything)
WARM_START_PARTS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "vision": ("model.vision_tower.", "model.multi_modal_projector.", "model.visual."),
}


def warm_start(model: nn.Module, warm: nn.Module, parts: str = "all") -> list[str]:
    """Copy ``warm``'s weights into ``model``: all of them, or only the parts ``parts`` names.

    Args:
        model: the freshly built model.
        warm: a trained model of the same architecture (same sizes for the copied parts).
        parts: a key of :data:`WARM_START_PARTS`.

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


# --------------------------------------------------------------------------------------------
# auxiliary per-token labels (dense supervision of the visual features during training only)

SHAPE_CLASSES = ("none", *SHAPES, "card")
COLOR_CLASSES = ("none", *COLOR_NAMES)
DIGIT_CLASSES = ("none", *DIGITS)


def token_labels(objects: list[SceneObject], image_size: int, rows: int, cols: int, min_cover: float = 0.25) -> np.ndarray:
    """Per-token labels of what object covers each cell of a ``rows`` x ``cols`` token grid.

    A cell takes the object overlapping it most, if that object covers at least
    ``min_cover`` of the cell or of itself; otherwise it is background (class 0).

    Args:
        objects: the scene's objects (``SynthSample.objects``).
        image_size: image side in pixels.
        rows, cols: the token grid.
        min_cover: minimum covered fraction.

    Returns:
        ``int64`` array ``(3, rows * cols)``: shape, colour and digit class per token
        (indices into :data:`SHAPE_CLASSES`, :data:`COLOR_CLASSES`, :data:`DIGIT_CLASSES`).
    """
    labels = np.zeros((3, rows * cols), dtype=np.int64)
    if not objects:
        return labels
    ch, cw = image_size / rows, image_size / cols
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    cells = np.stack([xs * cw, ys * ch, (xs + 1) * cw, (ys + 1) * ch], -1).reshape(-1, 4)  # (N, 4)
    boxes = np.asarray([o.bbox for o in objects], dtype=np.float64)  # (K, 4)
    iw = np.clip(np.minimum(cells[:, None, 2], boxes[None, :, 2]) - np.maximum(cells[:, None, 0], boxes[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(cells[:, None, 3], boxes[None, :, 3]) - np.maximum(cells[:, None, 1], boxes[None, :, 1]), 0, None)
    inter = iw * ih  # (N, K)
    obj_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (K,)
    best = inter.argmax(1)  # (N,)
    best_inter = inter[np.arange(len(cells)), best]
    ok = (best_inter >= min_cover * ch * cw) | (best_inter >= min_cover * obj_area[best])
    for n in np.nonzero(ok)[0]:
        o = objects[best[n]]
        labels[0, n] = SHAPE_CLASSES.index(o.shape)
        labels[1, n] = COLOR_CLASSES.index(o.color)
        labels[2, n] = DIGIT_CLASSES.index(o.digit) if o.digit is not None else 0
    return labels


DIRECTION_CLASSES = ("none", "left", "right")
QUESTION_PROBES = (("qfamily", FAMILIES), ("qshape", SHAPE_CLASSES), ("qcolor", COLOR_CLASSES),
                   ("qdir", DIRECTION_CLASSES))


def question_targets(question: str, family: str) -> list[int]:
    """What a benchmark question asks about, as class indices for the question probes.

    Args:
        question: the question text.
        family: its family.

    Returns:
        ``[family, shape, colour, direction]`` indices into :data:`FAMILIES`,
        :data:`SHAPE_CLASSES`, :data:`COLOR_CLASSES` and :data:`DIRECTION_CLASSES` (0 = none).
    """
    words = question.lower().rstrip("?").split()
    shape = next((w for w in words if w in SHAPE_CLASSES[1:]), None)
    shape = shape or next((w[:-1] for w in words if w[:-1] in SHAPES), "none")
    color = next((w for w in words if w in COLOR_NAMES), "none")
    direction = next((w for w in words if w in DIRECTION_CLASSES[1:]), "none")
    return [FAMILIES.index(family), SHAPE_CLASSES.index(shape), COLOR_CLASSES.index(color),
            DIRECTION_CLASSES.index(direction)]


def question_probe_loss(heads: nn.ModuleDict, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the question probes.

    Args:
        heads: holds ``qfamily``, ``qshape``, ``qcolor``, ``qdir``.
        hidden: (N, D) LLM hidden states at each answer's first position.
        targets: (N, 4) from :func:`question_targets`.

    Returns:
        The summed loss (scalar).
    """
    return sum(F.cross_entropy(heads[name](hidden), targets[:, k]) for k, (name, _) in enumerate(QUESTION_PROBES))


def region_token_target(box_px: list[int], image_size: int, grid: int) -> np.ndarray:
    """A uniform distribution over the tokens of a ``grid`` x ``grid`` token grid that a pixel box overlaps.

    Args:
        box_px: ``[x0, y0, x1, y1]`` in pixels (``x1, y1`` exclusive).
        image_size: image side in pixels.
        grid: tokens per side.

    Returns:
        ``float32`` array ``(grid * grid,)`` summing to 1.
    """
    from crop.data.synth import pixel_box_to_grid

    x0, y0, x1, y1 = pixel_box_to_grid(box_px, image_size, grid)
    target = np.zeros((grid, grid), dtype=np.float32)
    target[y0:y1 + 1, x0:x1 + 1] = 1.0
    return (target / target.sum()).reshape(-1)


def attention_loss(probs: torch.Tensor, rows: torch.Tensor, image_pos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between target distributions over image tokens and one head's attention rows.

    Args:
        probs: (Q, L) attention probabilities of the supervised head at the query positions.
        rows: (Q,) batch row of each query.
        image_pos: (B, N) sequence positions of each row's N image tokens.
        targets: (Q, N) target distributions.

    Returns:
        The mean over queries of ``-sum_j target_j * log attn_j`` (scalar).
    """
    a = torch.gather(probs, 1, image_pos[rows])  # (Q, N)
    return -(targets * torch.log(a + 1e-8)).sum(-1).mean()


def image_positions(input_ids: torch.Tensor, image_token_id: int, n: int) -> torch.Tensor:
    """(B, N) positions of the ``n`` image tokens in each row of ``input_ids`` (B, L)."""
    pos = (input_ids == image_token_id).nonzero()  # (B * N, 2), row-major
    if pos.shape[0] != input_ids.shape[0] * n:
        raise ValueError(f"expected {n} image tokens per row")
    return pos[:, 1].reshape(input_ids.shape[0], n)


def make_aux_heads(dim: int, extra: dict[str, int] | None = None, question: bool = True) -> nn.ModuleDict:
    """Linear probes: shape, colour, digit of visual tokens; question probes; ``extra`` name -> classes."""
    heads = {
        "shape": nn.Linear(dim, len(SHAPE_CLASSES)),
        "color": nn.Linear(dim, len(COLOR_CLASSES)),
        "digit": nn.Linear(dim, len(DIGIT_CLASSES)),
    }
    if question:
        heads.update({name: nn.Linear(dim, len(classes)) for name, classes in QUESTION_PROBES})
    for name, n in (extra or {}).items():
        heads[name] = nn.Linear(dim, n)
    return nn.ModuleDict(heads)


def token_probe_loss(heads: nn.ModuleDict, names: tuple[str, ...], tokens: torch.Tensor, labels: torch.Tensor,
                     weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Class-balanced cross-entropy of per-token probes: object tokens and background weigh half each.

    Objects cover a small share of the tokens (a digit card is 2-6 of 256), so a plain mean is
    dominated by background and a from-scratch tower learns, e.g., digits only very slowly.

    Args:
        heads: the probes, by name.
        names: probes to apply; ``labels[:, k]`` holds the classes of ``names[k]`` (0 = background).
        tokens: ``(B, N, D)`` token features.
        labels: ``(B, len(names), N)`` class indices.
        weights: per-probe weights (default all 1).

    Returns:
        The weighted sum over probes of ``(mean CE over object tokens + mean CE over background) / 2``.
    """
    total = tokens.new_zeros(())
    for k, name in enumerate(names):
        weight = 1.0 if weights is None else weights[k]
        target = labels[:, k].reshape(-1)  # (B * N,)
        ce = F.cross_entropy(heads[name](tokens).flatten(0, 1), target, reduction="none")  # (B * N,)
        fg = target > 0
        parts = [ce[m].mean() for m in (fg, ~fg) if m.any()]
        total = total + weight * sum(parts) / len(parts)
    return total


def llm_layer_index(model: nn.Module, index: int) -> int:
    """``index`` clamped to the LLM's depth (tiny test models are shallower than the recipes assume)."""
    return min(index, len(model.model.language_model.layers) - 1)


def llm_layer(model: nn.Module, index: int) -> nn.Module:
    """LLM decoder layer ``index``, clamped to the model's depth (see :func:`llm_layer_index`)."""
    return model.model.language_model.layers[llm_layer_index(model, index)]


class Capture:
    """Keeps the output of one module during a forward pass (an instance-level hook).

    Args:
        module: the module whose output to keep.
        select: maps the raw output to the tensor to keep (default: the output itself, or
            its first element when it is a tuple).
    """

    def __init__(self, module: nn.Module, select: Callable[[Any], torch.Tensor] | None = None):
        self.value: torch.Tensor | None = None
        self._select = select or (lambda out: out[0] if isinstance(out, tuple) else out)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = self._select(output)

    def pop(self) -> torch.Tensor:
        """The captured tensor (cleared after reading)."""
        if self.value is None:
            raise RuntimeError("nothing captured: the hooked module did not run")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()


# --------------------------------------------------------------------------------------------
# the loop


def lr_factor(step: int, config: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Warmup then cosine decay to ``min_lr_ratio``; progress may follow the time budget.

    Args:
        step: the optimizer step about to run (0-based).
        config: the run's config.
        elapsed_s: wall time spent so far (used if ``time_aware_schedule`` and a budget).

    Returns:
        The multiplier of ``config.lr``.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.time_aware_schedule and config.max_minutes:
        progress = max(progress, elapsed_s / (config.max_minutes * 60))
    progress = min(1.0, progress)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
    decay, no_decay = [], []
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
        prefixes = WARM_START_PARTS["vision"]
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
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
    summary = {
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


# --------------------------------------------------------------------------------------------
# attention capture for attention supervision, with SDPA kept for the actual computation

CAPTURE_ATTENTION = "crop_train_capture"
_CAPTURE: dict[str, Any] = {"layer": None, "rows": None, "probs": None}


def _capture_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention that also keeps head 0's probabilities at some query positions of one layer.

    ``query``/``key`` are (B, H, L, d) after RoPE. Rows are right-padded and the supervised
    query positions lie inside the real sequence, so a causal mask alone is exact for them.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _CAPTURE["layer"] is not None and getattr(module, "layer_idx", None) == _CAPTURE["layer"]:
        rows, pos = _CAPTURE["rows"][:, 0], _CAPTURE["rows"][:, 1]  # (Q,), (Q,)
        q = query[rows, 0, pos]  # (Q, d): query head 0 reads kv head 0 under GQA
        k = key[rows, 0]  # (Q, L, d)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        logits = torch.einsum("qd,qld->ql", q, k) * scale  # (Q, L)
        future = torch.arange(k.shape[1], device=k.device)[None] > pos[:, None]  # (Q, L)
        _CAPTURE["probs"] = logits.masked_fill(future, float("-inf")).softmax(-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_capture_attention() -> str:
    """Register the capturing attention (and SDPA's mask builder) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return CAPTURE_ATTENTION


class AttentionCapture:
    """Within ``with``, keep head 0's attention probabilities of LLM layer ``layer`` at ``rows``.

    The model's language model must use :data:`CAPTURE_ATTENTION` (see
    :func:`use_capture_attention`); outside the block that implementation is plain SDPA.

    Args:
        layer: the decoder layer index (``self_attn.layer_idx``); ``None`` captures nothing.
        rows: (Q, 2) (batch row, query position) pairs.
    """

    def __init__(self, layer: int | None, rows: torch.Tensor | None = None):
        self.layer, self.rows = layer, rows
        self.probs: torch.Tensor | None = None  # (Q, L) after the block

    def __enter__(self) -> AttentionCapture:
        _CAPTURE.update(layer=self.layer, rows=self.rows, probs=None)
        return self

    def __exit__(self, *exc) -> None:
        self.probs = _CAPTURE["probs"]
        _CAPTURE.update(layer=None, rows=None, probs=None)


def use_capture_attention(model: nn.Module) -> None:
    """Make ``model``'s language model use the capturing SDPA attention (vision tower untouched)."""
    name = register_capture_attention()
    model.set_attn_implementation({"text_config": name})
