"""The trained PLC compressor: learnable queries that summarise an image's visual tokens in a few tokens.

CROP's trained PLC (paper section 3) feeds the LLM the region's own tokens (anchors ``X_r``)
plus ``M`` tokens made by learnable queries that cross-attend to the image's tokens. This module
is that compressor, and its save/load.

Decisions where the paper is silent (each a field of :class:`CompressorConfig` or of
:class:`crop.config.CropPLCTrainedConfig`):

- **Where it sits: on the projector's output** (the features the LLM reads, dimension = the LLM's
  hidden size). Every adapter gives those features (:meth:`VLMAdapter.encode_images`), so one
  compressor design serves every architecture, and its outputs need no further projection: they
  are LLM input embeddings, like the anchors next to them.
- **What a compressed token is**: a convex mix of the image's tokens (one softmax attention of
  the query over the keys; the values are the tokens themselves) plus a residual MLP whose last
  layer starts at zero. An untrained compressor is therefore a weighted average of the tokens,
  in the LLM's input distribution from the first step; training moves it.
- **Keys**: each token's features (layer-normed) plus a learned projection of Fourier features of
  its centre (y, x) in [0, 1] on the token grid, so the queries can be spatial and any grid shape
  works (LLaVA-1.5 24x24, Qwen's odd grids, LLaVA-NeXT's base view + tiles).
- **How many**: a bank of ``max_queries`` queries; a budget of ``M`` uses the first ``M``
  (training samples ``M`` so every prefix is trained).
- **Where each compressed token goes**: at the position of the token it draws most from
  (the argmax of its attention), so M-RoPE positions and LLaVA sequence order follow one rule.

Saved as ``compressor.safetensors`` + ``compressor.json`` (this config, the answerer it was trained
for, and the training summary).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_FILE = "compressor.safetensors"
CONFIG_FILE = "compressor.json"


@dataclass
class CompressorConfig:
    """Sizes of a :class:`RegionCompressor`.

    Args:
        dim: the token dimension (the LLM's hidden size).
        max_queries: the query bank's size (the largest ``M``).
        key_dim: the query/key dimension.
        fourier: Fourier frequencies per coordinate of the position features.
        mlp_ratio: hidden width of the residual MLP, as a multiple of ``dim``.
    """

    dim: int
    max_queries: int = 64
    key_dim: int = 64
    fourier: int = 8
    mlp_ratio: int = 2

    def __post_init__(self) -> None:
        for name in ("dim", "max_queries", "key_dim", "fourier", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CompressorConfig.{name} must be a positive int, got {value!r}")


def grid_coordinates(grids: list[tuple[int, int]]) -> torch.Tensor:
    """``(V, 2)`` the (y, x) centre of every token in [0, 1], grid after grid, each row-major."""
    out = []
    for rows, cols in grids:
        y = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows  # (rows,)
        x = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols  # (cols,)
        out.append(torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).view(-1, 2))  # (rows*cols, 2)
    return torch.cat(out)


class RegionCompressor(nn.Module):
    """``M`` learnable queries cross-attending to an image's tokens (see the module docstring).

    Args:
        config: the sizes.
    """

    def __init__(self, config: CompressorConfig) -> None:
        super().__init__()
        self.config = config
        d, k = config.dim, config.key_dim
        self.queries = nn.Parameter(torch.randn(config.max_queries, k) / math.sqrt(k))  # (Q, k)
        self.key_norm = nn.LayerNorm(d)
        self.key = nn.Linear(d, k)
        self.position = nn.Linear(4 * config.fourier, k)
        norm, up, act = nn.LayerNorm(d), nn.Linear(d, config.mlp_ratio * d), nn.GELU()
        down = nn.Linear(config.mlp_ratio * d, d)
        self.mlp = nn.Sequential(norm, up, act, down)
        nn.init.zeros_(down.weight)  # the residual starts at zero: outputs start as token mixes
        nn.init.zeros_(down.bias)

    def _fourier(self, coords: torch.Tensor) -> torch.Tensor:
        freqs = 2.0 ** torch.arange(self.config.fourier, device=coords.device, dtype=coords.dtype) * math.pi  # (F,)
        angles = coords[..., None] * freqs  # (V, 2, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (V, 4F)

    def forward(self, tokens: torch.Tensor, coords: torch.Tensor, count: int,
                attend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress one image.

        Args:
            tokens: ``(V, D)`` the image's visual tokens.
            coords: ``(V, 2)`` their (y, x) centres in [0, 1] (:func:`grid_coordinates`).
            count: ``M``, how many compressed tokens (``1 <= M <= max_queries``).
            attend: ``(V,)`` bool, which tokens the queries may read (default all; at least one).

        Returns:
            ``(compressed (M, D), weights (M, V))``: the tokens and each one's attention over the
            image's tokens.
        """
        if not 1 <= count <= self.config.max_queries:
            raise ValueError(f"this compressor makes 1 to {self.config.max_queries} tokens, asked for {count}")
        if tokens.shape[-1] != self.config.dim:
            raise ValueError(f"this compressor was built for {self.config.dim}-dim tokens, got {tokens.shape[-1]}; "
                             "it belongs to another answerer")
        dtype = self.key.weight.dtype
        x = tokens.to(dtype)  # (V, D)
        keys = self.key(self.key_norm(x)) + self.position(self._fourier(coords.to(x.device, dtype)))  # (V, k)
        logits = self.queries[:count] @ keys.T / math.sqrt(self.config.key_dim)  # (M, V)
        if attend is not None:
            if not bool(attend.any()):
                raise ValueError("the compressor's queries need at least one token to read")
            logits = logits.masked_fill(~attend.to(logits.device)[None, :], float("-inf"))
        weights = logits.softmax(dim=-1)  # (M, V)
        mixed = weights @ x  # (M, D)
        return (mixed + self.mlp(mixed)).to(tokens.dtype), weights


def compressor_flops(config: CompressorConfig, tokens: int, count: int) -> int:
    """Analytic FLOPs of one :meth:`RegionCompressor.forward` over ``tokens`` visual tokens making ``count``.

    Multiply-adds count 2; layer norms 5 per element, a softmax 5 per logit, GELU left out. The
    keys are computed for every token even when the queries read only some (as the code does).
    """
    d, k, v, m = config.dim, config.key_dim, tokens, count
    keys = 5 * v * d + 2 * v * d * k + 2 * v * 4 * config.fourier * k  # norm, projection, position features
    attend = 2 * m * v * k + 5 * m * v + 2 * m * v * d  # logits, softmax, the mix of the tokens
    mlp = 5 * m * d + 4 * m * d * config.mlp_ratio * d  # norm, two linears
    return keys + attend + mlp


def save_compressor(compressor: RegionCompressor, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``compressor.safetensors`` + ``compressor.json`` (config + ``meta``) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in compressor.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    payload = {**(meta or {}), "kind": "plc-compressor", "config": asdict(compressor.config)}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return folder


def read_compressor_config(folder: str | Path) -> CompressorConfig:
    """The sizes of the compressor saved in ``folder``, from its JSON alone (no weights read).

    Raises:
        FileNotFoundError: if ``folder`` holds no compressor config.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trained PLC compressor in {folder} (need {CONFIG_FILE}); "
                                "train one with `crop train plc`")
    return CompressorConfig(**json.loads(path.read_text(encoding="utf-8"))["config"])


def load_compressor(folder: str | Path) -> tuple[RegionCompressor, dict[str, Any]]:
    """Read a compressor written by :func:`save_compressor`; ``(module in eval mode, its metadata)``.

    Raises:
        FileNotFoundError: if ``folder`` does not hold both files.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no trained PLC compressor in {folder} (need {WEIGHTS_FILE} and {CONFIG_FILE}); "
                                "train one with `crop train plc`")
    meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    compressor = RegionCompressor(CompressorConfig(**meta["config"]))
    compressor.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return compressor.eval(), meta
