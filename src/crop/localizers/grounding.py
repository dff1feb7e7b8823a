"""Zero-shot grounding localizer: a stock instruct Qwen VLM asked for the box in its own grounding format.

No training: the question is turned into a grounding request ("locate the region needed to
answer ...") in the format the model family was trained to answer, the box it writes is
mapped to the region grid by the overlap rule the synthetic training data uses
(:func:`crop.data.synth.pixel_box_to_grid`: every cell the box overlaps with positive area),
and an answer with no usable box falls back to the whole image, flagged
(:attr:`crop.localizers.base.Localization.fallback`, ``localizer_fallback`` in results), with
the raw text kept. Use it as ``--localizer grounding:<hub id or folder>``
(:func:`crop.localizers.make_localizer`).

The formats, per ``config.model_type``, and where each is documented:

- **Qwen2-VL** (``qwen2_vl``): ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
  coordinates "normalized within [0, 1000)" of the image: Qwen2-VL technical report,
  arXiv 2409.12191, section 2.2.1 "Visual Grounding" (its referring-grounding example puts the
  referring expression between the object-ref tokens in the user turn, as the prompt here does).
- **Qwen2.5-VL** (``qwen2_5_vl``): JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]``,
  usually in a ```` ```json ```` fence, in *absolute pixels of the resized input* (the image the
  processor fed: ``image_grid_thw`` x patch size): Qwen2.5-VL technical report, arXiv
  2502.13923, section 2.2.1 "Grounding Data with Absolute Position Coordinates"; prompt, output
  shape and the mapping back (``input_height = image_grid_thw[1] * 14``, reversed corners
  swapped) from the official cookbook ``QwenLM/Qwen2.5-VL/cookbooks/spatial_understanding.ipynb``
  ("Locate the shadow of the paper fox, report the bbox coordinates in JSON format.").
- **Qwen3-VL** (``qwen3_vl``, ``qwen3_vl_moe``): the same JSON, coordinates relative in 0..1000:
  Qwen3-VL technical report, arXiv 2511.21631, section 3.2.4 ("Different from Qwen2.5-VL, we
  adopt a normalized coordinate system scaled to the range [0, 1000]"); the official cookbook
  ``QwenLM/Qwen3-VL/cookbooks/2d_grounding.ipynb`` (boxes divided by 1000); its RefCOCO prompt
  ends "Report bbox coordinates in JSON format."

Decoding is greedy, left-padded and batched, bounded by ``max_new_tokens``. The localizer is a
:class:`~crop.localizers.vlm.VLMLocalizer`, so its prefill and decode FLOPs are counted like
any generative localizer's (:func:`crop.eval.flops.vlm_localization_flops`) and its time is the
pipeline's ``localizer_s``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from PIL import Image
from torch import nn

from crop.data.synth import pixel_box_to_grid
from crop.localizers.base import Localization
from crop.localizers.vlm import VLMLocalizer
from crop.regions import GridBox

logger = logging.getLogger(__name__)

PixelBox = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` as the model wrote it, in its own coordinate unit."""

_MAX_PARSE_CHARS = 20_000
_NUM = r"(-?\d+(?:\.\d+)?)"
# "bbox_2d": [x1, y1, x2, y2] anywhere (inside a fence, a list, a truncated list, Python-style quotes)
_BBOX_2D = re.compile(r"""["']?bbox_2d["']?\s*:\s*\[\s*""" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
# (x1,y1),(x2,y2), between <|box_start|> and <|box_end|> when the special tokens are kept
_CORNER_PAIR = re.compile(r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*,\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM
                          + r"\s*\)")

JSON_PROMPT = 'Locate the region of the image needed to answer the question "{question}", report the bbox ' \
              "coordinates in JSON format."
BOX_TOKEN_PROMPT = 'Find <|object_ref_start|>the region of the image needed to answer the question "{question}"' \
                   "<|object_ref_end|> and output its bounding box."


def parse_bbox_2d(text: str) -> list[PixelBox]:
    """Every ``"bbox_2d": [x1, y1, x2, y2]`` in a Qwen2.5-VL / Qwen3-VL grounding answer, in order.

    Tolerates a markdown fence, surrounding words, one object or a list, and a list cut short by
    the decode budget (each complete box counts).

    Args:
        text: the decoded answer.

    Returns:
        The boxes as written (any unit, corners possibly reversed); empty if there are none.
    """
    return [_four(m) for m in _BBOX_2D.finditer(text[:_MAX_PARSE_CHARS])]


def parse_box_tokens(text: str) -> list[PixelBox]:
    """Every ``(x1,y1),(x2,y2)`` corner pair in a Qwen2-VL grounding answer, in order.

    The pair is what Qwen2-VL writes between ``<|box_start|>`` and ``<|box_end|>``; those tokens
    (and the ``<|object_ref_*|>`` label) are not required, so text decoded without special
    tokens parses the same.

    Args:
        text: the decoded answer.

    Returns:
        The boxes as written (0..1000 units, corners possibly reversed); empty if there are none.
    """
    return [_four(m) for m in _CORNER_PAIR.finditer(text[:_MAX_PARSE_CHARS])]


def _four(match: re.Match[str]) -> PixelBox:
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    return x1, y1, x2, y2


@dataclass(frozen=True)
class GroundingFormat:
    """How one model family is asked for a box and how its answer is read.

    Attributes:
        name: the family, for messages.
        prompt: the request, with a ``{question}`` field.
        parse: answer text -> boxes in the model's unit.
        units: ``"relative_1000"`` (0..1000 of the image side) or ``"input_pixels"`` (pixels of the
            resized image the processor fed the model).
    """

    name: str
    prompt: str
    parse: Callable[[str], list[PixelBox]]
    units: str

    def __post_init__(self) -> None:
        if self.units not in ("relative_1000", "input_pixels"):
            raise ValueError(f"unknown coordinate units {self.units!r}; use 'relative_1000' or 'input_pixels'")
        if "{question}" not in self.prompt:
            raise ValueError("a grounding prompt needs a {question} field")


QWEN2_VL = GroundingFormat("Qwen2-VL", BOX_TOKEN_PROMPT, parse_box_tokens, "relative_1000")
QWEN2_5_VL = GroundingFormat("Qwen2.5-VL", JSON_PROMPT, parse_bbox_2d, "input_pixels")
QWEN3_VL = GroundingFormat("Qwen3-VL", JSON_PROMPT, parse_bbox_2d, "relative_1000")

GROUNDING_FORMATS: dict[str, GroundingFormat] = {
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL,
}
"""The grounding format of each supported ``config.model_type``."""


def grounding_format(model_type: str) -> GroundingFormat:
    """The grounding format of a model type.

    Args:
        model_type: ``model.config.model_type``.

    Raises:
        ValueError: for a model type without a known grounding format, listing the supported ones.
    """
    if model_type not in GROUNDING_FORMATS:
        raise ValueError(f"grounding localizer: model type {model_type!r} has no known grounding format; "
                         f"supported: {', '.join(GROUNDING_FORMATS)}")
    return GROUNDING_FORMATS[model_type]


def boxes_to_grid(boxes: Sequence[PixelBox], scale: tuple[float, float], image_size: tuple[int, int],
                  grid: int) -> GridBox | None:
    """The union, on the region grid, of the cells the model's boxes overlap.

    Each box is scaled to pixels of the original image, its corners ordered (the Qwen2.5-VL
    cookbook swaps reversed ones too), rounded to whole pixels and clamped to the image; one
    left with no area is dropped. The rest go through :func:`crop.data.synth.pixel_box_to_grid`,
    the rule that made the training data's grid boxes.

    Args:
        boxes: ``(x1, y1, x2, y2)`` in the model's unit.
        scale: ``(sx, sy)``, original-image pixels per model unit.
        image_size: the original image's ``(width, height)``.
        grid: cells per side.

    Returns:
        The union of the boxes' grid boxes, or ``None`` if no box has positive area in the image.
    """
    width, height = image_size
    out: GridBox | None = None
    for x1, y1, x2, y2 in boxes:
        xs = sorted(_pixel(v * scale[0], width) for v in (x1, x2))
        ys = sorted(_pixel(v * scale[1], height) for v in (y1, y2))
        if xs[0] == xs[1] or ys[0] == ys[1]:
            continue  # a line, a point, or entirely outside the image
        cells = GridBox.from_list(pixel_box_to_grid([xs[0], ys[0], xs[1], ys[1]], (width, height), grid), grid)
        out = cells if out is None else out.union(cells)
    return out


def _pixel(value: float, size: int) -> int:
    """The nearest whole pixel edge (halves up, not to even), clamped to ``[0, size]``."""
    return min(max(math.floor(value + 0.5), 0), size)


def read_grounding(text: str, fmt: GroundingFormat, image_size: tuple[int, int], grid: int,
                   input_size: tuple[int, int] | None = None) -> Localization:
    """A :class:`Localization` from one grounding answer: its boxes' union, or the full image, flagged.

    Args:
        text: the decoded answer (kept as ``raw``).
        fmt: the model family's format.
        image_size: the original image's ``(width, height)``.
        grid: the region grid side.
        input_size: ``(width, height)`` of the resized image the model saw; needed when
            ``fmt.units == "input_pixels"``.

    Returns:
        The region, or the full image with ``fallback=True`` when no box is usable.
    """
    width, height = image_size
    if fmt.units == "input_pixels":
        if input_size is None:
            raise ValueError(f"{fmt.name} boxes are in pixels of the model's input: pass input_size")
        scale = (width / input_size[0], height / input_size[1])
    else:
        scale = (width / 1000, height / 1000)
    boxes = fmt.parse(text)
    box = boxes_to_grid(boxes, scale, image_size, grid)
    if box is None:
        why = "no box in its format" if not boxes else "every box is empty or outside the image"
        logger.warning("grounding localizer output unusable (%s); using the full image", why)
        return Localization(GridBox.full(grid), fallback=True, raw=text)
    return Localization(box, fallback=False, raw=text)


class GroundingLocalizer(VLMLocalizer):
    """Localize with a stock instruct Qwen2-VL / Qwen2.5-VL / Qwen3-VL, in its own grounding format.

    See the module docstring for the formats and their sources.

    Args:
        model: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL image-text-to-text model (its
            ``config.model_type`` picks the format).
        processor: its processor (image processor + tokenizer with the chat template).
        grid: the region grid side of the boxes returned.
        max_new_tokens: decode budget per answer (a one-box JSON answer is about 40 tokens; a cut
            answer still yields every complete box).
        batch_size: images per ``generate`` call (a grounding answer is long); ``None``: the caller's batch.
        prompt: override the family's request; a template with a ``{question}`` field.

    Raises:
        ValueError: for a model type without a known grounding format.
    """

    name = "grounding"

    def __init__(self, model: nn.Module, processor, grid: int = 8, max_new_tokens: int = 128, batch_size: int | None = 8,
                 prompt: str | None = None) -> None:
        fmt = grounding_format(str(getattr(getattr(model, "config", None), "model_type", None)))
        super().__init__(model, processor, grid=grid, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         image_first=True, stop_at_box_end=False)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.format = fmt
        self.prompt = prompt if prompt is not None else fmt.prompt
        if "{question}" not in self.prompt:
            raise ValueError("the grounding prompt needs a {question} field")

    def messages(self, question: str) -> list[dict]:
        """The one-turn chat for ``question``: the image, then the grounding request.

        Args:
            question: the user's question.

        Returns:
            The chat messages, for the processor's chat template.
        """
        text = self.prompt.replace("{question}", question.strip())
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    @torch.no_grad()
    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Localization]:
        """Greedy-decode a grounding answer for each pair and map its boxes to the grid.

        Args:
            images, questions: the pairs to localize.

        Returns:
            One :class:`Localization` per pair (full image and ``fallback=True`` where no box is usable).
        """
        results: list[Localization] = []
        step = self.batch_size or max(len(images), 1)
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            inputs = self.prepare(chunk, questions[start:start + step])
            texts = self.decode(self.generate(inputs))  # (B, T) new tokens -> B strings
            sizes = self.input_sizes(inputs["image_grid_thw"])
            results.extend(read_grounding(text, self.format, image.size, self.grid, size)
                           for text, image, size in zip(texts, chunk, sizes, strict=True))
        return results

    def input_sizes(self, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """The size of each resized image the model saw.

        Args:
            image_grid_thw: ``(B, 3)`` the processor's ``(t, h, w)`` per image, in patches.

        Returns:
            ``(width, height)`` in pixels per image.
        """
        patch: Any = getattr(getattr(self.processor, "image_processor", None), "patch_size", None)
        if patch is None:  # the processor resizes to multiples of the vision tower's patch
            patch = cast(Any, self.model).config.vision_config.patch_size
        side = int(patch if isinstance(patch, int) else patch[0])
        return [(int(w) * side, int(h) * side) for _, h, w in image_grid_thw.tolist()]

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Each row's text up to its end of sequence, special tokens kept (Qwen2-VL's box tokens are special).

        Args:
            new_tokens: ``(B, T)`` generated token ids.

        Returns:
            ``B`` strings, stripped.
        """
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        stops = {tokenizer.pad_token_id, tokenizer.eos_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops.update(eos if isinstance(eos, list) else [eos])
        stops.discard(None)
        rows = []
        for row in new_tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:end])
        return [str(t).strip() for t in self.processor.batch_decode(rows, skip_special_tokens=False)]


__all__ = ["GROUNDING_FORMATS", "GroundingFormat", "GroundingLocalizer", "boxes_to_grid", "grounding_format",
           "parse_bbox_2d", "parse_box_tokens", "read_grounding"]
