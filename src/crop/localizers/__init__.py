"""Localizers: where in the image is the question about? (full image, fixed box, generative VLM, zero-shot grounding)."""

from __future__ import annotations

from crop.errors import CropInputError
from crop.localizers.base import FixedBoxLocalizer, FullImageLocalizer, Localization, Localizer, SelfLocalizer
from crop.localizers.grounding import GROUNDING_FORMATS, GroundingLocalizer
from crop.localizers.vlm import VLMLocalizer
from crop.regions import parse_box_argument

__all__ = ["FixedBoxLocalizer", "FullImageLocalizer", "GroundingLocalizer", "Localization", "Localizer", "SelfLocalizer",
           "VLMLocalizer", "make_localizer"]

GROUNDING_PREFIX = "grounding:"


def make_localizer(spec: str, grid: int = 8, device: str = "cpu") -> Localizer:
    """A localizer from a short spec, as the CLI takes it.

    Args:
        spec: ``"full"``; ``"box:x0,y0,x1,y1"`` (grid coordinates); ``"self"`` (no second model:
            the answerer's own early attention, CROP-self); ``"embedded"`` (the shipped toy
            localizer); ``"grounding:<hub id or path>"`` (a stock instruct Qwen2-VL, Qwen2.5-VL or
            Qwen3-VL asked zero-shot for the box in its own grounding format,
            :class:`~crop.localizers.grounding.GroundingLocalizer`); or a local path / hub id of a
            generative localizer VLM trained to answer with the grid box.
        grid: the region grid side.
        device: where a generative localizer VLM runs (``"cpu"``, ``"auto"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``; its dtype is ``"auto"`` there: bfloat16 on CUDA, else
            float32); unused by ``full`` and ``box:``.

    Returns:
        The localizer.

    Raises:
        CropInputError: for a malformed box, a localizer model that cannot be loaded, a
            ``grounding:`` model without a known grounding format, or a device this machine
            does not have.
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

    if spec.startswith(GROUNDING_PREFIX):
        return _grounding_localizer(spec[len(GROUNDING_PREFIX):].strip(), grid, device)
    model, processor = load_model(spec, role="localizer", device=device)
    image_first = True
    if spec == "embedded":  # the shipped toy localizer records the prompt layout it was trained with
        from crop.embedded import load_embedded_metadata

        image_first = load_embedded_metadata("localizer").get("image_first", True)
    return VLMLocalizer(model, processor, grid=grid, image_first=image_first)


def _grounding_localizer(source: str, grid: int, device: str) -> GroundingLocalizer:
    """``grounding:<source>``: load the model (after checking its type when the config is at hand) and wrap it."""
    from crop.models.loading import load_model

    if not source:
        raise CropInputError("--localizer grounding: needs a model, e.g. grounding:Qwen/Qwen2.5-VL-3B-Instruct")
    model_type = _peek_model_type(source)
    if model_type is not None and model_type not in GROUNDING_FORMATS:  # refuse before reading any weights
        raise CropInputError(f"--localizer grounding:{source}: model type {model_type!r} has no known grounding "
                             f"format; supported: {', '.join(GROUNDING_FORMATS)}")
    model, processor = load_model(source, role="localizer", device=device)
    try:
        return GroundingLocalizer(model, processor, grid=grid)
    except ValueError as exc:
        raise CropInputError(f"--localizer grounding:{source}: {exc}") from None


def _peek_model_type(source: str) -> str | None:
    """``model_type`` from the model's ``config.json`` alone, when it can be read without the weights.

    A local folder's file is read; for a hub id the config (a few kB, which loading fetches
    anyway) is asked for through transformers. ``None`` when neither works: loading then decides.
    """
    import json
    from pathlib import Path

    folder = Path(source)
    if folder.exists():
        try:
            value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    if source.count("/") != 1 or source.startswith((".", "/")):
        return None  # a tiny-random-* name or a typo: load_model explains
    try:
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(source).model_type)
    except (OSError, ValueError, KeyError, ImportError):
        return None
