"""localize -> prune -> generate, with token accounting and timings (localizer always included)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from crop.api import PruningHandle, check_config
from crop.config import CropILPConfig
from crop.errors import CropInputError
from crop.hf_compat import generated_cache
from crop.io import check_question, load_image
from crop.localizers.base import Localization, Localizer
from crop.methods import InnerLLMMethod
from crop.methods.self_region import for_self_localizer
from crop.models import get_adapter
from crop.models.loading import processor_for
from crop.regions import GridBox
from crop.timing import clock

logger = logging.getLogger(__name__)


@dataclass
class CropResult:
    """The answer to one question and what it cost.

    Attributes:
        answer: the generated text.
        box: the localizer's region on the image, ``[x0, y0, x1, y1]`` on the grid. If the
            model sees a padded or cropped view (LLaVA-1.5 centre-crops non-square images), the
            box used on that view is ``extra["model_view_box"]``. With CROP-self (the answerer
            found the region in its own attention, ``extra["self_localized"]``), it is the box
            found, on the model's view (also in ``extra["model_view_box"]``).
        grid: the grid side.
        method, layer, keep_tokens: the settings used (``layer``: the pruning layer of a
            single-stage inner-LLM method, else ``None``).
        visual_tokens_in: visual tokens the vision tower produced for the image.
        visual_tokens_kept: per stage (``llm_input``, ``after_layer_K``), visual tokens kept.
        kv_cache_lengths: per decoder layer, cached positions after prefill.
        kv_cache_bytes: bytes of keys + values in the cache after prefill (read off the cache;
            for a batch, the batch's total divided by its size).
        timings: ``localizer_s`` (this question's share of the localizer batch), ``prefill_s``
            (inputs to first token: encoding, compression, LLM prefill), ``decode_s``, ``total_s``.
        localizer_fallback: True if the localizer's output was unusable (full image used).
        localizer_output: the localizer's raw text, if any.
        token_grid: ``[rows, cols]`` of the image's visual-token grid.
        full_resolution_tokens: row-major indices of the tokens kept at full resolution (left out
            of :meth:`to_dict`; used to draw overlays).
    """

    answer: str
    box: list[int]
    grid: int
    method: str
    layer: int | None
    keep_tokens: int | None
    visual_tokens_in: int
    visual_tokens_kept: dict[str, int]
    kv_cache_lengths: list[int]
    kv_cache_bytes: int
    timings: dict[str, float]
    localizer_fallback: bool = False
    localizer_output: str | None = None
    token_grid: list[int] = field(default_factory=list)
    full_resolution_tokens: list[int] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without the per-token index list)."""
        out = asdict(self)
        del out["full_resolution_tokens"]
        return out


def chat_prompt(processor, question: str) -> str:
    """The chat-formatted prompt for one image followed by ``question``, ready for generation."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class FirstTokenClock(LogitsProcessor):
    """Notes the time the first token's scores are ready (the end of prefill); changes nothing.

    It waits for the device's queued kernels first (:func:`crop.models.loading.synchronize`; a
    no-op on the CPU), so on a GPU the reading marks the end of the prefill's work, not of its launch.
    """

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            self.first = clock()
        return scores


def cache_after_prefill(out: Any, decode_steps: int) -> tuple[list[int], int]:
    """Per-layer lengths and total bytes of a ``generate`` output's cache as it was right after prefill.

    ``generate`` feeds every generated token but the last back through the model, so each
    layer grew by ``decode_steps = new_tokens - 1`` positions after prefill.
    """
    cache = generated_cache(out)
    lengths, total = [], 0
    for layer in cache.layers:
        keys, values = layer.keys, layer.values  # (B, H, L, d) each
        length = keys.shape[-2] - decode_steps
        lengths.append(int(length))
        total += keys[..., :length, :].numel() * keys.element_size()
        total += values[..., :length, :].numel() * values.element_size()
    return lengths, total


class CropPipeline:
    """Answer visual questions with CROP on one model.

    Args:
        model: the answering VLM (any supported ``*ForConditionalGeneration``).
        processor: its processor (with a chat template).
        localizer: finds the region for each question (its cost is part of every timing).
        config: the pruning configuration (any method config; default
            :class:`crop.config.CropILPConfig`); :class:`crop.config.NoPruningConfig` runs the
            unpruned model.
    """

    def __init__(self, model: nn.Module, processor, localizer: Localizer, config: Any = None) -> None:
        self.model: Any = model  # a *ForConditionalGeneration: an nn.Module with transformers' generate()
        self.processor = processor_for(model, processor)  # inputs go where the model reads them, in its dtype
        self.localizer = localizer
        self.config = config or CropILPConfig()
        if getattr(localizer, "in_model", False):  # the answerer finds the region itself (CROP-self)
            self.config = for_self_localizer(self.config, getattr(localizer, "choices", None))
        self.adapter = get_adapter(model)
        grid = getattr(self.config, "grid", localizer.grid)  # region-free configs carry no grid
        if localizer.grid != grid:
            raise ValueError(f"localizer answers on a {localizer.grid}x{localizer.grid} grid but the config says {grid}")
        check_config(model, self.config, self.adapter)  # once, up front (e.g. ILP's layer within the depth)

    def _view_box(self, box: GridBox, image_size: tuple[int, int]) -> GridBox:
        """The localizer's box mapped onto the view the model sees; the full view if it fell outside."""
        view = self.adapter.view_box(box, image_size, getattr(self.processor, "image_processor", None))
        if view is None:
            logger.warning("region %s lies outside the part of the %dx%d image the model sees; using all of it",
                           box, *image_size)
            return GridBox.full(box.grid)
        return view

    def prompt(self, question: str) -> str:
        """The chat-formatted prompt for one image + question."""
        return chat_prompt(self.processor, question)

    def __call__(self, image: str | Image.Image, question: str, max_new_tokens: int = 16) -> CropResult:
        """Answer one question about one image (a path or a PIL image)."""
        return self.answer_batch([image], [question], max_new_tokens)[0]

    @torch.no_grad()
    def answer_batch(self, images: Sequence[str | Image.Image], questions: Sequence[str],
                     max_new_tokens: int = 16, localizations: Sequence[Localization] | None = None,
                     localizer_s: float | None = None) -> list[CropResult]:
        """Answer a batch of (image, question) pairs in one localizer call and one generate call.

        Args:
            images: paths or PIL images.
            questions: one per image.
            max_new_tokens: answer length limit.
            localizations: regions found earlier for these pairs (e.g. one localizer pass shared
                by several methods in an evaluation); the localizer is then not called again.
            localizer_s: the time those localizations took for the whole batch, reported as
                this call's localizer time (so the localizer's cost is never dropped).

        Raises:
            CropInputError: for a missing/corrupt image, an empty question, or mismatched lengths.
        """
        if len(images) != len(questions):
            raise CropInputError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            raise CropInputError("nothing to answer: no images given")
        if max_new_tokens < 1:
            raise CropInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pil_images = [load_image(im) for im in images]
        texts = [check_question(q) for q in questions]

        if localizations is None:
            start = clock()  # every clock reading waits for the device's queued work (a no-op on the CPU)
            localizations = self.localizer.localize(pil_images, texts)
            localizer_s = clock() - start
        elif len(localizations) != len(texts) or localizer_s is None:
            raise ValueError("precomputed localizations need one entry per question and their localizer_s")

        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = self.processor(images=pil_images, text=[self.prompt(t) for t in texts], padding=True,
                                    return_tensors="pt")
        finally:
            tokenizer.padding_side = side

        view_boxes = [self._view_box(loc.box, im.size) for loc, im in zip(localizations, pil_images, strict=True)]
        first_token = FirstTokenClock()
        with PruningHandle(self.model, self.config) as handle:
            t0 = clock()
            run_inputs = handle.prepare(inputs, view_boxes)
            out = self.model.generate(**run_inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      logits_processor=LogitsProcessorList([first_token]),
                                      return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
            t_end = clock()
            stats = handle.prepared_stats()
        prompt_len = run_inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:]  # (B, T)
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        kv_lengths, kv_bytes = cache_after_prefill(out, new_tokens.shape[1] - 1)
        first = first_token.first if first_token.first is not None else t_end
        batch = len(texts)
        timings = {
            "localizer_s": localizer_s / batch,
            "prefill_s": (first - t0) / batch,
            "decode_s": (t_end - first) / batch,
        }
        timings["total_s"] = timings["localizer_s"] + timings["prefill_s"] + timings["decode_s"]
        method_name = handle.method.name
        layers = handle.method.stage_layers() if isinstance(handle.method, InnerLLMMethod) else []
        mask = inputs.get("attention_mask")
        prompt_tokens = mask.sum(1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * batch
        results = []
        for i, (answer, loc, view) in enumerate(zip(answers, localizations, view_boxes, strict=True)):
            found = bool(stats.self_localized and stats.self_localized[i])
            if found:  # the region the answerer's own attention pointed at, on its view of the image
                loc, view = Localization(stats.boxes[i]), stats.boxes[i]
            results.append(CropResult(
                answer=answer.strip(),
                box=loc.box.as_list(),
                grid=loc.box.grid,
                method=method_name,
                layer=layers[0] if len(layers) == 1 else None,
                keep_tokens=getattr(self.config, "keep_tokens", None),
                visual_tokens_in=stats.visual_tokens_in[i],
                visual_tokens_kept={stage: counts[i] for stage, counts in stats.visual_tokens_kept.items()},
                kv_cache_lengths=kv_lengths,
                kv_cache_bytes=kv_bytes // batch,
                timings=dict(timings),
                localizer_fallback=loc.fallback,
                localizer_output=loc.raw,
                token_grid=list(stats.token_grids[i]),
                full_resolution_tokens=stats.full_resolution[i],
                extra={"batch_size": batch, "equivalent_tokens": stats.equivalent_tokens[i],
                       "prompt_tokens": prompt_tokens[i], "selection_flops": handle.method.selection_flops(
                           prompt_tokens[i], stats.visual_tokens_in[i]),
                       **({"layers": layers} if len(layers) > 1 else {}),
                       **({"model_view_box": view.as_list()} if view != loc.box or found else {}),
                       **({"self_localized": True} if found else {})},
            ))
        return results
