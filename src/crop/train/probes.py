"""Auxiliary probes: dense supervision that the training recipes add to the answer loss (training only).

A from-scratch vision tower learns what is in each image token far faster when every token is
also told what covers it, and the LLM reads the question faster when its hidden state at the
answer position must also say what the question asks about. This module holds both kinds of
linear probe and their targets:

* per-token labels (:func:`token_labels`: shape, colour and digit of the object covering each
  cell of the token grid) and their class-balanced loss (:func:`token_probe_loss`);
* question targets (:func:`question_targets`: family, shape, colour, direction asked about)
  and their loss (:func:`question_probe_loss`);
* the heads themselves (:func:`make_aux_heads`), which are trained alongside the model and
  never exported.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crop.data.synth import COLOR_NAMES, DIGITS, FAMILIES, SHAPES, SceneObject

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
    losses = [F.cross_entropy(heads[name](hidden), targets[:, k]) for k, (name, _) in enumerate(QUESTION_PROBES)]
    return sum(losses[1:], start=losses[0])


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
