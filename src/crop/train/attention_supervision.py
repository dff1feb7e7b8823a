"""Attention supervision: train one head to look at the question's region, and capture what it looks at.

Without it a from-scratch localizer sits on a long plateau where its answer ignores the image
(see ``TrainConfig.attn_weight``). The supervised quantity is head 0 of one LLM layer, at each
answer's first position: its attention over the image tokens is pulled towards a uniform
distribution over the tokens of the question's region (the recipe's targets; :func:`region_token_target`
builds one from a pixel box) by :func:`attention_loss`, with :func:`image_positions` locating the
image tokens in each row.

Those probabilities are not returned by the fast (SDPA) attention, and eager attention over
every layer would cost far more than the one row per answer that is needed. So the model's
language model uses a registered attention implementation (:data:`CAPTURE_ATTENTION`, set by
:func:`use_capture_attention`) that runs SDPA as usual and, for the one supervised layer only,
recomputes head 0's probabilities at the requested query positions. Transformers calls that
function with no way to pass extra arguments, so what to capture is module state, set and
cleared by the :class:`AttentionCapture` context manager around the forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from crop.train.model_hooks import transformers_model


def region_token_target(box_px: list[int], image_size: int, grid: int) -> np.ndarray:
    """A uniform distribution over the tokens of a ``grid`` x ``grid`` token grid that a pixel box overlaps.

    Args:
        box_px: ``[x0, y0, x1, y1]`` in pixels (``x1, y1`` exclusive).
        image_size: image side in pixels.
        grid: tokens per side.

    Returns:
        ``float32`` array ``(grid * grid,)`` summing to 1.
    """
    from crop.data.synth import pixel_box_to_grid

    x0, y0, x1, y1 = pixel_box_to_grid(box_px, image_size, grid)
    target = np.zeros((grid, grid), dtype=np.float32)
    target[y0:y1 + 1, x0:x1 + 1] = 1.0
    return (target / target.sum()).reshape(-1)


def attention_loss(probs: torch.Tensor, rows: torch.Tensor, image_pos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between target distributions over image tokens and one head's attention rows.

    Args:
        probs: (Q, L) attention probabilities of the supervised head at the query positions.
        rows: (Q,) batch row of each query.
        image_pos: (B, N) sequence positions of each row's N image tokens.
        targets: (Q, N) target distributions.

    Returns:
        The mean over queries of ``-sum_j target_j * log attn_j`` (scalar).
    """
    a = torch.gather(probs, 1, image_pos[rows])  # (Q, N)
    return -(targets * torch.log(a + 1e-8)).sum(-1).mean()


def image_positions(input_ids: torch.Tensor, image_token_id: int, n: int) -> torch.Tensor:
    """(B, N) positions of the ``n`` image tokens in each row of ``input_ids`` (B, L)."""
    pos = (input_ids == image_token_id).nonzero()  # (B * N, 2), row-major
    if pos.shape[0] != input_ids.shape[0] * n:
        raise ValueError(f"expected {n} image tokens per row")
    return pos[:, 1].reshape(input_ids.shape[0], n)


# --------------------------------------------------------------------------------------------
# capture of the supervised head's probabilities, with SDPA kept for the actual computation

CAPTURE_ATTENTION = "crop_train_capture"
_CAPTURE: dict[str, Any] = {"layer": None, "rows": None, "probs": None}


def _capture_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention that also keeps head 0's probabilities at some query positions of one layer.

    ``query``/``key`` are (B, H, L, d) after RoPE. Rows are right-padded and the supervised
    query positions lie inside the real sequence, so a causal mask alone is exact for them.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _CAPTURE["layer"] is not None and getattr(module, "layer_idx", None) == _CAPTURE["layer"]:
        rows, pos = _CAPTURE["rows"][:, 0], _CAPTURE["rows"][:, 1]  # (Q,), (Q,)
        q = query[rows, 0, pos]  # (Q, d): query head 0 reads kv head 0 under GQA
        k = key[rows, 0]  # (Q, L, d)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        logits = torch.einsum("qd,qld->ql", q, k) * scale  # (Q, L)
        future = torch.arange(k.shape[1], device=k.device)[None] > pos[:, None]  # (Q, L)
        _CAPTURE["probs"] = logits.masked_fill(future, float("-inf")).softmax(-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_capture_attention() -> str:
    """Register the capturing attention (and SDPA's mask builder) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return CAPTURE_ATTENTION


class AttentionCapture:
    """Within ``with``, keep head 0's attention probabilities of LLM layer ``layer`` at ``rows``.

    The model's language model must use :data:`CAPTURE_ATTENTION` (see
    :func:`use_capture_attention`); outside the block that implementation is plain SDPA.

    Args:
        layer: the decoder layer index (``self_attn.layer_idx``); ``None`` captures nothing.
        rows: (Q, 2) (batch row, query position) pairs.
    """

    def __init__(self, layer: int | None, rows: torch.Tensor | None = None):
        self.layer, self.rows = layer, rows
        self.probs: torch.Tensor | None = None  # (Q, L) after the block

    def __enter__(self) -> AttentionCapture:
        _CAPTURE.update(layer=self.layer, rows=self.rows, probs=None)
        return self

    def __exit__(self, *exc) -> None:
        self.probs = _CAPTURE["probs"]
        _CAPTURE.update(layer=None, rows=None, probs=None)


def use_capture_attention(model: nn.Module) -> None:
    """Make ``model``'s language model use the capturing SDPA attention (vision tower untouched)."""
    name = register_capture_attention()
    transformers_model(model).set_attn_implementation({"text_config": name})
