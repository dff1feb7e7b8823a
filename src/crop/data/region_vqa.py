"""Region-annotated VQA as JSONL: the training data of a localizer, and converters into it.

One JSON object per line. Required: ``image`` (a path, relative to the JSONL file or absolute)
and ``question``. The region is given in exactly one of these annotation styles:

- ``"box_grid": [x0, y0, x1, y1]``: grid cells, 0-indexed, inclusive (on ``grid`` x ``grid``);
- ``"box_px": [x0, y0, x1, y1]``: pixels, right/bottom edges exclusive (PIL convention);
- ``"ocr": [{"text": "...", "box_px": [...]}, ...]`` with ``"answer"``: answer-bearing OCR
  tokens, as in TextVQA / DocVQA (the region is the union of the tokens whose normalized
  text is a word of the normalized answer);
- ``"phrase_boxes_px": [[...], ...]``: phrase-grounding boxes, as in Flickr30k Entities (the
  region is their union).

Optional: ``answer``, ``id``. **Rounding rule** (pixels -> grid, every style): a cell belongs
to the region when the pixel box overlaps it with positive area; the grid box is the
smallest one covering those cells (:meth:`crop.regions.GridBox.from_pixels`). So a box never
shrinks when it is snapped to the grid, and one pixel of overlap is enough to include a cell.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from crop.regions import DEFAULT_GRID, GridBox

STYLES = ("box_grid", "box_px", "ocr", "phrase_boxes_px")


@dataclass
class RegionSample:
    """One localizer training/evaluation example."""

    image: str
    question: str
    box: GridBox
    answer: str | None = None
    id: str | None = None


def _normalize(text: str) -> list[str]:
    return [w for w in re.sub(r"[^\w\s]", " ", text.lower()).split() if w not in {"a", "an", "the"}]


def union_pixel_boxes(boxes: list[list[float]]) -> list[float]:
    """The smallest pixel box holding all of ``boxes``."""
    if not boxes:
        raise ValueError("no boxes to unite")
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def ocr_answer_box(ocr: list[dict[str, Any]], answer: str) -> list[float]:
    """Pixel box of the answer-bearing OCR tokens (TextVQA / DocVQA style).

    Args:
        ocr: ``[{"text": str, "box_px": [x0, y0, x1, y1]}, ...]``.
        answer: the reference answer.

    Returns:
        The union of the boxes of tokens whose normalized words all occur in the answer.

    Raises:
        ValueError: if no OCR token matches the answer.
    """
    words = set(_normalize(answer))
    hits = [tok["box_px"] for tok in ocr if _normalize(str(tok.get("text", ""))) and
            set(_normalize(str(tok["text"]))) <= words]
    if not hits:
        raise ValueError(f"no OCR token matches the answer {answer!r}")
    return union_pixel_boxes(hits)


def to_grid_box(record: dict[str, Any], width: int, height: int, grid: int = DEFAULT_GRID) -> GridBox:
    """The grid box of one record, whatever its annotation style (see the module docstring).

    Raises:
        ValueError: if the record has no region, several, or an invalid one.
    """
    styles = [s for s in STYLES if s in record]
    if len(styles) != 1:
        raise ValueError(f"need exactly one of {', '.join(STYLES)}; found {styles or 'none'}")
    style = styles[0]
    if style == "box_grid":
        values = record["box_grid"]
        if len(values) != 4 or not all(isinstance(v, int) for v in values):
            raise ValueError(f"box_grid must be four integers, got {values!r}")
        x0, y0, x1, y1 = values
        return GridBox(x0, y0, x1, y1, grid=grid)
    if style == "box_px":
        pixels = record["box_px"]
    elif style == "ocr":
        if not record.get("answer"):
            raise ValueError("an 'ocr' annotation needs the 'answer'")
        pixels = ocr_answer_box(record["ocr"], record["answer"])
    else:
        pixels = union_pixel_boxes(record["phrase_boxes_px"])
    if len(pixels) != 4:
        raise ValueError(f"a pixel box has four numbers, got {pixels!r}")
    x0, y0, x1, y1 = (max(0.0, float(v)) for v in pixels)
    return GridBox.from_pixels((x0, y0, min(x1, width), min(y1, height)), width, height, grid)


def read_region_jsonl(path: str | Path, grid: int = DEFAULT_GRID) -> list[RegionSample]:
    """Read and validate a region-annotated JSONL file.

    Raises:
        ValueError: naming the file and line of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    samples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image = Path(record["image"])
                image = image if image.is_absolute() else path.parent / image
                question = str(record["question"]).strip()
                if not question:
                    raise ValueError("empty question")
                with Image.open(image) as img:
                    width, height = img.size
                box = to_grid_box(record, width, height, grid)
            except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}:{lineno}: {type(exc).__name__}: {exc}") from None
            samples.append(RegionSample(str(image), question, box, record.get("answer"), record.get("id")))
    if not samples:
        raise ValueError(f"{path} holds no records")
    return samples
