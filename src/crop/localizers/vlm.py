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
from typing import Any, Protocol, cast

import torch
from PIL import Image
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from crop.localizers.base import Localization
from crop.localizers.prompt import localizer_messages
from crop.regions import GridBox, parse_grid_box

logger = logging.getLogger(__name__)


class GenerativeModel(Protocol):
    """What :class:`VLMLocalizer` calls on its model: Hugging Face's ``generate`` (prompt + new token ids out)."""

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Decode after the prompt; ``(B, L + T)`` token ids."""
        ...


class VLMLocalizer:
    """Localize with a generative VLM.

    Args:
        model: an image-text-to-text model (``generate`` with pixel inputs).
        processor: its processor, with a chat template.
        grid: the grid side of the boxes this localizer returns (the caller's).
        answer_grid: the grid side the model was trained to answer on (the paper's, and the
            embedded localizer's, 8); its box is parsed on that grid, then mapped to ``grid``
            (:meth:`crop.regions.GridBox.on_grid`), so asking for another grid never misreads it.
        max_new_tokens: decode budget for the box text (``"[7, 7, 7, 7]"`` is 12 byte tokens).
        batch_size: images per localizer ``generate`` call; ``None`` (default): the caller's
            batch, in one call (the caller already sized it for its device: a cap of 8 made a
            batch of 64 on an H200 eight launch-bound calls, 49% of CROP's end-to-end time).
        image_first: prompt layout, as the model was trained (see
            :func:`crop.localizers.prompt.localizer_messages`).
        stop_at_box_end: stop decoding a row as soon as it emits a token containing ``"]"``,
            the end of the box; this saves the end-of-sequence step (one of the embedded
            localizer's three decode steps; two of a real Qwen2-VL's thirteen).
    """

    name = "vlm"

    def __init__(self, model: nn.Module, processor, grid: int = 8, max_new_tokens: int = 16, batch_size: int | None = None,
                 image_first: bool = True, stop_at_box_end: bool = True, answer_grid: int = 8):
        self.model = model
        self.answer_grid = answer_grid
        self.image_first = image_first
        self.processor = processor
        self.grid = grid
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop_at_box_end = stop_at_box_end
        self._box_end_ids: torch.Tensor | None = None

    def _stopping_criteria(self) -> StoppingCriteriaList | None:
        if not self.stop_at_box_end:
            return None
        if self._box_end_ids is None:
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            vocab = tokenizer.get_vocab()  # token text -> id; "]" is itself in byte-level and sentencepiece vocabularies
            self._box_end_ids = torch.tensor(sorted(i for t, i in vocab.items() if "]" in t), dtype=torch.long)
        return StoppingCriteriaList([_LastTokenIn(self._box_end_ids)])

    @torch.no_grad()
    def generate(self, inputs) -> torch.Tensor:
        """Greedy-decode the box for processed ``inputs``; returns the new tokens ``(B, T)``."""
        model = cast(GenerativeModel, self.model)  # nn.Module does not declare generate; HF models have it
        out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                             stopping_criteria=self._stopping_criteria())
        return out[:, inputs["input_ids"].shape[1]:]  # (B, T)

    def messages(self, question: str) -> list[dict]:
        """The chat messages asking for ``question``'s region (the prompt the localizer was trained with)."""
        return localizer_messages(question, self.answer_grid, self.image_first)

    def prepare(self, images: Sequence[Image.Image], questions: Sequence[str]):
        """Processor inputs for the localization prompts of ``questions`` (:meth:`messages`), left-padded."""
        texts = [self.processor.apply_chat_template(self.messages(q), add_generation_prompt=True) for q in questions]
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
        step = self.batch_size or max(len(images), 1)
        for start in range(0, len(images), step):
            chunk_images = images[start:start + step]
            chunk_questions = questions[start:start + step]
            new_tokens = self.generate(self.prepare(chunk_images, chunk_questions))  # (B, T)
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            results.extend(self._parse(text) for text in texts)
        return results

    def _parse(self, text: str) -> Localization:
        try:
            box = parse_grid_box(text, self.answer_grid)
            return Localization(box.on_grid(self.grid), fallback=False, raw=text)
        except ValueError as exc:
            logger.warning("localizer output unusable (%s); using the full image", exc)
            return Localization(GridBox.full(self.grid), fallback=True, raw=text)


class _LastTokenIn(StoppingCriteria):
    """Done for each row whose last token is one of ``ids``."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # (K,)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))  # (B,)
