"""Reaching inside a transformers VLM during a training step: its LLM decoder layers and submodule outputs.

The auxiliary losses of the recipes (:mod:`crop.train.probes`) read features that the model
computes but does not return: the projector's or merger's output (the visual tokens) and the
hidden state after one LLM decoder layer. :class:`Capture` keeps such an output with an
instance-level forward hook, so the model's own forward runs unchanged; :func:`llm_layer`
finds the decoder layer to hook. :func:`transformers_model` is the one check that a model is
a transformers model before its config and submodules are read by attribute.

(Attention probabilities are captured differently, inside the attention implementation: see
:mod:`crop.train.attention_supervision`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """``model`` as a transformers model, whose ``config`` and submodules the recipes read by name.

    Raises:
        TypeError: if ``model`` is not a ``transformers.PreTrainedModel``.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    return model


def llm_layer_index(model: nn.Module, index: int) -> int:
    """``index`` clamped to the LLM's depth (tiny test models are shallower than the recipes assume)."""
    return min(index, len(transformers_model(model).model.language_model.layers) - 1)


def llm_layer(model: nn.Module, index: int) -> nn.Module:
    """LLM decoder layer ``index``, clamped to the model's depth (see :func:`llm_layer_index`)."""
    return transformers_model(model).model.language_model.layers[llm_layer_index(model, index)]


class Capture:
    """Keeps the output of one module during a forward pass (an instance-level hook).

    Args:
        module: the module whose output to keep.
        select: maps the raw output to the tensor to keep (default: the output itself, or
            its first element when it is a tuple).
    """

    def __init__(self, module: nn.Module, select: Callable[[Any], torch.Tensor] | None = None):
        self.value: torch.Tensor | None = None
        self._select = select or (lambda out: out[0] if isinstance(out, tuple) else out)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = self._select(output)

    def pop(self) -> torch.Tensor:
        """The captured tensor (cleared after reading)."""
        if self.value is None:
            raise RuntimeError("nothing captured: the hooked module did not run")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        """Remove the hook."""
        self._handle.remove()
