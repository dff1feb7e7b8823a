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

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from crop.config import CropILPConfig, CropPLCConfig, CropSelfConfig
from crop.hf_compat import layer_cache
from crop.methods import InnerLLMMethod, PruneStats, PruningMethod, method_for
from crop.models import get_adapter
from crop.models.base import VLMAdapter
from crop.regions import DEFAULT_GRID, GridBox

__all__ = ["CropHandle", "PruneStats", "PruningHandle", "apply_crop", "apply_method", "check_config"]

# the handle applied to each model instance (a second apply on the same model is refused)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruningHandle] = weakref.WeakKeyDictionary()


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

    method: PruningMethod
    stats: PruneStats | None
    _removed: bool

    def __init__(self, model: nn.Module, config: Any, adapter: VLMAdapter | None = None) -> None:
        active = _ACTIVE.get(model)
        if active is not None and not active._removed:
            raise ValueError(f"this model already has {active.method.name} applied; remove that handle first "
                             "(handle.remove(), or leave its with block): two methods on one model do not compose")
        self.model = model
        self.config = config
        self.adapter = adapter or get_adapter(model)
        self.method = method_for(config)(self.adapter, config)
        self.stats: PruneStats | None = None
        self._prepared: dict[str, Any] | None = None
        self.method.attach()
        self._guard = model.register_forward_pre_hook(self._check_call, with_kwargs=True)
        self._removed = False
        _ACTIVE[model] = self

    @property
    def grid(self) -> int:
        """The config's region grid (the default grid for region-free configs, which carry none)."""
        return int(getattr(self.config, "grid", DEFAULT_GRID))

    def prepared_stats(self) -> PruneStats:
        """The token accounting of the last prepared batch (:attr:`stats`, once :meth:`prepare` ran).

        Raises:
            RuntimeError: before the first :meth:`prepare`.
        """
        if self.stats is None:
            raise RuntimeError("no batch was prepared yet: call handle.prepare(inputs, boxes) first")
        return self.stats

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
        if hasattr(self.config, "grid"):  # region-free configs carry no grid: they never read the box
            for box in regions:
                if box.grid != self.grid:
                    raise ValueError(f"box {box} is on a {box.grid}x{box.grid} grid but the config says {self.grid}")
        run, self.stats = self.method.prepare(inputs, spans, regions)
        self._prepared = {k: run[k] for k in ("input_ids", "pixel_values") if isinstance(run.get(k), torch.Tensor)}
        return run

    # -- guard: the model must run on what was prepared ---------------------------------------

    def _check_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Refuse forwards the prepared state does not fit, with a message that says why (instance pre-hook)."""
        inner = isinstance(self.method, InnerLLMMethod)
        if inner and kwargs.get("labels") is not None:
            raise ValueError(f"{self.method.name} prunes inside the LLM, so the logits cover only the kept positions; "
                             "labels= cannot be aligned to them. Compute the loss without the handle, or use a "
                             "pre-LLM method")
        cache = layer_cache(kwargs)
        if inner and cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{self.method.name} keeps a different number of tokens per layer, which needs a "
                             f"DynamicCache; got {type(cache).__name__} (e.g. cache_implementation='static' is not "
                             "supported)")
        ids = kwargs.get("input_ids", args[0] if args else None)
        prepared = self._prepared
        if prepared is None or not isinstance(ids, torch.Tensor) or "input_ids" not in prepared:
            return
        if cache is not None and cache.get_seq_length() > 0:
            return  # a decode step: its tokens are the model's own
        ref = prepared["input_ids"]
        if ids.shape[0] != ref.shape[0]:
            expanded = ids.shape[0] % ref.shape[0] == 0
            raise ValueError(f"the model got a batch of {ids.shape[0]} but {self.method.name} was prepared for "
                             f"{ref.shape[0]}" + ("; beam search (num_beams > 1) and num_return_sequences > 1 expand "
                                                  "the batch and are not supported: use num_beams=1" if expanded
                                                  else "; call handle.prepare(inputs) for this batch"))
        if ids.shape[1] < ref.shape[1] or not torch.equal(ids[:, :ref.shape[1]].to(ref.device), ref):
            raise ValueError("the model got other input_ids than the prepared ones (another prompt?); call "
                             "handle.prepare(inputs) for each prompt and run the model on what it returns")
        pixels = kwargs.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and "pixel_values" in prepared and not (
                pixels.shape == prepared["pixel_values"].shape and torch.equal(pixels, prepared["pixel_values"])):
            raise ValueError("the model got other pixel_values than the prepared ones (another image?); call "
                             "handle.prepare(inputs) for each prompt and run the model on what it returns")

    def remove(self) -> None:
        """Detach every hook; safe to call twice."""
        self.method.detach()
        self._guard.remove()
        self._prepared = None
        self._removed = True
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


CropHandle = PruningHandle  # the name used for CROP configs


def check_config(model: nn.Module, config: Any, adapter: VLMAdapter | None = None) -> None:
    """Raise if ``config`` cannot run on ``model`` (e.g. a pruning layer outside its depth); changes nothing.

    Builds the method as :class:`PruningHandle` does but attaches no hook, so a pipeline can
    refuse a config once, up front, without applying it.

    Raises:
        ValueError: for an unsupported model, an object that is no method config, or a config
            the model cannot take.
    """
    method_for(config)(adapter or get_adapter(model), config)


def apply_method(model: nn.Module, config: Any) -> PruningHandle:
    """Apply any pruning method to ``model`` (in place, reversibly) and return the handle.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: the method's config; its class selects the method.
    """
    return PruningHandle(model, config)


def apply_crop(model: nn.Module, config: CropILPConfig | CropPLCConfig | CropSelfConfig | None = None) -> PruningHandle:
    """Apply CROP to ``model`` (in place, reversibly) and return the handle.

    Args:
        model: a supported ``*ForConditionalGeneration`` model.
        config: defaults to ``CropILPConfig()`` (ILP at layer 2, the region's tokens only).

    Returns:
        A :class:`PruningHandle`; use its ``prepare`` before each forward/generate call.
    """
    if config is not None and not isinstance(config, (CropILPConfig, CropPLCConfig, CropSelfConfig)):
        raise ValueError(f"apply_crop takes a CropILPConfig, CropPLCConfig or CropSelfConfig, got {type(config).__name__}; "
                         "use apply_method for other methods")
    return PruningHandle(model, config or CropILPConfig())
