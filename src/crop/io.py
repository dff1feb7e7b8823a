"""Loading user inputs (images, questions) with clear errors instead of tracebacks."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crop.errors import CropInputError

MAX_QUESTION_CHARS = 4000


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB PIL image from a path (or an image passed through).

    Raises:
        CropInputError: if the file is missing, unreadable, not an image, or corrupt.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.exists():
        raise CropInputError(f"image file not found: {path}")
    if not path.is_file():
        raise CropInputError(f"not a file: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated or corrupt file fails here
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise CropInputError(f"not an image file (unrecognised format): {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CropInputError(f"corrupt or unreadable image {path}: {exc}") from None


def check_question(question: object) -> str:
    """The question, stripped.

    Raises:
        CropInputError: if it is not a non-empty string of reasonable length.
    """
    if not isinstance(question, str):
        raise CropInputError(f"the question must be text, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise CropInputError("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise CropInputError(f"the question is too long ({len(text)} characters, at most {MAX_QUESTION_CHARS})")
    return text
