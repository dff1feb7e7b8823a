"""CROP's trained PLC in vLLM: the server's compressor, checked where requests are processed, run in the model.

A trained compressor belongs to the answerer it was trained for (``crop train plc``), so a server
has one: the folder named by ``CROP_VLLM_COMPRESSOR`` (both the API-server process, which checks
requests, and the engine process, which runs the model, read it). A request asks for it with
``{"method": "crop-plc-trained", "keep_tokens": N, "box": [...]}``: ``N`` tokens per image reach the
LLM, the region's anchors plus the compressor's tokens, made by
:func:`crop.methods.plc_trained.compress_with`, the Hugging Face method's own function.

Only LLaVA-1.5 serves it. Which token a compressed token is placed at depends on the compressor's
attention (the token it draws most from), so it is known only after the vision tower has run;
LLaVA numbers its pruned prompt 1-D as it stands and needs no placement, but Qwen's M-RoPE
positions are fixed by vLLM before the encoder runs (it would need vLLM's
``recompute_mrope_positions`` path).
"""

from __future__ import annotations

import os
from functools import cache

import torch

from crop.errors import CropInputError
from crop.models.base import CompressedImage, ImageSpan
from crop.ops.selection import select_tokens
from crop.regions import GridBox

COMPRESSOR_ENV = "CROP_VLLM_COMPRESSOR"


def compressor_folder() -> str:
    """The server's compressor folder.

    Raises:
        CropInputError: if ``CROP_VLLM_COMPRESSOR`` is not set or names no compressor.
    """
    from crop.compressor import read_compressor_config

    folder = os.environ.get(COMPRESSOR_ENV, "").strip()
    if not folder:
        raise CropInputError(f"crop-plc-trained needs the server's compressor: start it with {COMPRESSOR_ENV}=FOLDER "
                             "(a compressor `crop train plc` made for this model)")
    try:
        read_compressor_config(folder)
    except FileNotFoundError as exc:
        raise CropInputError(f"{COMPRESSOR_ENV}: {exc}") from None
    return folder


def check_compressor(hidden_size: int) -> None:
    """Refuse a trained-PLC request (one line) unless the server's compressor makes ``hidden_size``-dim tokens."""
    from crop.compressor import read_compressor_config

    folder = compressor_folder()
    dim = read_compressor_config(folder).dim
    if dim != hidden_size:
        raise CropInputError(f"the compressor in {folder} makes {dim}-dim tokens but this model's LLM reads "
                             f"{hidden_size}-dim ones: a compressor belongs to the answerer it was trained for")


@cache
def _loaded(folder: str, device: str, dtype: torch.dtype):
    from crop.compressor import load_compressor

    compressor, _ = load_compressor(folder)
    return compressor.to(device=device, dtype=dtype)


def server_compressor(device: torch.device, dtype: torch.dtype):
    """The server's compressor on ``device`` in ``dtype``, loaded once per process."""
    return _loaded(compressor_folder(), str(device), dtype)


class _GridSelection:
    """The one adapter method :func:`compress_with` needs, on a plain square grid (crop's LLaVA adapter's rule)."""

    @staticmethod
    def select(span: ImageSpan, box: GridBox, budget: int | None, trim: str = "center") -> torch.Tensor:
        return select_tokens(box, span.rows, span.cols, budget, trim=trim)


def compress_trained(features: torch.Tensor, rows: int, cols: int, box: GridBox, keep_tokens: int,
                     compressor) -> CompressedImage:
    """One image's ``(rows * cols, D)`` features through the trained PLC, as crop's Hugging Face method runs it."""
    from crop.config import CropPLCTrainedConfig
    from crop.methods.plc_trained import compress_with

    config = CropPLCTrainedConfig(keep_tokens=keep_tokens, compressor=compressor_folder(), grid=box.grid)
    image, _ = compress_with(compressor, _GridSelection(), config, features, ImageSpan(0, 0, rows * cols, rows, cols),
                             box)
    return image
