"""The localization prompt shared by the generative localizer and the recipes that train one.

A localizer is trained to answer this prompt with the grid box as text, ``[x0, y0, x1, y1]``;
serving and training must use the very same words, so they live here once.
"""

from __future__ import annotations

LOCALIZER_PROMPT = (
    "Which region of the image is needed to answer the question? "
    "Answer with the box on a {grid}x{grid} grid as [x0, y0, x1, y1].\nQuestion: {question}"
)


def localizer_prompt(question: str, grid: int = 8) -> str:
    """The text of the localization request for ``question`` on a ``grid`` x ``grid`` grid."""
    return LOCALIZER_PROMPT.format(grid=grid, question=question.strip())


def localizer_messages(question: str, grid: int = 8, image_first: bool = True) -> list[dict]:
    """The one-turn chat a localizer is prompted with: the image and :func:`localizer_prompt`.

    Args:
        question: the user's question.
        grid: the region grid side.
        image_first: put the image before the text (the usual VLM layout, and the default for
            real checkpoints). The embedded toy localizer is trained text-first: its causal LLM
            then lets every image token see the question, so each can tell whether it is part of
            the asked-about region (see :mod:`crop.train.localizer`).
    """
    parts = [{"type": "image"}, {"type": "text", "text": localizer_prompt(question, grid)}]
    return [{"role": "user", "content": parts if image_first else parts[::-1]}]


def format_box(box: tuple[int, int, int, int] | list[int]) -> str:
    """The target text a localizer is trained to emit for ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return f"[{x0}, {y0}, {x1}, {y1}]"
