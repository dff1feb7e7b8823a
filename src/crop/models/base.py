"""What CROP needs to know about a VLM, behind one interface: the adapter.

Methods never reach into a model's submodules; they ask its adapter for the decoder layers,
where each image's visual tokens sit in the prompt, how a region maps onto them, how to
encode images, and how to rebuild inputs after compression. One adapter per HF ``model_type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crop.ops.selection import select_tokens
from crop.regions import GridBox
from crop.registry import Registry


@dataclass(frozen=True)
class ImageSpan:
    """One image's visual tokens inside a tokenized batch.

    Attributes:
        sample: batch row holding the image.
        start: prompt position of its first visual token.
        length: number of visual tokens (placeholders) in the prompt.
        rows, cols: the token grid the box is mapped onto (``rows * cols == length``).
    """

    sample: int
    start: int
    length: int
    rows: int
    cols: int


@dataclass
class CompressedImage:
    """One image after pre-LLM compression.

    Attributes:
        tokens: ``(M, D)`` features that reach the LLM.
        source: ``(M,)`` for each of them, the row-major index of its first source token.
    """

    tokens: torch.Tensor
    source: torch.Tensor


class VLMAdapter(ABC):
    """Model knowledge for one architecture family; instantiate with the model it serves.

    Args:
        model: a ``*ForConditionalGeneration`` instance of a supported ``model_type``.
    """

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def uses_eager_attention(self) -> bool:
        """Whether the LM builds additive float masks (eager) rather than boolean ones (SDPA)."""
        return getattr(self.text_config, "_attn_implementation", None) == "eager"

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, in order."""

    @abstractmethod
    def image_spans(self, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's visual-token span in the batch, in the order the images were given."""

    def select(self, span: ImageSpan, box: GridBox, budget: int | None) -> torch.Tensor:
        """Indices (within the span) of the visual tokens to keep for ``box`` under ``budget``."""
        return select_tokens(box, span.rows, span.cols, budget)

    @abstractmethod
    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Run the vision tower (+ projector): one ``(length, D)`` tensor per image."""

    @abstractmethod
    def compressed_inputs(self, inputs: Mapping[str, Any], spans: list[ImageSpan],
                          images: list[CompressedImage]) -> dict[str, Any]:
        """Model inputs (for ``forward`` or ``generate``) that feed ``images`` instead of the originals."""

    def pad_token_id(self) -> int:
        """The id used to left-pad rebuilt prompts (masked out, so any valid id works)."""
        for cfg in (self.config, self.text_config):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0


ADAPTERS: Registry[type[VLMAdapter]] = Registry("model type")


def get_adapter(model: nn.Module) -> VLMAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises:
        ValueError: for an unsupported model type, listing the supported ones.
    """
    import crop.models.llava  # noqa: F401  (registers adapters)

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); supported: {', '.join(ADAPTERS.names())}"
        )
    return ADAPTERS.get(model_type)(model)
