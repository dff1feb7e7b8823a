"""The inner-LLM pruning mechanism: drop prompt tokens at the input of decoder layer K.

Used by CROP's ILP (section 3 of the paper) and by every baseline that prunes inside the LLM.

Layers ``0..K-1`` run on the whole prompt; from layer K on only the kept positions (all text
and the selected visual tokens) are computed and cached. By default kept tokens keep their
original rotary positions: the cos/sin tables and position ids the model already computed are
gathered, never recomputed, so RoPE and Qwen's M-RoPE both stay right. A pruner built with a
``rotary`` function instead *renumbers* positions contiguously after the drop (what some
baselines' official code does, e.g. PyramidDrop): each kept token's position is lowered by the
number of tokens dropped before it, and each generated token's by the number dropped in all,
and the cos/sin tables are recomputed for those positions (1-D RoPE only). A renumbering pruner
may also be ``ordered``: the kept slots then go on in the order the selector gives them (not
sorted), the causal mask follows that order and the renumbered positions are handed out in it
(SparseVLM places its merged tokens after the kept visual tokens this way).

The mechanism is instance-level forward pre-hooks on ``layers[K:]`` (no copied forward, no
class patching). Layer K's hook chooses the kept slots and shortens the hidden states; then
*every* pruned layer (K and each later one) gets its own incoming arguments rewritten for those
slots: its own mask pruned (a sliding-window layer keeps its sliding mask, a full-attention layer
its full one, as Qwen2-VL with ``use_sliding_window`` hands them out), its own cos/sin tables and
position ids gathered. The rewrites are memoized per forward call by the identity of the
incoming objects, so when every layer gets the same mask and tables (the usual case) they are
computed once, at layer K. A renumbering pruner computes one set of positions with the model's
single rotary function, so it refuses a later layer whose rotary inputs are not layer K's (rotary
tables per layer type) unless it was given each layer's own rotary function (``layer_rotary``: Gemma 3's
local and global tables), which then turns the same renumbered positions into that layer's tables; any pruner refuses a layer whose arguments it cannot rewrite (no rotary
tables where it needs them, a mask kind it does not know). Generated tokens are always kept.
Samples of a batch may keep different numbers of tokens: the pruned sequences are left-padded to
the longest, and the padding is masked out as keys.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crop.hf_compat import layer_cache

Selector = Callable[[torch.Tensor, dict], Sequence[torch.Tensor]]
Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_MISSING = object()  # "no memo entry" (a rewrite may itself be None: a mask left implicit)


def _weak(obj: Any) -> Callable[[], Any]:
    """A reference to ``obj`` that does not keep it alive (``None`` and objects without weak references: a plain one)."""
    try:
        return weakref.ref(obj)
    except TypeError:  # None (and anything else that cannot be weakly referenced) is held as is
        return lambda: obj


class LayerMemo:
    """What a pruner made of each incoming per-layer argument during one forward call.

    Entries are keyed by kind and by the ``id`` of the incoming objects (a mask; the cos and sin
    tables; position ids) and hold those objects by weak reference: an entry answers only for the
    very objects it was made from, so a freed tensor whose ``id`` a new one reuses can never hit a
    stale entry, and the memo does not keep the model's unpruned masks alive. The results are held
    strongly (the later layers of the same call need them). Layer K's hook starts a new memo at
    every call, so nothing carries over from one forward to the next.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[Callable[[], Any], ...], Any]] = {}

    @staticmethod
    def _key(kind: str, sources: tuple) -> tuple:
        return (kind,) + tuple(id(s) for s in sources)

    def get(self, kind: str, sources: tuple, default: Any = None) -> Any:
        """The value stored for exactly these ``sources`` (identity, not equality), or ``default``."""
        entry = self._entries.get(self._key(kind, sources))
        if entry is None or any(ref() is not s for ref, s in zip(entry[0], sources, strict=True)):
            return default
        return entry[1]

    def put(self, kind: str, sources: tuple, value: Any) -> Any:
        """Store ``value`` as what ``sources`` became; returns it."""
        self._entries[self._key(kind, sources)] = (tuple(_weak(s) for s in sources), value)
        return value

    def memoized(self, kind: str, sources: tuple, make: Callable[[], Any]) -> Any:
        """The value stored for ``sources``, made by ``make()`` (and stored) on the first request."""
        found = self.get(kind, sources, _MISSING)
        return self.put(kind, sources, make()) if found is _MISSING else found


@dataclass
class ForwardStep:
    """What layer K's hook settled for the forward call in progress, for the pruned layers of that call.

    Attributes:
        cached: in a decode step, the tokens layer K held in its cache before this call; ``None``
            in a prefill.
        memo: each incoming argument's rewrite for this call (see :class:`LayerMemo`).
    """

    cached: int | None
    memo: LayerMemo = field(default_factory=LayerMemo)
    renumbered: torch.Tensor | None = None  # the renumbered position ids layer K computed in this call (renumbering)


@dataclass
class PruneContext:
    """Per-prompt state of one pruning point, armed before the forward/generate call.

    Attributes:
        keep: per sample, positions (in the sequence this layer receives) to keep, sorted (or in
            the selector's order for an ``ordered`` pruner); when ``None``, ``selector`` decides
            them at the first prefill.
        prompt_len: length of the prompt the positions refer to (``None`` until known).
        batch: batch size of that prompt.
        selector: ``(hidden (B, L, D), layer_kwargs) -> per-sample positions``, for methods whose
            choice depends on what the model computed (attention, hidden states). It runs once
            per prompt; later no-cache forwards of the same prompt reuse its choice.
    """

    keep: list[torch.Tensor] | None
    prompt_len: int | None
    batch: int
    selector: Selector | None = None
    # filled at layer K during prefill, used by later layers and by decode steps
    index: torch.Tensor | None = None  # (B, Lk) prefill positions kept, left-padded
    valid: torch.Tensor | None = None  # (B, Lk) False on padding slots; None when no sample is padded
    prefill_len: int = 0
    dropped: torch.Tensor | None = None  # (B,) prompt tokens dropped here (renumbering pruners only)
    step: ForwardStep | None = None  # the forward call in progress, set by layer K's hook at each call

    def kept_slots(self) -> torch.Tensor:
        """``(B, Lk)`` the prefill positions kept at this layer (left-padded), once the prefill reached it.

        Raises:
            RuntimeError: before the prefill reached this layer.
        """
        if self.index is None:
            raise RuntimeError("this pruning layer has not run a prefill yet: prepare the prompt and run it from the start")
        return self.index

    def current_step(self, layer: int) -> ForwardStep:
        """The forward call in progress, for pruned layer ``layer``'s hook.

        Raises:
            RuntimeError: if the pruning layer's hook has not run in any call yet.
        """
        if self.step is None:
            raise RuntimeError(f"decoder layer {layer} ran before the pruning layer in this forward call: "
                               "run the model from its first layer")
        return self.step

    def chosen(self) -> tuple[list[torch.Tensor], int]:
        """The per-sample positions to keep and the prompt length they refer to, once they are known.

        Returns:
            ``(keep, prompt_len)``: given at arm time, or decided by the selector at the first prefill.

        Raises:
            RuntimeError: while a selector has not chosen them yet.
        """
        if self.keep is None or self.prompt_len is None:
            raise RuntimeError("this pruning layer's kept positions are not chosen yet: "
                               "prepare the prompt and run it from the start")
        return self.keep, self.prompt_len

    def chooser(self) -> Selector:
        """The selector that decides the kept positions at the first prefill.

        Raises:
            RuntimeError: if the context was armed with neither positions nor a selector.
        """
        if self.selector is None:
            raise RuntimeError("this pruning layer was armed with neither keep positions nor a selector")
        return self.selector

    def dropped_tokens(self) -> torch.Tensor:
        """``(B,)`` prompt tokens a renumbering pruner dropped here, once the prefill reached it.

        Raises:
            RuntimeError: before a renumbering prefill reached this layer.
        """
        if self.dropped is None:
            raise RuntimeError("renumbered decode step without a renumbered prefill: "
                               "prepare the prompt and run it from the start")
        return self.dropped

    def kept_index(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kept positions of a prefill of ``seq_len`` tokens (the prompt plus, without a cache, generated ones).

        Returns:
            ``(index, valid)``: ``(B, Lk)`` positions, left-padded with position 0, and the
            ``(B, Lk)`` mask of real slots (``None`` if every sample keeps the same number).
        """
        keep, prompt_len = self.chosen()
        tail = torch.arange(prompt_len, seq_len, device=device)  # generated tokens, always kept
        rows = [torch.cat([k.to(device), tail]) for k in keep]
        width = max(r.numel() for r in rows)
        if all(r.numel() == width for r in rows):
            return torch.stack(rows), None
        index = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            index[b, width - r.numel():] = r
            valid[b, width - r.numel():] = True
        return index, valid


def _gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int, batch_dim: int | None = None) -> torch.Tensor:
    """``x`` gathered along its sequence axis ``dim`` with a per-sample ``(B, Lk)`` index.

    Args:
        x: a tensor with a batch axis and a sequence axis.
        index: ``(B, Lk)`` positions to take, per sample.
        dim: the sequence axis.
        batch_dim: the batch axis; by default the one just before ``dim``. A batch of 1 is
            broadcast to ``B``.
    """
    dim = dim % x.dim()
    batch_dim = dim - 1 if batch_dim is None else batch_dim % x.dim()
    batch, kept = index.shape
    shape = list(x.shape)
    if shape[batch_dim] == 1 and batch > 1:
        shape[batch_dim] = batch
        x = x.expand(shape)
    view = [1] * x.dim()
    view[batch_dim], view[dim] = batch, kept
    expand = list(x.shape)
    expand[dim] = kept
    return x.gather(dim, index.view(view).expand(expand))


def _to_mask_format(allowed: torch.Tensor, like: torch.Tensor | None, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" tensor in the format the attention implementation expects."""
    if (like is not None and like.dtype == torch.bool) or (like is None and not eager):
        return allowed
    mask_dtype = like.dtype if like is not None else dtype
    zero = torch.zeros((), dtype=mask_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(mask_dtype).min)


def _kept_padding_mask(mask: Any, index: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(B, Lk)`` padding mask of the kept slots (FlashAttention's format: nonzero on real tokens).

    Args:
        mask: the layer's ``(B, L)`` padding mask over the unpruned sequence, or ``None`` (nothing padded).
        index: ``(B, Lk)`` the kept slots' positions in that sequence.
        valid: ``(B, Lk)`` False on the slots that only pad ragged kept sets, or ``None``.

    Returns:
        The kept slots' mask (the input's dtype; int64 when built from ``valid`` alone), or
        ``None`` when no slot is padding.
    """
    if isinstance(mask, torch.Tensor):
        kept = mask.gather(1, index.to(mask.device))  # (B, Lk)
        return kept if valid is None else kept.masked_fill(~valid.to(mask.device), 0)
    return None if valid is None else valid.long()  # (B, Lk)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a 4-D mask (bool: as is; float additive: 0 means attend)."""
    return mask if mask.dtype == torch.bool else mask == 0


class InnerLLMPruner:
    """Hooks that prune the prompt at the input of decoder layer ``layer``.

    Several pruners may sit on one model at increasing layers (multi-stage methods): each one
    sees the sequence, positions and mask as the previous one left them.

    Args:
        layers: the language model's decoder layers.
        layer: K, the first pruned layer (``1 <= K < len(layers)``).
        eager: whether the model builds additive float masks (eager attention) rather than
            boolean ones; only used when a mask must be created from nothing.
        rotary: ``(hidden, position_ids (B, L)) -> (cos, sin)``, the model's rotary embedding;
            given, positions are renumbered contiguously after the drop (see the module
            docstring); ``None`` keeps the original positions.
        ordered: keep the kept slots in the order given (a selector's or ``keep``'s) instead of
            sorting them; needs ``rotary`` (positions are handed out in that order). The order may
            only permute real (unpadded) tokens among themselves: the causal mask is the one of
            the sorted slots, so each column keeps its padding status.
        layer_rotary: ``layer -> rotary``, each layer's own rotary function, for a renumbering pruner on
            a model whose layers get rotary tables of their own (per layer type); ``None``: ``rotary``
            serves layer K and a later layer with other tables is refused.
        padding_mask: the layers take a ``(B, L)`` padding mask (1 on real tokens) or none, not a
            4-D one (FlashAttention): the pruned layers then get the kept slots' ``(B, Lk)`` mask,
            built from nothing when pruning alone pads (ragged kept sets). FlashAttention unpads
            each row and is causal in the order of its real tokens, which is the kept slots' order
            (sorted, or an ordered pruner's: both keep padding in front).
    """

    def __init__(self, layers: nn.ModuleList, layer: int, eager: bool = False,
                 rotary: Rotary | None = None,
                 ordered: bool = False, padding_mask: bool = False,
                 layer_rotary: Callable[[int], Rotary] | None = None) -> None:
        if not 1 <= layer < len(layers):
            raise ValueError(f"ILP layer must be in [1, {len(layers) - 1}] for a {len(layers)}-layer model, got {layer}")
        if ordered and rotary is None:
            raise ValueError("an ordered pruner renumbers positions in its order: give it the rotary function")
        self.layers = layers
        self.layer = layer
        self.eager = eager
        self.rotary = rotary
        self.layer_rotary = layer_rotary if rotary is not None else None
        self.ordered = ordered
        self.padding_mask = padding_mask
        self.context: PruneContext | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        """Register the hooks on the decoder layers (idempotent)."""
        if self._handles:
            return
        self._handles.append(self.layers[self.layer].register_forward_pre_hook(self._enter_layer_k, with_kwargs=True))
        for i in range(self.layer + 1, len(self.layers)):
            hook = functools.partial(self._enter_later_layer, i)  # bound to its layer, for the errors it may raise
            self._handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook; the layers are exactly as before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.context = None

    def arm(self, keep: Sequence[torch.Tensor] | None = None, prompt_len: int | None = None,
            selector: Selector | None = None, batch: int | None = None) -> PruneContext:
        """Set what to keep for the next prompt.

        Args:
            keep: per sample, the positions to keep (known before the forward), with ``prompt_len``.
            selector: or a function choosing them at this layer during prefill (see
                :class:`PruneContext`), with ``batch``.
        """
        if (keep is None) == (selector is None):
            raise ValueError("arm() takes either keep positions or a selector")
        if keep is not None:
            if prompt_len is None:
                raise ValueError("keep positions need the prompt_len they refer to")
            self.context = PruneContext(keep=[self._order(k) for k in keep], prompt_len=prompt_len, batch=len(keep))
        else:
            if batch is None:
                raise ValueError("a selector needs the batch size")
            self.context = PruneContext(keep=None, prompt_len=None, batch=batch, selector=selector)
        return self.context

    def prefilled(self) -> PruneContext:
        """The armed context, for code that runs once the prefill passed this layer.

        Raises:
            RuntimeError: if nothing was armed (no prompt prepared).
        """
        if self.context is None:
            raise RuntimeError("no prompt was prepared for this pruning layer: call handle.prepare(inputs) first")
        return self.context

    def _order(self, keep: torch.Tensor) -> torch.Tensor:
        """Kept positions as they go on: sorted, or as given for an ordered pruner."""
        return keep if self.ordered else keep.sort().values

    def _causal_index(self, ctx: PruneContext) -> torch.Tensor:
        """``(B, Lk)`` the slots the causal mask and renumbering are built from: sorted, so column order is causal order.

        For an unordered pruner this is ``ctx.index`` itself (already sorted). For an ordered one
        the j-th column stands for the j-th smallest kept slot: the columns are the same set of
        tokens, causality follows the new column order, and padding columns stay padding (only
        real tokens are permuted, left padding stays in front).
        """
        index = ctx.kept_slots()  # (B, Lk)
        return index.sort(dim=1).values if self.ordered else index

    # -- hooks ---------------------------------------------------------------------------------

    def _enter_layer_k(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Layer K: start this call's memo, prune the hidden states (prefill), rewrite this layer's arguments."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError("CROP ILP is applied but no prompt was prepared: call handle.prepare(inputs, boxes) "
                               "and run the model on what it returns")
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, L, D)
        cache = layer_cache(kwargs)
        prefill = cache is None or cache.get_seq_length(self.layer) == 0
        ctx.step = ForwardStep(cached=None if prefill else cache.get_seq_length(self.layer))
        if prefill:
            hidden = self._prefill(ctx, hidden, kwargs)  # (B, Lk, D)
        elif self.rotary is not None:
            done = ctx.step.memo.put("renumbered", self._rotary_inputs(self.layer, kwargs),
                                     self._renumbered_decode(ctx, hidden, kwargs, self._rotary_of(self.layer)))
            ctx.step.renumbered = done["position_ids"]  # (B, q)
        kwargs.update(self._layer_update(ctx, self.layer, hidden, kwargs))
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _enter_later_layer(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A layer after K (``layer``, bound at attach): its own arguments rewritten for the slots layer K kept."""
        ctx = self.context
        if ctx is not None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, Lk, D) in a prefill, (B, q, D) in a decode step
            kwargs.update(self._layer_update(ctx, layer, hidden, kwargs))
        return args, kwargs

    # -- per-layer arguments -------------------------------------------------------------------

    def _layer_update(self, ctx: PruneContext, layer: int, hidden: torch.Tensor, kwargs: dict) -> dict[str, Any]:
        """Pruned layer ``layer``'s own mask and rotary inputs, rewritten for the kept slots.

        Each incoming object is rewritten once per forward call (see :class:`LayerMemo`): layers
        that get the same mask or tables as an earlier pruned layer get the same rewrite.
        """
        step = ctx.current_step(layer)
        mask = self._checked_mask(layer, kwargs.get("attention_mask"))
        update: dict[str, Any] = {"attention_mask": step.memo.memoized(
            "mask", (mask,), lambda: self._layer_mask(ctx, step, layer, mask, hidden))}
        update.update(self._layer_positions(ctx, step, layer, hidden, kwargs))
        return update

    def _layer_mask(self, ctx: PruneContext, step: ForwardStep, layer: int, mask: Any, hidden: torch.Tensor) -> Any:
        """One incoming mask pruned to the kept slots (prefill) or to the kept keys (decode step)."""
        if step.cached is None:
            return self._prefill_mask(ctx, mask, hidden.dtype)
        return self._decode_mask(ctx, mask, hidden, step.cached, layer)

    def _layer_positions(self, ctx: PruneContext, step: ForwardStep, layer: int, hidden: torch.Tensor,
                         kwargs: dict) -> dict[str, Any]:
        """Layer ``layer``'s cos/sin tables and position ids for the kept slots.

        Original positions: in a prefill the layer's own tables and ids are gathered at the kept
        slots; decode steps need nothing (generated tokens keep their positions). Renumbered
        positions: the set computed at layer K, which only fits layers given layer K's inputs.
        """
        if self.rotary is not None:
            return self._renumbered_for(step, layer, hidden, kwargs)
        if step.cached is not None:
            return {}
        index = ctx.kept_slots()  # (B, Lk)
        cos, sin, pos = self._rotary_inputs(layer, kwargs)  # (B|1, L, d) each; position ids or None
        update: dict[str, Any] = {"position_embeddings": step.memo.memoized(
            "rotary", (cos, sin), lambda: (_gather_seq(cos, index, -2), _gather_seq(sin, index, -2)))}  # (B, Lk, d) each
        if isinstance(pos, torch.Tensor):
            update["position_ids"] = step.memo.memoized(
                "positions", (pos,), lambda: _gather_seq(pos, index, -1))  # (..., B, Lk)
        return update

    def _rotary_of(self, layer: int) -> Rotary:
        """The rotary function that serves ``layer`` (its own with ``layer_rotary``, else the one ``rotary``)."""
        if self.layer_rotary is not None:
            return self.layer_rotary(layer)
        if self.rotary is None:
            raise RuntimeError("this pruner keeps the original positions: it has no rotary function")
        return self.rotary

    def _renumbered_for(self, step: ForwardStep, layer: int, hidden: torch.Tensor, kwargs: dict) -> dict[str, Any]:
        """The renumbered positions and cos/sin layer K computed, for a layer given the same rotary inputs.

        A layer given other rotary inputs (its own tables) gets the same renumbered positions
        through its own rotary function when the pruner has ``layer_rotary``, once per distinct
        set of inputs in the call.

        Raises:
            RuntimeError: if the layer's rotary inputs are other objects than layer K's (rotary
                tables per layer type): one recomputation with the model's rotary function cannot
                serve both.
        """
        inputs = self._rotary_inputs(layer, kwargs)
        found = step.memo.get("renumbered", inputs)
        if found is None and self.layer_rotary is not None and step.renumbered is not None:
            pos = step.renumbered  # (B, L') this call's renumbered positions, from layer K
            found = step.memo.put("renumbered", inputs,
                                  {"position_ids": pos, "position_embeddings": self._rotary_of(layer)(hidden, pos)})
        if found is None:
            raise RuntimeError(f"decoder layer {layer} gets other rotary inputs (position_embeddings, position_ids) than "
                               f"the pruning layer {self.layer}: a renumbering pruner recomputes them with the model's one "
                               "rotary function, so it cannot serve layers with their own rotary tables (e.g. per layer type)")
        return found

    @staticmethod
    def _rotary_inputs(layer: int, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Layer ``layer``'s incoming ``(cos, sin, position_ids)``.

        Raises:
            RuntimeError: if the layer gets no ``(cos, sin)`` position_embeddings (the pruner moves or
                replaces the tables the model hands each layer; it cannot serve a layer without them).
        """
        tables = kwargs.get("position_embeddings")
        if not (isinstance(tables, (tuple, list)) and len(tables) == 2
                and all(isinstance(t, torch.Tensor) for t in tables)):
            raise RuntimeError(f"decoder layer {layer} got no (cos, sin) position_embeddings (got "
                               f"{type(tables).__name__}): the pruner rewrites the rotary tables the model hands each "
                               "pruned layer, so it cannot serve this one")
        return tables[0], tables[1], kwargs.get("position_ids")

    def _checked_mask(self, layer: int, mask: Any) -> Any:
        """Layer ``layer``'s incoming mask, if it is a kind the pruner can prune.

        Raises:
            RuntimeError: for anything but ``None``, a ``(B, L)`` padding mask or (outside
                FlashAttention) a ``(B, 1, q, L)`` mask.
        """
        if mask is None or (isinstance(mask, torch.Tensor) and (mask.dim() == 2 or (mask.dim() == 4
                                                                                    and not self.padding_mask))):
            return mask
        kind = f"a {mask.dim()}-D tensor" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        handled = ("None or a (B, L) padding mask (FlashAttention)" if self.padding_mask
                   else "None, a (B, L) padding mask or a (B, 1, q, L) mask")
        raise RuntimeError(f"decoder layer {layer} got an attention mask the pruner cannot prune ({kind}); "
                           f"it handles {handled}")

    # -- prefill / decode ----------------------------------------------------------------------

    def _prefill(self, ctx: PruneContext, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Choose the kept slots of this prompt (layer K, prefill) and return the hidden states at them.

        A renumbering pruner also computes the kept slots' new positions and cos/sin here, once,
        for every pruned layer given layer K's rotary inputs.
        """
        batch, seq_len, _ = hidden.shape
        if ctx.keep is None:  # chosen here, from what the model computed
            if batch != ctx.batch:
                raise RuntimeError(f"the model got a batch of {batch} but pruning was prepared for {ctx.batch}")
            ctx.prompt_len = seq_len
            ctx.keep = [self._order(k.to(hidden.device)) for k in ctx.chooser()(hidden, kwargs)]
        _, prompt_len = ctx.chosen()
        if batch != ctx.batch or seq_len < prompt_len:
            raise RuntimeError(f"the model got a prompt of shape ({batch}, {seq_len}) but ILP was prepared for "
                               f"({ctx.batch}, {prompt_len}); prepare each prompt before running it")
        index, valid = ctx.kept_index(seq_len, hidden.device)  # (B, Lk)
        ctx.index, ctx.valid, ctx.prefill_len = index, valid, seq_len
        if self.rotary is not None:
            step = ctx.current_step(self.layer)
            done = step.memo.put("renumbered", self._rotary_inputs(self.layer, kwargs),
                                 self._renumbered_prefill(ctx, hidden, kwargs.get("position_ids"),
                                                          self._rotary_of(self.layer)))
            step.renumbered = done["position_ids"]  # (B, Lk)
        return _gather_seq(hidden, index, 1)  # (B, Lk, D)

    def _renumbered_prefill(self, ctx: PruneContext, hidden: torch.Tensor, pos: Any, rotary: Rotary) -> dict[str, Any]:
        """Positions 0..L'-1 (per sample, shifted as the input's were) for the kept slots, and their cos/sin."""
        index, valid = self._causal_index(ctx), ctx.valid  # (B, Lk) (ordered: the j-th column gets the j-th position)
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
            raise RuntimeError("renumbering positions needs 1-D position_ids (B, L) at the pruned layer; "
                               "M-RoPE models keep their original positions")
        pos = pos.expand(index.shape[0], -1)  # (B, L)
        real = torch.ones_like(index, dtype=torch.bool) if valid is None else valid  # (B, Lk)
        rank = real.long().cumsum(1) - 1  # (B, Lk) index among the real kept slots
        first = index.masked_fill(~real, index.shape[1] + pos.shape[1]).min(1, keepdim=True).values  # (B, 1)
        dropped_before = index - first - rank  # (B, Lk) slots dropped between the first kept slot and this one
        new_pos = (_gather_seq(pos, index, 1) - dropped_before).masked_fill(~real, 0)  # (B, Lk)
        ctx.dropped = (pos.shape[1] - first[:, 0]) - real.sum(1)  # (B,) dropped over the whole prompt
        cos, sin = rotary(hidden, new_pos)
        return {"position_ids": new_pos, "position_embeddings": (cos, sin)}

    def _renumbered_decode(self, ctx: PruneContext, hidden: torch.Tensor, kwargs: dict, rotary: Rotary) -> dict[str, Any]:
        """A generated token's position lowered by what this stage dropped, and its cos/sin."""
        pos = kwargs.get("position_ids")
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
            raise RuntimeError("renumbering positions needs 1-D position_ids (B, q) in decode steps")
        new_pos = pos.expand(hidden.shape[0], -1) - ctx.dropped_tokens().to(pos.device)[:, None]  # (B, q)
        cos, sin = rotary(hidden, new_pos)
        return {"position_ids": new_pos, "position_embeddings": (cos, sin)}

    def _prefill_mask(self, ctx: PruneContext, mask: Any, dtype: torch.dtype) -> Any:
        """One incoming prefill mask (``(B, 1, L, L)``, ``(B, L)`` or ``None``) pruned to the kept slots."""
        if self.padding_mask or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return _kept_padding_mask(mask, ctx.kept_slots(), ctx.valid)
        index, valid = self._causal_index(ctx), ctx.valid  # (B, Lk)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            if valid is None:
                return mask  # SDPA's implicit causal mask stays valid: causal in the (kept) slot order
            allowed = index[:, None, None, :] <= index[:, None, :, None]  # (B, 1, Lk, Lk) causal in old positions
            mask = None
        else:
            rows = _gather_seq(mask, index, 2, batch_dim=0)  # (B, 1, Lk, L)
            gathered = _gather_seq(rows, index, 3, batch_dim=0)  # (B, 1, Lk, Lk)
            if valid is None:
                return gathered
            allowed = _allowed(gathered)
        allowed = allowed & valid[:, None, None, :]
        eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
        allowed = allowed | (eye & ~valid[:, None, :, None])  # padding rows attend to themselves (no NaN)
        return _to_mask_format(allowed, mask, self.eager, dtype)

    def _decode_mask(self, ctx: PruneContext, mask: Any, hidden: torch.Tensor, cached: int, layer: int) -> Any:
        """One incoming decode-step mask over the whole sequence, pruned to the keys a pruned layer holds.

        Args:
            mask: the layer's mask: ``(B, 1, q, L + new)``, ``(B, L + new)`` or ``None``.
            hidden: ``(B, q, D)`` this step's hidden states.
            cached: tokens layer K held in its cache before this step.
            layer: the layer the mask is for (named in errors).
        """
        if ctx.index is None:
            raise RuntimeError("ILP decode step without a pruned prefill; prepare the prompt and run it from the start")
        batch, q_len, _ = hidden.shape
        kept = ctx.index.shape[1]
        new = cached + q_len - kept  # generated tokens at layer K, including this step's
        if self.padding_mask or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            tail = torch.arange(ctx.prefill_len, ctx.prefill_len + new, device=ctx.index.device)
            keys = torch.cat([ctx.index, tail.expand(batch, new)], dim=1)  # (B, Lk + new) prefill positions
            valid = None if ctx.valid is None else torch.cat(
                [ctx.valid, torch.ones(batch, new, dtype=torch.bool, device=ctx.valid.device)], dim=1)  # (B, Lk + new)
            if isinstance(mask, torch.Tensor):
                self._check_decode_keys(ctx, mask, new, layer)
            return _kept_padding_mask(mask, keys, valid)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            self._check_decode_keys(ctx, mask, new, layer)
            tail = torch.arange(ctx.prefill_len, ctx.prefill_len + new, device=mask.device)
            keys = torch.cat([ctx.index, tail.expand(ctx.index.shape[0], new)], dim=1)  # (B, Lk + new)
            gathered = _gather_seq(mask, keys, 3, batch_dim=0)  # (B, 1, q, Lk + new)
            if ctx.valid is None:
                return gathered
            allowed = _allowed(gathered)
        elif ctx.valid is None:
            return mask
        else:
            allowed = torch.ones(batch, 1, q_len, kept + new, dtype=torch.bool, device=hidden.device)
            q = torch.arange(q_len, device=hidden.device)[:, None]
            k = torch.arange(new, device=hidden.device)[None, :]
            allowed[..., kept:] = k <= (new - q_len) + q  # causal among generated tokens
        if ctx.valid is not None:
            allowed = allowed.clone()
            allowed[..., :kept] &= ctx.valid[:, None, None, :]
        return _to_mask_format(allowed, mask if isinstance(mask, torch.Tensor) else None, self.eager, hidden.dtype)

    @staticmethod
    def _check_decode_keys(ctx: PruneContext, mask: torch.Tensor, new: int, layer: int) -> None:
        """Refuse a decode-step mask whose keys are not the whole sequence (the only layout the pruner can map).

        transformers sizes each kind of decode mask on the cache of the first layer of that kind.
        The pruner maps a mask over every token of the sequence onto the keys it kept; it cannot map
        one sized on a cache that holds other tokens.

        Raises:
            RuntimeError: e.g. for a sliding-window layer once the sequence outgrows the window (its
                mask covers only the last tokens), or when the first layer of a kind is itself
                pruned (its mask is sized on the pruned cache).
        """
        expected = ctx.prefill_len + new
        if mask.shape[-1] != expected:
            raise RuntimeError(f"decoder layer {layer} got a decode-step mask over {mask.shape[-1]} keys where the pruner "
                               f"expects the whole sequence ({ctx.prefill_len} prefill + {new} generated = {expected}): "
                               "the mask was sized on a cache holding other tokens (a sliding window's last tokens, or a "
                               "pruned layer's), which the pruner cannot map onto the kept ones")
