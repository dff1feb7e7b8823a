"""The one reversible entry point: ``apply_crop(model, config)`` / ``apply_method(model, config)``.

Typical use::

    with apply_crop(model, CropILPConfig(keep_tokens=64)) as crop:
        batch = crop.prepare(processor(images=img, text=prompt, return_tensors="pt"), [GridBox(2, 2, 5, 5)])
        out = model.generate(**batch, max_new_tokens=16)
        print(crop.stats.visual_tokens_kept)

``prepare`` maps each image's region onto its visual tokens and returns the inputs to run
(unchanged for inner-LLM methods, which prune through hooks; rebuilt with fewer visual
tokens for pre-LLM methods). Leaving the ``with`` block (or ``remove()``) detaches every
hook: the model is then bit-identical to one never touched. Any method config works the
same way (``apply_method(model, SomeBaselineConfig(...))``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from crop.config import CropILPConfig, CropPLCConfig
from crop.methods import PruneStats, method_for
from crop.models.base import VLMAdapter, get_adapter
from crop.regions import DEFAULT_GRID, GridBox

__all__ = ["CropHandle", "PruneStats", "PruningHandle", "apply_crop", "apply_method"]


class PruningHandle:
    """A pruning method applied to one model instance; remove it with :meth:`remove` or by leaving ``with``.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: a method config (:class:`crop.config.CropILPConfig`, a baseline's config, ...).
        adapter: the model's adapter (found from ``model.config.model_type`` if omitted).

    Raises:
        ValueError: for an unsupported model, an unknown method, or a config the model cannot
            take (e.g. a pruning layer outside its depth).
    """

    def __init__(self, model: nn.Module, config: Any, adapter: VLMAdapter | None = None) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter or get_adapter(model)
        self.method = method_for(config)(self.adapter, config)
        self.stats: PruneStats | None = None
        self.method.attach()
        self._removed = False

    @property
    def grid(self) -> int:
        return int(getattr(self.config, "grid", DEFAULT_GRID))

    def prepare(self, inputs: Mapping[str, Any], boxes: Sequence[GridBox | None] | None = None) -> dict[str, Any]:
        """Map regions to visual tokens and return the inputs to run the model on.

        Args:
            inputs: processor output for a batch (``input_ids``, ``attention_mask``, pixels ...).
            boxes: one region per image, in the order the images appear; ``None`` (or no list)
                means the full image. Region-free methods ignore them.

        Returns:
            Keyword arguments for ``model(**...)`` or ``model.generate(**...)``.

        Raises:
            ValueError: if the number of boxes does not match the images, or a box is on another grid.
            RuntimeError: if the handle was removed.
        """
        if self._removed:
            raise RuntimeError("this handle was removed; apply the method again")
        spans = self.adapter.image_spans(inputs)
        boxes = [None] * len(spans) if boxes is None else list(boxes)
        if len(boxes) != len(spans):
            raise ValueError(f"got {len(boxes)} boxes for {len(spans)} images in the batch")
        regions = [GridBox.full(self.grid) if b is None else b for b in boxes]
        for box in regions:
            if box.grid != self.grid:
                raise ValueError(f"box {box} is on a {box.grid}x{box.grid} grid but the config says {self.grid}")
        run, self.stats = self.method.prepare(inputs, spans, regions)
        return run

    def remove(self) -> None:
        """Detach every hook; safe to call twice."""
        self.method.detach()
        self._removed = True

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


CropHandle = PruningHandle  # the name used for CROP configs


def apply_method(model: nn.Module, config: Any) -> PruningHandle:
    """Apply any pruning method to ``model`` (in place, reversibly) and return the handle.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: the method's config; its class selects the method.
    """
    return PruningHandle(model, config)


def apply_crop(model: nn.Module, config: CropILPConfig | CropPLCConfig | None = None) -> PruningHandle:
    """Apply CROP to ``model`` (in place, reversibly) and return the handle.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: defaults to ``CropILPConfig()`` (ILP at layer 2, the region's tokens only).

    Returns:
        A :class:`PruningHandle`; use its ``prepare`` before each forward/generate call.
    """
    if config is not None and not isinstance(config, (CropILPConfig, CropPLCConfig)):
        raise ValueError(f"apply_crop takes a CropILPConfig or CropPLCConfig, got {type(config).__name__}; "
                         "use apply_method for other methods")
    return PruningHandle(model, config or CropILPConfig())
