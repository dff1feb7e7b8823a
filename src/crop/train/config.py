"""What one training run of an embedded model is asked to do, and what that means step by step.

:class:`TrainConfig` holds the hyper-parameters of a run of :func:`crop.train.loop.train`
(they are recorded in the checkpoint and the model card). The two schedules that follow from
it live here too, as pure functions of ``(step, config)``, because a resumed run must recompute
them exactly: :func:`batch_streams` (which synthetic stream each row of a step's batch comes
from: the tiny/sparse curriculum, then the default or dense mix) and :func:`lr_factor`
(linear warmup, then cosine decay that may follow the wall-clock budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# state-dict prefixes of the vision tower and projector (LLaVA, then Qwen2.5-VL naming)
VISION_PARTS: tuple[str, ...] = ("model.vision_tower.", "model.multi_modal_projector.", "model.visual.")

# state-dict prefixes each ``init_parts`` value loads (None: everything)
WARM_START_PARTS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "vision": VISION_PARTS,
}


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
