"""Qwen3-VL's DeepStack under inner-LLM pruning: the features follow the visual tokens that remain.

Qwen3-VL adds vision-encoder features to the language model's hidden states at the visual
positions after each of its first decoder layers (``deepstack_visual_embeds[i]`` after layer
``i``; three levels in the released models, so after layers 0-2). The text model does it in
its own layer loop with the *prompt's* visual mask, so a pruner that shortens the sequence at
the input of a layer ``K`` inside that range (ILP at ``K <= 2``, the default included) would
make it index a shorter sequence with the full mask.

:class:`DeepStackRelay` takes the addition over while a pruning method is attached, with
instance-level hooks only:

- a forward pre-hook on the text model keeps ``visual_pos_masks`` / ``deepstack_visual_embeds``
  of the call and passes ``None`` on, so the model adds nothing itself;
- a forward hook on each of the first decoder layers adds that level's features to its output,
  at the slots that still hold visual tokens: which prompt position each slot holds comes from
  the pruning method (``slot_origin``), so a kept token gets exactly its own features and a
  dropped one none, at any K (before, inside or after the DeepStack layers).

With nothing pruned the additions are the ones the model makes, in the same order and with the
same operations, so keep-all stays bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crop.models.base import SlotOrigin


@dataclass
class _Prompt:
    """The DeepStack inputs of one prefill.

    Attributes:
        row_of_position: ``(B, P)`` per prompt position, its row in the features (visual tokens
            in batch-major prompt order, as the model packs them), -1 for non-visual positions.
        levels: per level, ``(N, D)`` the features of the ``N`` visual tokens of the batch.
    """

    row_of_position: torch.Tensor
    levels: list[torch.Tensor]


class DeepStackRelay:
    """Adds Qwen3-VL's DeepStack features after the first decoder layers itself, at the visual tokens still present.

    Args:
        text_model: the ``Qwen3VLTextModel`` (``model.model.language_model``).
        layers: its decoder layers.
        levels: how many DeepStack levels the model adds (after layers ``0 .. levels - 1``).
        slot_origin: the pruning method's map from the slots leaving a layer to prompt positions.
    """

    def __init__(self, text_model: nn.Module, layers: nn.ModuleList, levels: int, slot_origin: SlotOrigin) -> None:
        self.text_model = text_model
        self.layers = layers
        self.levels = levels
        self.slot_origin = slot_origin
        self.prompt: _Prompt | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        """Register the hooks (idempotent): the text-model pre-hook and one hook on each of the first ``levels`` layers."""
        if self._handles:
            return
        self._handles.append(self.text_model.register_forward_pre_hook(self._take_inputs, with_kwargs=True))
        for index, layer in enumerate(self.layers[:self.levels]):
            self._handles.append(layer.register_forward_hook(self._adder(index)))

    def detach(self) -> None:
        """Remove every hook and drop the features kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.prompt = None

    def _take_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("visual_pos_masks")  # (B, P) bool, True on visual tokens
        levels = kwargs.get("deepstack_visual_embeds")  # per level (N, D)
        if mask is None or not levels:
            self.prompt = None  # a decode step or a prompt without images: nothing to add
            return args, kwargs
        flat = mask.reshape(-1)  # (B*P,)
        rows = (flat.long().cumsum(0) - 1).masked_fill(~flat, -1)  # (B*P,) row of each visual position
        self.prompt = _Prompt(rows.view(mask.shape), list(levels))
        kwargs["deepstack_visual_embeds"] = None
        return args, kwargs

    def _adder(self, index: int):
        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            prompt = self.prompt
            if prompt is None or index >= len(prompt.levels):
                return None
            hidden = output  # (B, L, D) the layer's output
            origin = self.slot_origin(index, hidden).to(prompt.row_of_position.device)  # (B, L) prompt positions
            rows = prompt.row_of_position.gather(1, origin.clamp(min=0)).masked_fill(origin < 0, -1)  # (B, L)
            rows = rows.to(hidden.device)
            visual = rows >= 0  # (B, L)
            features = prompt.levels[index].to(hidden.device, hidden.dtype)  # (N, D)
            hidden = hidden.clone()
            hidden[visual, :] = hidden[visual, :] + features[rows[visual]]  # as the model's own addition
            return hidden

        return add
