"""What one vLLM request asks crop to do with its images, and what that leaves of each image's token grid.

This module does not import vLLM: the plugin's processor (which fixes each image's placeholder
count before the vision tower runs) and its model (which prunes the embeddings and places the
kept tokens) both call :func:`compress_grid`, and the tests check it against crop's Hugging Face
methods on the CPU.

A request carries ``mm_processor_kwargs={"crop": {"method": ..., "keep_tokens": N, "box": [x0,
y0, x1, y1]}}`` (box in cells of the ``grid`` x ``grid`` region grid, inclusive, as
``--localizer box:...``), or ``"localizer": SPEC`` instead of the box (:mod:`crop.vllm_plugin.localizing`). Only methods that act before the LLM can run in vLLM (all layers of a
request share one KV-cache length there): :data:`ENGINE_METHODS`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crop.errors import CropInputError
from crop.methods._compose import compose
from crop.methods.plc import pool_image, region_share
from crop.methods.random_prune import random_keep
from crop.models.base import CompressedImage, ImageSpan
from crop.ops.grid_pool import pool_grid_to
from crop.ops.selection import TRIMS, select_tokens
from crop.regions import DEFAULT_GRID, GridBox

ENGINE_METHODS = ("none", "crop-region", "crop-plc", "pool", "crop-plc-trained", "random")
"""Methods the plugin runs: the stock model, CROP's region tokens (ILP's selection before the LLM), CROP's
training-free PLC (region + pooled context), uniform pooling, CROP's trained PLC (LLaVA-1.5 only:
:mod:`crop.vllm_plugin.compressing`), and the random baseline (each image's draw seeded as crop's Hugging Face
path seeds it: :func:`random_seeds`)."""

INNER_LLM = ("crop-ilp", "crop-self", "fastv", "pdrop", "sparsevlm", "dart", "random-inner")
_CODES = {name: i for i, name in enumerate(ENGINE_METHODS)}
_KEYS = {"method", "keep_tokens", "box", "grid", "pool", "trim", "localizer", "seed", "seeds"}


@dataclass(frozen=True)
class CropRequest:
    """One request's crop options, checked.

    Attributes:
        method: one of :data:`ENGINE_METHODS`.
        keep_tokens: visual tokens per image that reach the LLM (``None``: the region's own
            count for ``crop-region`` / region + pooled for ``crop-plc``).
        box: the region (``None``: the whole image).
        pool: PLC's pooling block side.
        trim: how a region larger than the budget is cut (``"center"`` or ``"stride"``).
        seed: ``random``'s base seed (as :class:`crop.methods.random_prune.RandomConfig`'s).
        image_seeds: ``random``'s seed for each image of the request, which the plugin's processor
            works out from the prompt (:func:`random_seeds`; the ``"seeds"`` option); after
            :meth:`decode`, the one image's.
    """

    method: str = "none"
    keep_tokens: int | None = None
    box: GridBox | None = None
    pool: int = 4
    trim: str = "center"
    seed: int = 0
    image_seeds: tuple[int, ...] = ()

    @classmethod
    def parse(cls, options: Any) -> CropRequest:
        """The request for ``options`` (the ``crop`` entry of ``mm_processor_kwargs``; ``None``: stock).

        Raises:
            CropInputError: in one line, for anything invalid (unknown key or method, an
                inner-LLM method, a bad budget, box, pool or trim).
        """
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise CropInputError(f"crop options must be a JSON object, got {type(options).__name__}")
        unknown = sorted(set(options) - _KEYS)
        if unknown:
            raise CropInputError(f"unknown crop option(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        if options.get("localizer") is not None:  # the plugin's processor replaces it by its box first
            raise CropInputError("a crop localizer is resolved by the plugin's processor; this model has none")
        method = options.get("method", "crop-region" if "box" in options else "none")
        if method in INNER_LLM:
            raise CropInputError(f"{method} prunes inside the LLM, which vLLM cannot do (every layer of a request shares "
                                 f"one KV-cache length); use one of {', '.join(ENGINE_METHODS)}")
        if method not in ENGINE_METHODS:
            raise CropInputError(f"unknown crop method {method!r}; vLLM runs {', '.join(ENGINE_METHODS)}")
        keep = options.get("keep_tokens")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise CropInputError(f"keep_tokens must be a positive integer, got {keep!r}")
        if method in ("pool", "crop-plc-trained", "random") and keep is None:
            raise CropInputError(f"{method} needs keep_tokens")
        grid = options.get("grid", DEFAULT_GRID)
        box = None
        if options.get("box") is not None:
            coords = options["box"]
            if not isinstance(coords, (list, tuple)) or len(coords) != 4 or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in coords):
                raise CropInputError(f"box must be [x0, y0, x1, y1] (grid cells, integers), got {coords!r}")
            try:
                box = GridBox.from_list(coords, grid)
            except ValueError as exc:
                raise CropInputError(str(exc)) from None
        pool = options.get("pool", 4)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise CropInputError(f"pool must be a positive integer, got {pool!r}")
        trim = options.get("trim", "center")
        if trim not in TRIMS:
            raise CropInputError(f"unknown trim {trim!r}; choose one of {', '.join(TRIMS)}")
        seed = options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CropInputError(f"seed must be an integer >= 0, got {seed!r}")
        seeds = options.get("seeds") or ()
        if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                            for s in seeds):
            raise CropInputError(f"seeds must be a list of integers >= 0 (one per image), got {seeds!r}")
        return cls(method, keep, box, pool, trim, seed, tuple(seeds))

    def encode(self, image_index: int = 0) -> torch.Tensor:
        """``(10,)`` long: the request for one image (vLLM carries per-item tensors to the model)."""
        box = self.box or GridBox.full()
        image_seed = self.image_seeds[image_index] if image_index < len(self.image_seeds) else -1
        return torch.tensor([_CODES[self.method], -1 if self.keep_tokens is None else self.keep_tokens,
                             box.x0, box.y0, box.x1, box.y1, box.grid, self.pool, TRIMS.index(self.trim), image_seed])

    @classmethod
    def decode(cls, row: torch.Tensor) -> CropRequest:
        """The request :meth:`encode` wrote, for its one image."""
        code, keep, x0, y0, x1, y1, grid, pool, trim, image_seed = (int(v) for v in row.tolist())
        return cls(ENGINE_METHODS[code], None if keep < 0 else keep, GridBox(x0, y0, x1, y1, grid), pool, TRIMS[trim],
                   image_seeds=() if image_seed < 0 else (image_seed,))


def random_seeds(prompt_ids: list[int], placeholder: int, image_tokens: list[int], base: int) -> list[int]:
    """The seed of each image's ``random`` draw, as crop's Hugging Face path derives it from the same prompt.

    That path seeds image ``i`` of a prompt with ``base`` + :func:`crop.methods.random_prune.sample_seed`:
    a CRC of the prompt's token ids as the Hugging Face processor writes them (each image's placeholder
    repeated for all of its ``image_tokens``) plus ``7919 * i``. vLLM's prompt holds one placeholder per
    image, so the ids are expanded here first.
    """
    ids: list[int] = []
    counts = iter(image_tokens)
    for token in prompt_ids:
        ids.extend([token] * next(counts) if token == placeholder else [token])
    offset = zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())
    return [base + (offset + 7919 * i) % (2**31) for i in range(len(image_tokens))]


def question_from_prompt(prompt: str, special_tokens: list[str]) -> str:
    """The question of a request: its last user turn, without the chat template's and the image's tokens.

    Knows the two chat layouts the plugin serves: ChatML (``<|im_start|>user\n ... <|im_end|>``,
    Qwen) and ``USER: ... ASSISTANT:`` (LLaVA-1.5); any other prompt is taken whole. Special tokens
    (``special_tokens``: the tokenizer's added vocabulary, image placeholders included) are
    removed and whitespace is collapsed.
    """
    turns = re.findall(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", prompt, flags=re.S)
    if not turns:
        turns = re.findall(r"USER:(.*?)(?:ASSISTANT:|$)", prompt, flags=re.S)
    text = turns[-1] if turns else prompt
    for token in sorted(special_tokens, key=len, reverse=True):
        text = text.replace(token, " ")
    return " ".join(text.split())


def compress_grid(request: CropRequest, features: torch.Tensor, rows: int, cols: int,
                  compressor=None) -> CompressedImage:
    """One image's ``rows x cols`` token grid (row-major ``features``) after the request's method.

    The same rules as crop's Hugging Face methods on a plain grid (``crop-region``:
    :class:`crop.methods.region_prune.CropRegion`; ``crop-plc``: :class:`crop.methods.plc.CropPLC`;
    ``pool``: :class:`crop.methods.pool.UniformPool`; ``crop-plc-trained``:
    :class:`crop.methods.plc_trained.CropPLCTrained` with ``compressor``, the server's). Except for the
    trained PLC's, which tokens survive depends only on the grid and the request, never on the
    feature values, so the processor can place them with any features (:func:`planned_sources`)
    before the vision tower runs; of the trained PLC's only the count is known then
    (:func:`planned_count`).

    Returns:
        The tokens that reach the LLM, each with its source (row-major index).
    """
    n = rows * cols
    span = ImageSpan(0, 0, n, rows, cols)
    box = request.box or GridBox.full()
    budget = request.keep_tokens
    if request.method == "none" or (budget is not None and budget >= n):  # as the HF path: the stock image
        return CompressedImage(features, torch.arange(n, device=features.device))
    if request.method == "crop-plc-trained":
        if compressor is None:
            raise CropInputError("crop-plc-trained needs the server's compressor")
        from crop.vllm_plugin.compressing import compress_trained

        assert budget is not None  # parse() refuses it without one
        return compress_trained(features, rows, cols, box, budget, compressor)
    if request.method == "random":
        if not request.image_seeds:
            raise CropInputError("random needs the seed the plugin's processor derives from the prompt")
        assert budget is not None  # parse() refuses it without one
        keep = random_keep(span, budget, request.image_seeds[0]).to(features.device)  # (k,)
        return compose(span, features, features[keep], keep)
    if request.method == "crop-region":
        keep = select_tokens(box, rows, cols, budget, trim=request.trim).to(features.device)  # (k,)
        return compose(span, features, features[keep], keep)
    if request.method == "crop-plc":
        def select(s: ImageSpan, b: GridBox, k: int | None) -> torch.Tensor:
            return select_tokens(b, s.rows, s.cols, k, trim=request.trim)

        try:
            keep = region_share(select, span, box, budget, request.pool)
        except ValueError as exc:
            raise CropInputError(str(exc)) from None
        return pool_image(span, features, keep, request.pool)
    assert budget is not None  # parse() refuses pool without a budget
    tokens, source = pool_grid_to(features, rows, cols, budget)
    return CompressedImage(tokens, source)


def planned_sources(request: CropRequest, rows: int, cols: int) -> torch.Tensor:
    """``(M,)`` the source (row-major index) of each token :func:`compress_grid` lets through, in order.

    Raises:
        ValueError: for the trained PLC where it compresses (its sources depend on the features).
    """
    if request.method == "crop-plc-trained" and request.keep_tokens is not None and request.keep_tokens < rows * cols:
        raise ValueError("the trained PLC's token sources depend on the features: only its count is planned")
    return compress_grid(request, torch.zeros(rows * cols, 1), rows, cols).source


def planned_count(request: CropRequest, rows: int, cols: int) -> int:
    """How many tokens :func:`compress_grid` lets through for one ``rows x cols`` image (no features needed)."""
    if request.method == "crop-plc-trained":
        assert request.keep_tokens is not None  # parse() refuses it without one
        return min(request.keep_tokens, rows * cols)  # anchors + compressed tokens, or the stock image
    return int(planned_sources(request, rows, cols).numel())
