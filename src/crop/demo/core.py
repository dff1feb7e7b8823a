"""What ``crop demo`` computes for one request, without Gradio: answers, overlays and savings per method.

The page (:mod:`crop.demo.app`) is a thin layer over :func:`compare`, so everything it shows
is tested here on tiny models, and the errors it prints are the CLI's (:class:`CropInputError`).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from crop.errors import CropInputError

DEMO_METHODS = ("full", "crop-ilp", "crop-plc", "crop-plc-trained", "crop-self", "fastv", "dart", "visionzip", "pdrop", "random")
DEFAULT_METHODS = ("full", "crop-ilp", "crop-plc", "fastv")
MAX_UPLOAD_MB = 20.0


@dataclass
class DemoModels:
    """The preloaded answerer and localizer the page serves with."""

    model: Any
    processor: Any
    localizer: Any
    model_name: str
    localizer_name: str
    grid: int = 8
    layer: int = 2
    pool: int = 4


@dataclass
class MethodOutcome:
    """One method's answer and what it cost (``error`` set when it could not run this request)."""

    method: str
    answer: str = ""
    tokens: dict[str, int] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    overlay: Image.Image | None = None
    error: str | None = None


def load_demo_models(model: str = "embedded", localizer: str | None = None, grid: int = 8) -> DemoModels:
    """Load the answerer and localizer once (the embedded pair by default)."""
    from crop.localizers import make_localizer
    from crop.models.loading import load_model

    loaded, processor = load_model(model)
    name = localizer or ("embedded" if model == "embedded" else "full")
    models = DemoModels(loaded, processor, make_localizer(name, grid), model, name, grid)
    warm = Image.new("RGB", (336, 336), (127, 127, 127))
    _run(models, warm, "What is this?", "crop-ilp", 64, 2)  # first calls are slow: keep them off the page's timings
    return models


def check_upload(path: str | os.PathLike | None, max_mb: float = MAX_UPLOAD_MB) -> Path:
    """The uploaded file's path, refused before decoding if missing or larger than ``max_mb``."""
    if path is None or str(path) == "":
        raise CropInputError("no image: upload one or pick a sample")
    path = Path(path)
    if not path.is_file():
        raise CropInputError(f"the uploaded image {path.name} cannot be read")
    size = path.stat().st_size
    if size > max_mb * 1024 * 1024:
        raise CropInputError(f"the upload is {size / 2**20:.1f} MB, over the {max_mb:g} MB limit")
    return path


def _config(method: str, keep: int, models: DemoModels):
    from crop.methods import build_config

    shared = {"layer": models.layer, "pool": models.pool, "grid": models.grid}  # for the methods that have them
    return build_config(method, None if method == "full" else keep, shared=shared)


def _run(models: DemoModels, image: Image.Image, question: str, method: str, keep: int, max_new_tokens: int):
    from crop.localizers import make_localizer
    from crop.methods import method_for
    from crop.pipeline import CropPipeline

    config = _config(method, keep, models)
    # a region-free method (crop-self included: it finds its box inside the answerer) is not charged a
    # localizer call it does not need
    localizer = models.localizer if method_for(config).uses_region else make_localizer("full", models.grid)
    pipeline = CropPipeline(models.model, models.processor, localizer, config)
    return pipeline, pipeline(image, question, max_new_tokens=max_new_tokens)


def compare(models: DemoModels, upload: str | os.PathLike | None, question: str, methods: list[str] | tuple[str, ...],
            keep_tokens: int, max_new_tokens: int = 8, max_upload_mb: float = MAX_UPLOAD_MB,
            repeats: int = 1) -> list[MethodOutcome]:
    """Answer ``question`` about the upload with every method; ``full`` always runs first, as the reference.

    Args:
        models: the preloaded pair.
        upload: the uploaded file's path (checked for size before it is decoded).
        question: the question.
        methods: names from :data:`DEMO_METHODS` (``full`` is added if missing, and returned first).
        keep_tokens: visual tokens to keep, of the model's own count for this image.
        max_new_tokens: answer length limit.
        max_upload_mb: the upload size limit.
        repeats: runs per method; timings are the medians (the answers are the same every run).

    Raises:
        CropInputError: for a missing, oversized or corrupt image, an empty question, no or
            unknown methods, or a budget outside ``1..visual tokens``. A method that cannot run
            this budget (e.g. PLC below its pooled context) is reported in its outcome instead.
    """
    from crop.io import check_question, load_image
    from crop.regions import GridBox
    from crop.viz import draw_panels, pooled_block

    path = check_upload(upload, max_upload_mb)
    text = check_question(question)
    chosen = list(dict.fromkeys(methods or ()))
    if not chosen:
        raise CropInputError("choose at least one method")
    unknown = [m for m in chosen if m not in DEMO_METHODS]
    if unknown:
        raise CropInputError(f"unknown method {unknown[0]!r}; choose from {', '.join(DEMO_METHODS)}")
    if isinstance(keep_tokens, bool) or not float(keep_tokens).is_integer():
        raise CropInputError(f"the budget must be a whole number of tokens, got {keep_tokens!r}")
    keep = int(keep_tokens)
    image = load_image(path)
    order = ["full"] + [m for m in chosen if m != "full"]
    outcomes: list[MethodOutcome] = []
    for method in order:
        if method != "full" and outcomes:
            visual = outcomes[0].tokens.get("llm_input", 0)
            if not 1 <= keep <= visual:
                raise CropInputError(f"the budget must be between 1 and the image's {visual} visual tokens, got {keep}")
        try:
            runs = [_run(models, image, text, method, keep, max_new_tokens) for _ in range(max(1, repeats))]
        except (CropInputError, ValueError) as exc:
            outcomes.append(MethodOutcome(method, error=str(exc)))
            continue
        pipeline, result = runs[-1]
        timings = {k: statistics.median(r.timings[k] for _, r in runs) for k in result.timings}
        panels = pipeline.adapter.overlay_panels(image, getattr(models.processor, "image_processor", None),
                                                 (result.token_grid[0], result.token_grid[1]))
        box = result.extra.get("model_view_box", result.box)
        overlay = draw_panels(panels, GridBox.from_list(box, result.grid), result.full_resolution_tokens,
                              size=320, pool=pooled_block(pipeline.config))
        outcomes.append(MethodOutcome(method, result.answer, dict(result.visual_tokens_kept), result.kv_cache_bytes,
                                      timings, overlay))
    return outcomes


def summary_table(outcomes: list[MethodOutcome]) -> str:
    """A Markdown table of the outcomes, with prefill and end-to-end time against ``full``'s."""
    full = outcomes[0] if outcomes and outcomes[0].method == "full" and outcomes[0].error is None else None
    lines = ["| method | answer | visual tokens per stage | KV cache | prefill (vs full) | end to end (vs full) "
             "| localizer share |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if o.error:
            lines.append(f"| {o.method} | could not run: {o.error} | | | | | |")
            continue
        stages = ", ".join(f"{k}: {v}" for k, v in o.tokens.items())
        prefill, total = 1000 * o.timings["prefill_s"], 1000 * o.timings["total_s"]  # total includes the localizer
        rel = (lambda ours, ref: f" ({ours / ref:.2f}x)" if ref > 0 else "")  # noqa: E731
        ref_prefill = 1000 * full.timings["prefill_s"] if full else 0.0
        ref_total = 1000 * full.timings["total_s"] if full else 0.0
        share = o.timings["localizer_s"] / o.timings["total_s"] if o.timings["total_s"] else 0.0
        lines.append(f"| {o.method} | {o.answer or '(empty)'} | {stages} | {o.kv_cache_bytes / 1024:.1f} KiB "
                     f"| {prefill:.0f} ms{rel(prefill, ref_prefill)} | {total:.0f} ms{rel(total, ref_total)} "
                     f"| {share:.0%} |")
    return "\n".join(lines)
