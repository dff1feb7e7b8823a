"""Attention rows for attention-scored inner-LLM baselines (FastV, PyramidDrop, SparseVLM, CROP-self), SDPA kept on.

The model never runs with ``output_attentions``: the few attention rows a method ranks visual
tokens by are recomputed from the layer's own queries and keys, either

- *captured*: forward hooks on layer ``K-1``'s ``q_proj``/``k_proj`` keep their outputs during an
  armed prefill (FastV, SparseVLM: the attention of the layer before the pruning layer decides);
- *recomputed*: layer ``K``'s norm and projections applied to the hidden states entering it
  (PyramidDrop's "lightweight attention" at the layer it prunes).

Either way the projections become the states the layer's attention really uses, as the stock
attention ``forward`` (Llama, Qwen2-VL, Qwen3-VL) builds them: viewed as heads, passed through
the layer's per-head ``q_norm``/``k_norm`` where it has them (Qwen3 / Qwen3-VL, before RoPE;
:func:`query_states`, :func:`key_states`), rotated with the ``position_embeddings`` (cos, sin) the
model computed for that sequence (for Qwen2-VL/Qwen3-VL these are already the composed M-RoPE
tables; :func:`rotate`), key/value heads repeated for GQA, scaled by the layer's ``scaling``, the
softmax causal over the real (unpadded) slots, and heads averaged. DART ranks its pivots by the
same key states (:mod:`crop.methods.dart`). All architecture access goes through
:meth:`crop.models.base.VLMAdapter.attention_parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from crop.config import ConfigMixin, check_keep_tokens, check_ratio
from crop.methods.base import InnerLLMMethod
from crop.models.base import AttentionParts, VLMAdapter


class QKCapture:
    """Keeps the outputs of one layer's ``q_proj`` and ``k_proj`` while armed (instance-level hooks).

    Args:
        parts: the layer's attention parts (from the adapter).
    """

    def __init__(self, parts: AttentionParts) -> None:
        self.parts = parts
        self.armed = False
        self.q: torch.Tensor | None = None  # (B, L, H*d)
        self.k: torch.Tensor | None = None  # (B, L, Hkv*d)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        """Register the two forward hooks (idempotent)."""
        if self._handles:
            return
        self._handles.append(self.parts.q_proj.register_forward_hook(self._keep("q")))
        self._handles.append(self.parts.k_proj.register_forward_hook(self._keep("k")))

    def detach(self) -> None:
        """Remove the hooks and drop what was kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.armed, self.q, self.k = False, None, None

    def arm(self) -> None:
        """Keep the projections of the next forward (the prompt's prefill)."""
        self.armed, self.q, self.k = True, None, None

    def take(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept ``(q, k)`` of a ``seq_len``-token prefill; disarms (later forwards keep nothing).

        Raises:
            RuntimeError: if nothing (or another sequence) was captured.
        """
        q, k = self.q, self.k
        self.armed, self.q, self.k = False, None, None
        if q is None or k is None or q.shape[1] != seq_len or k.shape[1] != seq_len:
            raise RuntimeError("no attention projections were captured for this prompt; call handle.prepare(inputs) "
                               "before each forward/generate call")
        return q, k

    def _keep(self, which: str):
        def hook(module, args, output):
            if self.armed:
                setattr(self, which, output.detach())
        return hook


def _heads(x: torch.Tensor, heads: int, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """``(..., heads*d)`` projections as ``(..., heads, d)`` float32 states, per-head ``norm`` applied first.

    The norm runs in the projection's own dtype, as the model's attention runs it (a norm whose
    weight is in another dtype than float32, e.g. ``nn.LayerNorm``, may refuse float32 input).
    """
    x = x.view(*x.shape[:-1], heads, head_dim)  # (..., heads, d)
    if norm is not None:
        x = norm(x)  # (..., heads, d) normalised over d, per head
    return x.float()


def query_states(parts: AttentionParts, q: torch.Tensor) -> torch.Tensor:
    """The layer's query states before RoPE: ``(..., H*d)`` ``q_proj`` outputs -> ``(..., H, d)`` float32.

    Applies ``parts.q_norm`` (Qwen3's per-head RMSNorm) where the layer has one, so the scores are
    the ones the model computes; without it a Qwen3 layer's rows come out wrong.
    """
    return _heads(q, parts.heads, parts.head_dim, parts.q_norm)


def key_states(parts: AttentionParts, k: torch.Tensor) -> torch.Tensor:
    """The layer's key states before RoPE: ``(..., Hkv*d)`` ``k_proj`` outputs -> ``(..., Hkv, d)`` float32.

    Applies ``parts.k_norm`` where the layer has one (see :func:`query_states`).
    """
    return _heads(k, parts.kv_heads, parts.head_dim, parts.k_norm)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the stock attention applies it (``x * cos + rotate_half(x) * sin``), shared by every head.

    Args:
        x: ``(n, h, d)`` query or key states.
        cos, sin: ``(n, d)`` the rotary tables at those ``n`` slots.

    Returns:
        ``(n, h, d)`` float32.
    """
    cos, sin = cos.float()[:, None], sin.float()[:, None]  # (n, 1, d)
    return x * cos + rotate_half(x) * sin  # (n, h, d)


def attention_rows(parts: AttentionParts, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   queries: Sequence[torch.Tensor], valid: torch.Tensor) -> list[torch.Tensor]:
    """Head-averaged causal attention of chosen query slots over all slots, per sample.

    Args:
        parts: head geometry, per-head q/k norms and scale of the layer.
        q: ``(B, L, H*d)`` query projections (``q_proj`` outputs: before the q norm and RoPE).
        k: ``(B, L, Hkv*d)`` key projections (``k_proj`` outputs: before the k norm and RoPE).
        cos, sin: ``(B|1, L, d)`` the layer's rotary tables for these slots.
        queries: per sample, ``(n_b,)`` slots whose attention rows are wanted.
        valid: ``(B, L)`` False on padding slots (never attended to).

    Returns:
        Per sample, ``(n_b, L)`` attention probabilities (float32; each row sums to 1 over the
        slots the query may see: real slots at or before it).
    """
    batch, seq_len, _ = q.shape
    groups = parts.heads // parts.kv_heads
    out = []
    for b in range(batch):
        rows = queries[b].to(q.device)  # (n,)
        cb, sb = cos[b if cos.shape[0] > 1 else 0], sin[b if sin.shape[0] > 1 else 0]  # (L, d) each
        qb = rotate(query_states(parts, q[b, rows]), cb[rows], sb[rows])  # (n, H, d)
        kb = rotate(key_states(parts, k[b]), cb, sb)  # (L, Hkv, d)
        kb = kb.repeat_interleave(groups, dim=1)  # (L, H, d) GQA: each kv head serves a group
        scores = torch.einsum("nhd,lhd->hnl", qb, kb) * parts.scaling  # (H, n, L)
        keys = torch.arange(seq_len, device=q.device)  # (L,)
        allowed = (keys[None, :] <= rows[:, None]) & valid[b][None, :]  # (n, L) causal, no padding
        scores = scores.masked_fill(~allowed[None], float("-inf"))  # (H, n, L)
        out.append(scores.softmax(dim=-1).mean(dim=0))  # (n, L)
    return out


def scaled_layers(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Stage layers given as fractions of a model's depth (e.g. 8/32), rounded, kept in ``[1, num_layers - 1]``.

    Returns:
        Strictly increasing layer indices (duplicates after rounding merged).
    """
    layers = [min(max(int(f * num_layers + 0.5), 1), num_layers - 1) for f in fractions]
    return sorted(set(layers))


def stage_counts(n_in: int, keep_tokens: int | None, layers: Sequence[int], num_layers: int,
                 ratio: float) -> list[int]:
    """Visual tokens each stage keeps, for a budget given as the layer-weighted equivalent count.

    Stage ``s`` keeps ``n1 * ratio**s`` tokens; ``n1`` is chosen so that the layer-weighted
    average over the LM's layers (``n_in`` before the first stage) equals ``keep_tokens``.
    When the stage layers make that impossible (the first ``layers[0]`` layers alone already
    cost more, so the last stage would keep < 1 token), the budget is read as FastV reads it:
    ``keep_tokens`` survive the first stage (and the reported equivalent count is larger).
    ``keep_tokens=None`` keeps ``ratio**(s+1)`` of the tokens at stage ``s`` (50/25/12.5 %).
    A budget of all the tokens keeps everything at every stage.

    Args:
        n_in: the image's visual tokens.
        keep_tokens: the equivalent-token budget, or ``None``.
        layers: the stage layers (increasing).
        num_layers: the LM's depth.
        ratio: lambda, the share of the previous stage's tokens each stage keeps.

    Returns:
        Non-increasing counts, one per stage, each in ``[1, n_in]`` (``[0, 0, ...]`` if ``n_in == 0``).
    """
    if n_in == 0:
        return [0] * len(layers)
    if keep_tokens is None:
        first = n_in * ratio
    elif keep_tokens >= n_in:
        return [n_in] * len(layers)
    else:
        bounds = list(layers[1:]) + [num_layers]
        weight = sum((end - start) * ratio ** s for s, (start, end) in enumerate(zip(layers, bounds, strict=True)))
        first = (keep_tokens * num_layers - layers[0] * n_in) / weight
        if first * ratio ** (len(layers) - 1) < 1:
            first = keep_tokens
    counts, prev = [], n_in
    for s in range(len(layers)):
        prev = min(prev, max(1, int(first * ratio ** s + 0.5)))
        counts.append(prev)
    return counts


class BaselineConfigMixin(ConfigMixin):
    """Shared checks for the attention-scored baselines' configs (dataclasses)."""

    _check_keep = staticmethod(check_keep_tokens)
    _check_ratio = staticmethod(check_ratio)

    @staticmethod
    def _check_layers(layers: Any) -> None:
        if layers is None:
            return
        if not isinstance(layers, tuple) or not layers or any(isinstance(x, bool) or not isinstance(x, int)
                                                                for x in layers):
            raise ValueError(f"layers must be a non-empty tuple of ints or None, got {layers!r}")
        if any(x < 1 for x in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be strictly increasing and >= 1, got {layers!r}")


class AttentionScoredMethod(InnerLLMMethod):
    """Base of inner-LLM methods that rank visual tokens by attention rows (see the module docstring).

    Subclasses set :attr:`capture_before` and use :meth:`slot_validity`, :meth:`last_slots` and
    :meth:`attention_rows_at` inside their :meth:`select_at_layer`.

    Class attributes:
        capture_before: rank with the attention of the layer before each stage layer (captured)
            rather than with the stage layer's own (recomputed from its input).
    """

    capture_before: ClassVar[bool] = True

    def __init__(self, adapter: VLMAdapter, config: Any) -> None:
        super().__init__(adapter, config)
        self.captures = [QKCapture(adapter.attention_parts(k - 1)) for k in self.stage_layers()] \
            if self.capture_before else []
        self._attention_mask: torch.Tensor | None = None

    def attach(self) -> None:
        for capture in self.captures:
            capture.attach()
        super().attach()

    def detach(self) -> None:
        super().detach()
        for capture in self.captures:
            capture.detach()
        self._attention_mask = None  # a removed method keeps no tensor of the last prompt

    def prepare(self, inputs, spans, boxes):
        mask = inputs.get("attention_mask")
        self._attention_mask = mask.bool() if isinstance(mask, torch.Tensor) else None  # (B, L) False on padding
        for capture in self.captures:
            capture.arm()
        return super().prepare(inputs, spans, boxes)

    # -- helpers for subclasses ----------------------------------------------------------------

    def slot_validity(self, stage: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(origin, valid)``: :meth:`slot_origin` and the ``(B, L)`` mask of real (unpadded) slots."""
        origin = self.slot_origin(stage, hidden)  # (B, L)
        valid = origin >= 0  # (B, L)
        if self._attention_mask is not None:
            mask = self._attention_mask.to(hidden.device)  # (B, P)
            valid = valid & mask.gather(1, origin.clamp(min=0).clamp(max=mask.shape[1] - 1))  # (B, L)
        return origin, valid

    def attention_rows_at(self, stage: int, hidden: torch.Tensor, layer_kwargs: dict,
                          queries: Sequence[torch.Tensor], valid: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the ``(n_b, L)`` head-averaged attention of slots ``queries[b]`` (see :func:`attention_rows`).

        Uses the layer before the stage layer (captured) or the stage layer itself (recomputed
        from ``hidden``), as :attr:`capture_before` says. Either way only the projections are
        taken here; :func:`attention_rows` turns them into the layer's query/key states (per-head
        norms, RoPE).
        """
        cos, sin = layer_kwargs["position_embeddings"]  # (B|1, L, d) each
        with torch.no_grad():
            if self.capture_before:
                q, k = self.captures[stage].take(hidden.shape[1])  # (B, L, H*d), (B, L, Hkv*d)
                parts = self.captures[stage].parts
            else:
                parts = self.adapter.attention_parts(self.stage_layers()[stage])
                normed = parts.norm(hidden)  # (B, L, D)
                q, k = parts.q_proj(normed), parts.k_proj(normed)  # (B, L, H*d), (B, L, Hkv*d)
            return attention_rows(parts, q, k, cos, sin, queries, valid)

    def last_token_scores(self, stage: int, hidden: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
        """Per sample, ``(L,)`` the head-averaged attention of the prompt's last real token over every slot."""
        _, valid = self.slot_validity(stage, hidden)  # (B, L)
        rows = self.attention_rows_at(stage, hidden, layer_kwargs, self.last_slots(valid), valid)  # per b: (1, L)
        return [r[0] for r in rows]

    @staticmethod
    def last_slots(valid: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, ``(1,)`` the last real slot (the prompt's last token), found on the device.

        Args:
            valid: ``(B, L)`` False on padding slots.

        Returns:
            ``B`` one-element long tensors.
        """
        positions = torch.arange(valid.shape[1], device=valid.device)  # (L,)
        last = torch.where(valid, positions, -1).max(dim=1).values  # (B,) no boolean-mask gather, no host read
        return [last[b:b + 1] for b in range(valid.shape[0])]
