"""A localizer inside the vLLM server: a request names one instead of a box, and the server finds the box.

A request's ``crop`` options may carry ``"localizer": SPEC`` (what ``--localizer`` takes:
``embedded``, ``grounding:<hub id or path>``, a trained localizer's path, ``box:x0,y0,x1,y1``,
``full``) instead of a ``box``. Before vLLM processes the request's image, the processor
(:class:`LocalizingProcessor`) reads the question from the request's prompt
(:func:`crop.vllm_plugin.plan.question_from_prompt`), runs the localizer on the image and the
question, and puts the box it answers into the request's options in place of the localizer. The
box then enters vLLM's cache key of the processed image, so the same image asked a different
question is localized again, never served a stale box.

Each localizer is loaded once per server process (:func:`served_localizer`), on the device named
by the ``CROP_VLLM_LOCALIZER_DEVICE`` environment variable (default ``cpu``; e.g. ``cuda:1`` to keep
it off the engine's GPU). Its time is logged per request and summed in :data:`LOCALIZER_STATS`.
A localizer takes one image per request (one question, one box). Where the server's default names a
localizer and a request brings its own box (or the reverse), the request's choice wins.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from crop.errors import CropInputError
from crop.localizers import make_localizer
from crop.regions import DEFAULT_GRID
from crop.timing import clock
from crop.vllm_plugin.plan import question_from_prompt

logger = logging.getLogger(__name__)

LOCALIZER_DEVICE_ENV = "CROP_VLLM_LOCALIZER_DEVICE"
LOCALIZER_STATS: dict[str, float] = {"requests": 0, "fallbacks": 0, "seconds": 0.0}
"""Requests localized in this process, how many fell back to the full image, and the seconds it took."""

if TYPE_CHECKING:
    _VllmClass = Any
else:
    _VllmClass = object


@lru_cache(maxsize=4)
def served_localizer(spec: str, grid: int) -> Any:
    """The localizer for ``spec``, loaded once per process on ``$CROP_VLLM_LOCALIZER_DEVICE`` (default cpu).

    Raises:
        CropInputError: in one line, if it cannot be loaded (the request fails alone).
    """
    if spec == "self":
        raise CropInputError("the self localizer reads the LLM's attention, which vLLM does not expose; "
                             "use embedded, grounding:<model>, a trained localizer's path or a box")
    device = os.environ.get(LOCALIZER_DEVICE_ENV, "cpu")
    try:
        localizer = make_localizer(spec, grid=grid, device=device)
    except CropInputError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CropInputError(f"cannot load the localizer {spec!r}: {first}") from None
    logger.info("crop: localizer %s loaded on %s", spec, device)
    return localizer


def localize_options(options: Mapping[str, Any], prompt: str, images: list[Any], tokens: list[str]) -> dict[str, Any]:
    """``options`` with the localizer's box for the one image and question, and ``"localizer": None``.

    Args:
        options: the request's merged ``crop`` options, with a ``localizer`` entry.
        prompt: the request's prompt text, special tokens included.
        images: the request's images (PIL).
        tokens: the tokenizer's special / added tokens (dropped from the question).

    Raises:
        CropInputError: for a localizer given with a box, a non-string spec, not exactly one
            image, or a localizer that cannot be loaded.
    """
    spec = options["localizer"]
    if not isinstance(spec, str) or not spec:
        raise CropInputError(f"localizer must be a localizer spec (e.g. \"embedded\"), got {spec!r}")
    if options.get("box") is not None:
        raise CropInputError("give crop a box or a localizer, not both")
    if len(images) != 1:
        raise CropInputError(f"a localizer takes one image per request (one question, one box), got {len(images)}; "
                             "send one box per image instead")
    grid = options.get("grid", DEFAULT_GRID)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise CropInputError(f"grid must be a positive integer, got {grid!r}")
    question = question_from_prompt(prompt, tokens)
    localizer = served_localizer(spec, grid)
    start = clock()
    (found,) = localizer.localize(images, [question])
    seconds = clock() - start
    LOCALIZER_STATS["requests"] += 1
    LOCALIZER_STATS["fallbacks"] += int(found.fallback)
    LOCALIZER_STATS["seconds"] += seconds
    logger.info("crop: %s localized %r in %.1f ms: box %s%s", spec, question, 1000 * seconds, found.box.as_list(),
                " (unusable answer: the full image)" if found.fallback else "")
    return {**options, "box": found.box.as_list(), "localizer": None}


class LocalizingProcessor(_VllmClass):
    """Mixin for a vLLM multimodal processor: resolves a request's ``localizer`` into a box before processing."""

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:
        options = self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs).get("crop")
        if isinstance(options, Mapping) and options.get("localizer") is not None and options.get("box") is not None:
            # one of the two is the server's default (--mm-processor-kwargs): the request's own choice wins
            own = inputs.hf_processor_mm_kwargs.get("crop")
            own = own if isinstance(own, Mapping) else {}
            dropped = "localizer" if own.get("box") is not None and own.get("localizer") is None else \
                "box" if own.get("localizer") is not None and own.get("box") is None else None
            if dropped is not None:
                options = {**options, dropped: None}
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs,
                                                                             "crop": {**own, dropped: None}})
        if isinstance(options, Mapping) and options.get("localizer") is not None:
            tokenizer = self.info.get_tokenizer()
            prompt = tokenizer.decode(list(inputs.prompt))
            items = inputs.mm_data_items.get("image")
            images = [items.get(i) for i in range(items.get_count())] if items is not None else []
            resolved = localize_options(options, prompt, images, list(tokenizer.get_added_vocab()))
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs,
                                                                         "crop": resolved})
        return super().apply(inputs, timing_ctx)
