"""Localizers: where in the image is the question about? (full image, fixed box, generative VLM)."""

from __future__ import annotations

from crop.errors import CropInputError
from crop.localizers.base import FixedBoxLocalizer, FullImageLocalizer, Localization, Localizer, SelfLocalizer
from crop.localizers.vlm import VLMLocalizer
from crop.regions import parse_box_argument

__all__ = ["FixedBoxLocalizer", "FullImageLocalizer", "Localization", "Localizer", "SelfLocalizer", "VLMLocalizer",
           "make_localizer"]


def make_localizer(spec: str, grid: int = 8, device: str = "cpu") -> Localizer:
    """A localizer from a short spec, as the CLI takes it.

    Args:
        spec: ``"full"``; ``"box:x0,y0,x1,y1"`` (grid coordinates); ``"self"`` (no second model:
            the answerer's own early attention, CROP-self); ``"embedded"`` (the shipped toy
            localizer); or a local path / hub id of a generative localizer VLM.
        grid: the region grid side.
        device: where a generative localizer VLM runs (``"cpu"``, ``"auto"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``; its dtype is ``"auto"`` there: bfloat16 on CUDA, else
            float32); unused by ``full`` and ``box:``.

    Raises:
        CropInputError: for a malformed box, a localizer model that cannot be loaded, or a
            device this machine does not have.
    """
    if spec == "full":
        return FullImageLocalizer(grid)
    if spec == "self":
        return SelfLocalizer(grid)
    if spec.startswith("box:"):
        try:
            return FixedBoxLocalizer(parse_box_argument(spec[4:], grid))
        except ValueError as exc:
            raise CropInputError(f"bad --localizer box: {exc}") from None
    from crop.models.loading import load_model

    model, processor = load_model(spec, role="localizer", device=device)
    image_first = True
    if spec == "embedded":  # the shipped toy localizer records the prompt layout it was trained with
        from crop.embedded import load_embedded_metadata

        image_first = load_embedded_metadata("localizer").get("image_first", True)
    return VLMLocalizer(model, processor, grid=grid, image_first=image_first)
