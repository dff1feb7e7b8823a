"""Your own visual questions as JSONL for ``crop eval --data``, and the VQA answer metrics.

One JSON object per line (blank lines are skipped):

- ``image``: path of the image, relative to the JSONL file's folder or absolute;
- ``question``: the question;
- ``answers``: the reference answer(s), a string or a list of strings (``answer``, as
  ``crop synth`` writes it, is accepted when ``answers`` is missing);
- optional ``box_grid`` ``[x0, y0, x1, y1]``: the region on the 8x8 grid, cells 0-indexed
  and inclusive; or ``box_px`` ``[x0, y0, x1, y1]``: the region in pixels (right / bottom
  edges exclusive), snapped to the grid as :func:`crop.data.region_vqa.to_grid_box` does (a
  cell belongs to it if the box overlaps it at all). With both, ``box_grid`` is used;
- optional ``family`` (a question type, for per-family accuracy; default ``"vqa"``) and
  ``id`` (default: ``line<N>``).

:func:`read_vqa_jsonl` returns :class:`VQASample` objects with the fields the evaluation
runner reads from a synthetic sample (``id, image, question, answer, family, box_px,
box_grid``) plus ``answers``, so the same runner scores both. Metrics: :func:`exact_match`
(normalized exact match against any reference) and :func:`vqa_score` (the VQA soft score).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from crop.data.region_vqa import to_grid_box
from crop.regions import DEFAULT_GRID

DEFAULT_FAMILY = "vqa"


@dataclass
class VQASample:
    """One question of a JSONL dataset (the image is read from disk when used, not kept in memory).

    Attributes:
        id: the record's ``id`` (or ``line<N>``).
        path: absolute path of the image.
        question: the question.
        answers: the reference answers (one or more; VQA v2 / TextVQA have ten).
        family: the question type, for per-family accuracy.
        box_px: the region in pixels, if given.
        box_grid: the region on the grid, if given (or snapped from ``box_px``).
    """

    id: str
    path: str
    question: str
    answers: list[str]
    family: str = DEFAULT_FAMILY
    box_px: list[float] | None = None
    box_grid: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def answer(self) -> str:
        """The first reference answer (what the results show as ``answer``)."""
        return self.answers[0]

    @property
    def image(self) -> Image.Image:
        """The image, decoded now (RGB, EXIF orientation applied: :func:`crop.io.load_image`)."""
        from crop.io import load_image

        return load_image(self.path)


def _answers(record: dict[str, Any]) -> list[str]:
    raw = record["answers"] if "answers" in record else record.get("answer")
    if raw is None:
        raise ValueError("no 'answers' (a string or a list of strings)")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"'answers' must be a non-empty string or list of strings, got {raw!r}")
    out = []
    for item in raw:
        if isinstance(item, dict) and "answer" in item:  # VQA v2 style {"answer": ..., "answer_id": ...}
            item = item["answer"]
        if not isinstance(item, (str, int, float)) or isinstance(item, bool) or not str(item).strip():
            raise ValueError(f"every answer must be a non-empty string, got {item!r}")
        out.append(str(item).strip())
    return out


def read_vqa_jsonl(path: str | Path, grid: int = DEFAULT_GRID) -> list[VQASample]:
    """Read and check a VQA JSONL file (see the module docstring for the fields).

    Each image is opened (its header only) to check that it exists and to snap ``box_px`` to
    the grid.

    Args:
        path: the JSONL file.
        grid: the region grid side (the evaluation uses 8).

    Returns:
        The samples, in file order.

    Raises:
        ValueError: naming the file and line of the first bad record (a missing field, an
            unreadable image, a box off the grid, a duplicate id), or for an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    samples: list[VQASample] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                samples.append(_record(json.loads(line), path.parent.resolve(), lineno, grid))
                if samples[-1].id in seen:
                    raise ValueError(f"duplicate id {samples[-1].id!r}")
                seen.add(samples[-1].id)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            except (KeyError, TypeError, ValueError, OSError) as exc:
                what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise ValueError(f"{path}:{lineno}: {what}") from None
    if not samples:
        raise ValueError(f"{path} holds no records")
    return samples


def _record(record: Any, folder: Path, lineno: int, grid: int) -> VQASample:
    if not isinstance(record, dict):
        raise ValueError(f"each line must be a JSON object, got {type(record).__name__}")
    image = Path(str(record["image"]))
    image = image if image.is_absolute() else folder / image
    question = str(record["question"]).strip()
    if not question:
        raise ValueError("empty question")
    family = str(record.get("family", DEFAULT_FAMILY))
    if family == "all":  # the localization metrics' key for the whole set
        raise ValueError("family 'all' is reserved (it names the whole set); rename it")
    with Image.open(image) as img:  # header only: the image exists and is an image
        width, height = img.size
    box_px = record.get("box_px")
    box_grid = None
    if "box_grid" in record or box_px is not None:
        style = {"box_grid": record["box_grid"]} if "box_grid" in record else {"box_px": box_px}
        box_grid = to_grid_box(style, width, height, grid).as_list()
    return VQASample(id=str(record.get("id", f"line{lineno}")), path=str(image), question=question,
                     answers=_answers(record), family=family, box_px=box_px, box_grid=box_grid)


# --------------------------------------------------------------------------------------------
# VQA answer normalisation and metrics


# The rules of the official VQA evaluation script (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py: processPunctuation, processDigitArticle), compactly.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # the script's "(?!<=\d)(\.)(?!\d)" means this
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# the official table maps ~110 apostrophe-less contractions to their spelling; these are the common ones
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "id": "i'd", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "lets": "let's", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_vqa_answer(text: str) -> str:
    """An answer normalised as the official VQA evaluation script does before comparing.

    The rules of ``vqaEval.py`` (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation``):
    newlines and tabs become spaces; *processPunctuation*: each of ``; / [ ] " { } ( ) = + \\
    _ - > < @ ` , ? !`` is deleted if it touches a space (or the text has a comma between
    digits, "1,000"), else replaced by a space; a period not followed by a digit is deleted
    (so "3.5" keeps its decimal point); *processDigitArticle*: lower case, number words
    ``none, zero .. ten`` become digits, the articles ``a, an, the`` are dropped, and
    apostrophe-less contractions get their apostrophe back ("dont" -> "don't"; a compact
    subset of the script's table). Words are joined by single spaces. Unlike the script, the
    references are normalised too (it relies on VQA's already normalised annotations).

    Args:
        text: a predicted or reference answer.

    Returns:
        The normalised answer ("The Two Dogs." -> "2 dogs").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    comma_number = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def exact_match(prediction: str, answers: list[str] | str) -> bool:
    """Whether the normalised prediction equals any normalised reference (:func:`normalize_vqa_answer`)."""
    answers = [answers] if isinstance(answers, str) else answers
    pred = normalize_vqa_answer(prediction)
    return any(pred == normalize_vqa_answer(a) for a in answers)


def vqa_score(prediction: str, answers: list[str] | str) -> float:
    """The VQA soft accuracy of one prediction: ``min(#annotators who gave it / 3, 1)``.

    As in the official script (``vqaEval.py``, see :func:`normalize_vqa_answer`), the score is
    averaged over the leave-one-annotator-out subsets of the references: with VQA's ten
    answers, three matching annotators give 0.9 and four or more give 1.0. With a single
    reference (e.g. GQA) there is no subset to average over and the score is the exact match.

    Args:
        prediction: the model's answer.
        answers: the annotators' answers (duplicates count: they are separate annotators).

    Returns:
        A score in ``[0, 1]``.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)
