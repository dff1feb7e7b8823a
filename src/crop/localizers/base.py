"""The localizer interface: image + question -> the region on the grid the answer needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from crop.regions import GridBox


@dataclass
class Localization:
    """One localizer answer.

    Attributes:
        box: the region (the full image on fallback).
        fallback: True when the localizer's output was unusable and the full image was used.
        raw: the localizer's raw text output, if it produced text.
    """

    box: GridBox
    fallback: bool = False
    raw: str | None = None


@runtime_checkable
class Localizer(Protocol):
    """Anything that finds, for each (image, question), the region the question is about."""

    grid: int

    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Localization]:
        """One :class:`Localization` per (image, question) pair."""
        ...


class FullImageLocalizer:
    """Always the whole image (with CROP this means "no region information").

    Args:
        grid: the grid side.
    """

    name = "full"

    def __init__(self, grid: int = 8) -> None:
        self.grid = grid

    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Localization]:
        return [Localization(GridBox.full(self.grid)) for _ in images]


class FixedBoxLocalizer:
    """The same given box for every question (an oracle when the box is the ground truth).

    Args:
        box: the region; its grid is the localizer's grid.
    """

    name = "box"

    def __init__(self, box: GridBox) -> None:
        self.box = box
        self.grid = box.grid

    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Localization]:
        return [Localization(self.box) for _ in images]


class SelfLocalizer:
    """No localizer model: the answerer finds the region itself, from its own attention (CROP-self).

    ``localize`` only hands the whole image on; a pipeline given this localizer runs CROP's ILP
    as :class:`crop.config.CropSelfConfig` (:func:`crop.methods.self_region.for_self_localizer`),
    whose box is decided inside the answerer's prefill at layer K. PLC cannot use it: its box is
    needed before the LLM runs.

    Args:
        grid: the grid side.
        choices: :class:`crop.config.CropSelfConfig` fields (``queries``, ``rule``, ``price`` ...)
            passed on to the config.
    """

    name = "self"
    in_model = True  # the region is found inside the answerer's forward, not here

    def __init__(self, grid: int = 8, **choices) -> None:
        self.grid = grid
        self.choices = choices

    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Localization]:
        return [Localization(GridBox.full(self.grid)) for _ in images]
