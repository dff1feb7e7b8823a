"""The generative localizer: a small VLM prompted to answer with the grid box as text.

This is the CROP paper's localizer recipe (Qwen2-VL-2B fine-tuned to emit ``[x0, y0, x1, y1]``
on an 8x8 grid). Any image+text -> text model with a chat-template processor works: the
embedded toy localizer and a real fine-tuned checkpoint go through this same code. Decoding
is greedy; unparsable or invalid output falls back to the full image, is flagged in the
result, and logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from crop.localizers.base import Localization
from crop.localizers.prompt import localizer_messages
from crop.regions import GridBox, parse_grid_box

logger = logging.getLogger(__name__)


class VLMLocalizer:
    """Localize with a generative VLM.

    Args:
        model: an image-text-to-text model (``generate`` with pixel inputs).
        processor: its processor, with a chat template.
        grid: the grid side the model was trained to answer on.
        max_new_tokens: decode budget for the box text (``"[7, 7, 7, 7]"`` is 12 byte tokens).
        batch_size: images per localizer ``generate`` call.
        image_first: prompt layout, as the model was trained (see
            :func:`crop.localizers.prompt.localizer_messages`).
    """

    name = "vlm"

    def __init__(self, model: nn.Module, processor, grid: int = 8, max_new_tokens: int = 16, batch_size: int = 8,
                 image_first: bool = True):
        self.model = model
        self.image_first = image_first
        self.processor = processor
        self.grid = grid
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def _inputs(self, images: Sequence[Image.Image], questions: Sequence[str]):
        texts = [self.processor.apply_chat_template(localizer_messages(q, self.grid, self.image_first),
                                                    add_generation_prompt=True) for q in questions]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
        try:
            return self.processor(images=list(images), text=texts, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = side

    @torch.no_grad()
    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[Localization]:
        """Greedy-decode a box for each pair; fall back to the full image on bad output."""
        results: list[Localization] = []
        for start in range(0, len(images), self.batch_size):
            chunk_images = images[start:start + self.batch_size]
            chunk_questions = questions[start:start + self.batch_size]
            inputs = self._inputs(chunk_images, chunk_questions)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (B, T)
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            results.extend(self._parse(text) for text in texts)
        return results

    def _parse(self, text: str) -> Localization:
        try:
            return Localization(parse_grid_box(text, self.grid), fallback=False, raw=text)
        except ValueError as exc:
            logger.warning("localizer output unusable (%s); using the full image", exc)
            return Localization(GridBox.full(self.grid), fallback=True, raw=text)
