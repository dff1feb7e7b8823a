"""A seeded, procedural localized-VQA benchmark: cluttered scenes, questions, answers, regions.

Every sample is a pure function of ``(seed, split, index, config)``: the random stream of
sample ``index`` is ``numpy.random.default_rng([seed, SPLIT_CODES[split], index])``, so the
same arguments give byte-identical images and records, samples can be generated in any order
(training generates them on the fly), and the three splits never share a stream.

Scenes are ``image_size`` x ``image_size`` RGB images (336 by default, LLaVA-1.5's input) with
a textured background and many salient objects: coloured shapes (circle, square, triangle,
star) and coloured cards with a white or black digit. The question families are

- ``attribute``: "What color is the star?"  (exactly one object of that shape; other objects
  share its colour);
- ``text``: "What number is on the green card?"  (exactly one card of that colour; other
  cards carry other digits; other objects share its colour);
- ``relation``: "What shape is left of the red circle?"  (exactly one red circle; the answer
  is the nearest object on that side whose vertical extent overlaps it; the region is the
  union of both objects);
- ``global``: "How many circles are there?"  (1-4; the region is the whole image).

Regions are given in pixels, ``box_px = [x0, y0, x1, y1]`` with ``x1, y1`` exclusive (PIL's
crop convention), and on a ``grid`` x ``grid`` grid (8 by default), ``box_grid = [x0, y0, x1,
y1]``, 0-indexed and inclusive: **every cell that the pixel box overlaps with positive area**,
i.e. ``x0_cell = floor(x0 * grid / W)`` and ``x1_cell = ceil(x1 * grid / W) - 1`` (see
:func:`pixel_box_to_grid`).

Answers are short (a colour, a shape, a digit) and scored by normalized exact match
(:func:`answers_match`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
FAMILIES: tuple[str, ...] = ("attribute", "text", "relation", "global")
BACKGROUNDS: tuple[str, ...] = ("grain", "stripes", "blobs")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
MAX_COUNT = 4  # global questions ask for counts 1..MAX_COUNT


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (the distribution-shift controls are the first four).

    Args:
        n_objects: inclusive range of objects per scene (shapes + cards), before the
            family's own requirements; scenes that cannot fit them are packed as tightly as
            the placement allows.
        object_scale: inclusive range of an object's side as a fraction of the image side
            (0.095-0.155 is 32-52 px at 336 px).
        backgrounds: background textures drawn from uniformly, from :data:`BACKGROUNDS`.
        n_cards: inclusive range of digit cards per scene (text questions force at least 2).
        image_size: side of the square image in pixels.
        grid: side of the region grid (``box_grid`` is on ``grid`` x ``grid`` cells).
        families: question families, assigned round-robin by sample index so every split is
            balanced.
    """

    n_objects: tuple[int, int] = (6, 16)
    object_scale: tuple[float, float] = (0.095, 0.155)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    n_cards: tuple[int, int] = (1, 3)
    image_size: int = 336
    grid: int = 8
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        lo, hi = self.n_objects
        if not 3 <= lo <= hi <= 40:
            raise ValueError(f"n_objects must satisfy 3 <= min <= max <= 40, got {self.n_objects}")
        slo, shi = self.object_scale
        if not 0.03 <= slo <= shi <= 0.3:
            raise ValueError(f"object_scale must satisfy 0.03 <= min <= max <= 0.3, got {self.object_scale}")
        if not self.backgrounds or any(b not in BACKGROUNDS for b in self.backgrounds):
            raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {self.backgrounds}")
        clo, chi = self.n_cards
        if not 0 <= clo <= chi <= 5:
            raise ValueError(f"n_cards must satisfy 0 <= min <= max <= 5, got {self.n_cards}")
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if not 1 <= self.grid <= self.image_size:
            raise ValueError(f"grid must be in [1, image_size], got {self.grid}")
        if not self.families or any(f not in FAMILIES for f in self.families):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        """Inverse of :meth:`to_dict`."""
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def default_config(split: str, **overrides) -> SynthConfig:
    """The default knobs of ``split``; the test split is shifted toward harder scenes.

    Train and val: 6-16 objects of 32-52 px (at 336). Test: denser scenes (12-16 objects) of
    smaller objects (30-46 px), i.e. the hard end of the training range, so a held-out test
    differs from training without leaving its support.

    Args:
        split: one of :data:`SPLITS`.
        **overrides: fields of :class:`SynthConfig` to set.

    Returns:
        The config.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    config = SynthConfig()
    if split == "test":
        config = replace(config, n_objects=(12, 16), object_scale=(0.09, 0.137))
    return replace(config, **overrides) if overrides else config


@dataclass
class SceneObject:
    """One drawn object. ``bbox`` is ``[x0, y0, x1, y1]`` in pixels, ``x1, y1`` exclusive."""

    kind: str  # "shape" or "card"
    shape: str  # one of SHAPES, or "card"
    color: str
    bbox: list[int]
    digit: str | None = None

    @property
    def cx(self) -> float:
        return (self.bbox[0] + self.bbox[2]) / 2

    @property
    def cy(self) -> float:
        return (self.bbox[1] + self.bbox[3]) / 2


@dataclass
class SynthSample:
    """One benchmark sample (``objects`` is the scene's ground truth, for checks and training)."""

    id: str
    image: Image.Image
    question: str
    answer: str
    family: str
    box_px: list[int]
    box_grid: list[int]
    objects: list[SceneObject] = field(default_factory=list)

    def record(self, image_path: str) -> dict:
        """The JSONL record of this sample, with its image at ``image_path`` (relative)."""
        return {
            "id": self.id,
            "image": image_path,
            "question": self.question,
            "answer": self.answer,
            "family": self.family,
            "box_px": list(self.box_px),
            "box_grid": list(self.box_grid),
        }


# --------------------------------------------------------------------------------------------
# geometry


def pixel_box_to_grid(box_px: list[int] | tuple[int, ...], image_size: int | tuple[int, int], grid: int = 8) -> list[int]:
    """The inclusive grid cells a pixel box overlaps with positive area.

    Args:
        box_px: ``[x0, y0, x1, y1]`` in pixels, ``x1, y1`` exclusive, ``x0 < x1``, ``y0 < y1``.
        image_size: the image side, or ``(width, height)``.
        grid: cells per side.

    Returns:
        ``[cx0, cy0, cx1, cy1]``, 0-indexed inclusive cells, ``0 <= c0 <= c1 <= grid - 1``.
    """
    w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
    x0, y0, x1, y1 = (int(v) for v in box_px)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {box_px} is empty or outside the {w}x{h} image")
    # floor(x0 * g / W) and ceil(x1 * g / W) - 1, in integer arithmetic
    return [x0 * grid // w, y0 * grid // h, -(-x1 * grid // w) - 1, -(-y1 * grid // h) - 1]


def _union(a: list[int], b: list[int]) -> list[int]:
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def _overlaps(a: list[int], b: list[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _v_overlap(a: list[int], b: list[int]) -> bool:
    return a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------------------------
# drawing


def _background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    """A muted, textured background (low saturation so objects' colours stay distinct)."""
    base = rng.uniform(95, 175) + rng.uniform(-18, 18, size=3)  # (3,) greyish base colour
    if kind == "grain":
        coarse = rng.normal(0, 1, size=(7, 7, 3)).astype(np.float32)
        coarse_img = Image.fromarray(((coarse + 4) * 30).clip(0, 255).astype(np.uint8))  # (7, 7, 3)
        low = np.asarray(
            coarse_img.resize((size, size), Image.Resampling.BICUBIC),
            dtype=np.float32,
        ) / 30 - 4  # (S, S, 3) smooth field
        img = base + 16 * low
    elif kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(10, 40)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)  # (S, S)
        tint = rng.uniform(-1, 1, size=3)
        img = base + 18 * wave[..., None] * (0.6 + 0.4 * tint)
    else:  # blobs
        canvas = Image.new("RGB", (size, size), tuple(int(c) for c in base.clip(0, 255)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(12, 24))):
            r = rng.uniform(0.04, 0.16) * size
            x, y = rng.uniform(0, size, size=2)
            col = (base + rng.uniform(-35, 35, size=3)).clip(0, 255).astype(int)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in col))
        img = np.asarray(canvas.filter(ImageFilter.GaussianBlur(3)), dtype=np.float32)
    # thin clutter lines and pixel noise on every background
    img = img + rng.normal(0, 7, size=(size, size, 3))
    canvas = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 10))):
        p = rng.uniform(0, size, size=4)
        col = (base + rng.uniform(-45, 45, size=3)).clip(0, 255).astype(int)
        draw.line([float(v) for v in p], fill=tuple(int(c) for c in col), width=int(rng.integers(1, 3)))
    return canvas


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


# load_default gives the bundled FreeType font at ``size`` (Pillow's wheels all have FreeType); a
# Pillow built without FreeType falls back to its fixed-size bitmap font
_FONT_CACHE: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if px not in _FONT_CACHE:
        _FONT_CACHE[px] = ImageFont.load_default(size=px)  # Pillow's bundled font: same bytes everywhere
    return _FONT_CACHE[px]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = obj.bbox
    fill = tuple(int(c) for c in (np.array(COLORS[obj.color]) + rng.integers(-12, 13, size=3)).clip(0, 255))
    outline = (25, 25, 25)
    cx, cy = obj.cx, obj.cy
    w, h = x1 - x0, y1 - y0
    box = [x0, y0, x1 - 1, y1 - 1]  # PIL's drawing boxes are inclusive
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill, outline=outline, width=2)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy + h * 0.04, min(w, h) / 2, 0.0), fill=fill, outline=outline, width=2)
    elif obj.shape == "card":
        draw.rounded_rectangle(box, radius=max(2, w // 8), fill=fill, outline=outline, width=2)
        ink = (15, 15, 15) if obj.color == "yellow" else (250, 250, 250)
        draw.text((cx, cy), obj.digit or "", fill=ink, font=_font(max(8, int(h * 0.72))), anchor="mm")
    else:  # pragma: no cover - guarded by construction
        raise ValueError(f"unknown shape {obj.shape!r}")


# --------------------------------------------------------------------------------------------
# scene construction


class _Placer:
    """Rejection-samples non-overlapping object boxes."""

    def __init__(self, rng: np.random.Generator, config: SynthConfig):
        self.rng, self.config = rng, config
        self.size = config.image_size
        self.gap = max(2, self.size // 80)
        self.objects: list[SceneObject] = []

    def side(self) -> int:
        lo, hi = self.config.object_scale
        return int(round(self.rng.uniform(lo, hi) * self.size))

    def free(self, bbox: list[int]) -> bool:
        if bbox[0] < 1 or bbox[1] < 1 or bbox[2] > self.size - 1 or bbox[3] > self.size - 1:
            return False
        return not any(_overlaps(bbox, o.bbox, self.gap) for o in self.objects)

    def bbox_for(self, kind: str, side: int, x0: int, y0: int) -> list[int]:
        w = int(round(side * 0.78)) if kind == "card" else side
        return [x0, y0, x0 + w, y0 + side]

    def random_bbox(self, kind: str, side: int | None = None, tries: int = 60, ok: Callable[[list[int]], bool] | None = None):
        for _ in range(tries):
            s = side or self.side()
            w = int(round(s * 0.78)) if kind == "card" else s
            x0 = int(self.rng.integers(1, self.size - w - 1))
            y0 = int(self.rng.integers(1, self.size - s - 1))
            bbox = self.bbox_for(kind, s, x0, y0)
            if self.free(bbox) and (ok is None or ok(bbox)):
                return bbox
        return None

    def add(self, obj: SceneObject) -> SceneObject:
        self.objects.append(obj)
        return obj


def _choice(rng: np.random.Generator, seq, exclude=()):
    options = [s for s in seq if s not in exclude]
    return options[int(rng.integers(len(options)))]


def _fill(
    placer: _Placer,
    n_total: int,
    n_cards: int,
    shape_ok: Callable[[str, str], bool],
    card_ok: Callable[[str, str], bool],
    bbox_ok: Callable[[list[int]], bool] | None = None,
) -> None:
    """Add cards then shapes until the scene has ``n_total`` objects (or no room is left)."""
    rng = placer.rng
    have_cards = sum(o.kind == "card" for o in placer.objects)
    for _ in range(max(0, n_cards - have_cards)):
        for _attempt in range(10):
            color, digit = _choice(rng, COLOR_NAMES), _choice(rng, DIGITS)
            if card_ok(color, digit):
                break
        else:
            continue
        bbox = placer.random_bbox("card", ok=bbox_ok)
        if bbox is not None:
            placer.add(SceneObject("card", "card", color, bbox, digit))
    misses = 0
    while len(placer.objects) < n_total and misses < 8:
        for _attempt in range(20):
            shape, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
            if shape_ok(shape, color):
                break
        else:
            misses += 1
            continue
        bbox = placer.random_bbox("shape", ok=bbox_ok)
        if bbox is None:
            misses += 1
            continue
        placer.add(SceneObject("shape", shape, color, bbox))


def _plural(shape: str) -> str:
    return shape + "s"


def _scene_attribute(placer: _Placer, n_total: int, n_cards: int):
    rng = placer.rng
    shape, color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    target = placer.add(SceneObject("shape", shape, color, placer.random_bbox("shape", tries=200)))
    # a same-coloured distractor of another shape, so colour alone does not give it away
    bbox = placer.random_bbox("shape")
    if bbox is not None:
        placer.add(SceneObject("shape", _choice(rng, SHAPES, (shape,)), color, bbox))
    _fill(placer, n_total, n_cards, shape_ok=lambda s, c: s != shape, card_ok=lambda c, d: True)
    return f"What color is the {shape}?", color, list(target.bbox)


def _scene_text(placer: _Placer, n_total: int, n_cards: int):
    rng = placer.rng
    color, digit = _choice(rng, COLOR_NAMES), _choice(rng, DIGITS)
    target = placer.add(SceneObject("card", "card", color, placer.random_bbox("card", tries=200), digit))
    # another card with another digit, and a same-coloured shape
    bbox = placer.random_bbox("card")
    if bbox is not None:
        placer.add(SceneObject("card", "card", _choice(rng, COLOR_NAMES, (color,)), bbox, _choice(rng, DIGITS, (digit,))))
    bbox = placer.random_bbox("shape")
    if bbox is not None:
        placer.add(SceneObject("shape", _choice(rng, SHAPES), color, bbox))
    _fill(placer, n_total, max(n_cards, 2), shape_ok=lambda s, c: True, card_ok=lambda c, d: c != color)
    return f"What number is on the {color} card?", digit, list(target.bbox)


def _scene_relation(placer: _Placer, n_total: int, n_cards: int):
    rng = placer.rng
    size = placer.size
    direction = "left" if rng.integers(2) == 0 else "right"
    a_shape, a_color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
    for _ in range(400):
        s_a, s_p = placer.side(), placer.side()
        gap = int(rng.integers(placer.gap + 1, placer.gap + max(4, size // 30)))
        dy = int(rng.integers(-(min(s_a, s_p) // 4), min(s_a, s_p) // 4 + 1))
        ax0 = int(rng.integers(1, size - s_a - 1))
        ay0 = int(rng.integers(1, size - s_a - 1))
        a_box = [ax0, ay0, ax0 + s_a, ay0 + s_a]
        py0 = ay0 + (s_a - s_p) // 2 + dy
        px0 = ax0 - gap - s_p if direction == "left" else ax0 + s_a + gap
        p_box = [px0, py0, px0 + s_p, py0 + s_p]
        if placer.free(a_box) and placer.free(p_box) and not _overlaps(a_box, p_box, placer.gap):
            break
    else:  # pragma: no cover - an empty canvas always has room
        raise RuntimeError("could not place the relation pair")
    anchor = placer.add(SceneObject("shape", a_shape, a_color, a_box))
    while True:
        p_shape, p_color = _choice(rng, SHAPES), _choice(rng, COLOR_NAMES)
        if (p_shape, p_color) != (a_shape, a_color):
            break
    partner = placer.add(SceneObject("shape", p_shape, p_color, p_box))

    def bbox_ok(b: list[int]) -> bool:
        # nothing may sit on the asked side, overlapping the anchor's rows, nearer than the partner
        if not _v_overlap(b, anchor.bbox):
            return True
        cx = (b[0] + b[2]) / 2
        if direction == "left":
            return not (cx < anchor.cx and b[2] > partner.bbox[0])
        return not (cx > anchor.cx and b[0] < partner.bbox[2])

    # distractors sharing the anchor's shape or colour, but never both
    for shape, color in ((a_shape, _choice(rng, COLOR_NAMES, (a_color,))), (_choice(rng, SHAPES, (a_shape,)), a_color)):
        bbox = placer.random_bbox("shape", ok=bbox_ok)
        if bbox is not None:
            placer.add(SceneObject("shape", shape, color, bbox))
    _fill(
        placer, n_total, n_cards, shape_ok=lambda s, c: (s, c) != (a_shape, a_color), card_ok=lambda c, d: True,
        bbox_ok=bbox_ok,
    )
    return f"What shape is {direction} of the {a_color} {a_shape}?", p_shape, _union(anchor.bbox, partner.bbox)


def _scene_global(placer: _Placer, n_total: int, n_cards: int):
    rng = placer.rng
    shape = _choice(rng, SHAPES)
    count = int(rng.integers(1, MAX_COUNT + 1))
    placed = 0
    for _ in range(count):
        bbox = placer.random_bbox("shape", tries=200)
        if bbox is not None:
            placer.add(SceneObject("shape", shape, _choice(rng, COLOR_NAMES), bbox))
            placed += 1
    _fill(placer, n_total, n_cards, shape_ok=lambda s, c: s != shape, card_ok=lambda c, d: True)
    return f"How many {_plural(shape)} are there?", str(placed), [0, 0, placer.size, placer.size]


_SCENES = {"attribute": _scene_attribute, "text": _scene_text, "relation": _scene_relation, "global": _scene_global}


def scene_questions(objects: list[SceneObject], image_size: int) -> list[tuple[str, str, str, list[int]]]:
    """Every well-posed question a scene answers, under the generator's rules.

    Used to get several questions out of one rendered scene (e.g. multi-turn training). A
    relation question is included only when its answer is unambiguous: the nearest object on
    that side overlapping the anchor's rows is a shape, within 2.5 object sides, and clearly
    nearer (by a quarter side) than the next one.

    Args:
        objects: the scene's objects (``SynthSample.objects``).
        image_size: the image side in pixels.

    Returns:
        ``(family, question, answer, box_px)`` tuples in a deterministic order.
    """
    out: list[tuple[str, str, str, list[int]]] = []
    shapes = [o for o in objects if o.kind == "shape"]
    cards = [o for o in objects if o.kind == "card"]
    for shape in SHAPES:
        same = [o for o in shapes if o.shape == shape]
        if len(same) == 1:
            out.append(("attribute", f"What color is the {shape}?", same[0].color, list(same[0].bbox)))
    for color in COLOR_NAMES:
        same = [o for o in cards if o.color == color]
        if len(same) == 1:
            out.append(("text", f"What number is on the {color} card?", same[0].digit or "", list(same[0].bbox)))
    for a in shapes:
        if sum((o.shape, o.color) == (a.shape, a.color) for o in shapes) != 1:
            continue
        side = a.bbox[2] - a.bbox[0]
        for direction in ("left", "right"):
            cands = sorted(
                (abs(o.cx - a.cx), i)
                for i, o in enumerate(objects)
                if o is not a and _v_overlap(o.bbox, a.bbox) and ((o.cx < a.cx) if direction == "left" else (o.cx > a.cx))
            )
            if not cands:
                continue
            dist, i = cands[0]
            p = objects[i]
            if p.kind != "shape" or dist > 2.5 * side or (len(cands) > 1 and cands[1][0] - dist < side / 4):
                continue
            out.append(("relation", f"What shape is {direction} of the {a.color} {a.shape}?", p.shape,
                        _union(a.bbox, p.bbox)))
    for shape in SHAPES:
        count = sum(o.shape == shape for o in shapes)
        if 1 <= count <= MAX_COUNT:
            out.append(("global", f"How many {_plural(shape)} are there?", str(count), [0, 0, image_size, image_size]))
    return out


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of ``split`` under ``seed``."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def generate_sample(index: int, seed: int = 0, split: str = "train", config: SynthConfig | None = None) -> SynthSample:
    """Generate sample ``index`` of ``split`` (a pure function of its arguments).

    Args:
        index: position in the split (>= 0); the family is ``config.families[index % len]``.
        seed: the benchmark seed.
        split: ``"train"``, ``"val"`` or ``"test"`` (each has its own random stream).
        config: the knobs; ``default_config(split)`` when ``None``.

    Returns:
        The sample, with a PIL RGB image of ``config.image_size`` x ``config.image_size``.
    """
    config = config or default_config(split)
    rng = sample_rng(seed, split, index)
    family = config.families[index % len(config.families)]
    background = config.backgrounds[int(rng.integers(len(config.backgrounds)))]
    image = _background(rng, config.image_size, background)
    placer = _Placer(rng, config)
    n_total = int(rng.integers(config.n_objects[0], config.n_objects[1] + 1))
    n_cards = int(rng.integers(config.n_cards[0], config.n_cards[1] + 1))
    question, answer, box_px = _SCENES[family](placer, n_total, n_cards)
    draw = ImageDraw.Draw(image)
    for obj in placer.objects:
        _draw_object(draw, obj, rng)
    return SynthSample(
        id=f"{split}-{index:06d}",
        image=image,
        question=question,
        answer=answer,
        family=family,
        box_px=[int(v) for v in box_px],
        box_grid=pixel_box_to_grid(box_px, config.image_size, config.grid),
        objects=placer.objects,
    )


def generate(
    n: int, seed: int = 0, split: str = "train", config: SynthConfig | None = None, start: int = 0
) -> Iterator[SynthSample]:
    """Samples ``start .. start + n - 1`` of ``split`` (see :func:`generate_sample`)."""
    for i in range(start, start + n):
        yield generate_sample(i, seed, split, config)


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``n`` samples as PNGs under ``out_dir/<split>/images/`` and one ``<split>.jsonl``.

    Also writes ``<split>.meta.json`` with the seed and knobs. The same arguments give
    byte-identical files.

    Args:
        out_dir: output directory (created).
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: number of samples (>= 1).
        seed: the benchmark seed.
        config: the knobs; ``default_config(split)`` when ``None``.
        progress: called with 1 after each written sample (e.g. ``tqdm.update``).

    Returns:
        The path of the JSONL file.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    config = config or default_config(split)
    out = Path(out_dir)
    img_dir = out / split / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{split}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for sample in generate(n, seed, split, config):
            rel = f"{split}/images/{sample.id}.png"
            sample.image.save(out / rel, format="PNG")
            fh.write(json.dumps(sample.record(rel), sort_keys=False) + "\n")
            if progress is not None:
                progress(1)
    meta = {"split": split, "n": n, "seed": seed, "config": config.to_dict(), "version": 1}
    (out / f"{split}.meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %d %s samples to %s", n, split, jsonl)
    return jsonl


def read_split(jsonl: str | Path) -> list[dict]:
    """Read a split's JSONL records; ``image`` paths are resolved against the file's folder."""
    path = Path(jsonl)
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                rec["image"] = str(path.parent / rec["image"])
                records.append(rec)
    return records


# --------------------------------------------------------------------------------------------
# scoring

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
)}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Normalize a short answer: lower case, no punctuation or articles, number words as digits.

    Args:
        text: a predicted or reference answer.

    Returns:
        The normalized answer, words joined by single spaces ("The Star." -> "star",
        " three " -> "3").
    """
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def answers_match(prediction: str, reference: str) -> bool:
    """Normalized exact match of a prediction against the reference answer."""
    return normalize_answer(prediction) == normalize_answer(reference)
