"""Evaluation on the synthetic localized-VQA benchmark: accuracy and cost per method x budget.

One localizer pass serves every CROP run (the region does not depend on the pruning method),
and its per-sample time is added to every CROP run's end-to-end time: localization is part of
CROP's cost, always. The unpruned model (``full``) runs once; its accuracy is the reference
for "accuracy kept".
"""

from __future__ import annotations

import logging
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crop.data.synth import SynthSample, answers_match, generate
from crop.localizers.base import Localization, Localizer
from crop.methods import ALIASES, MethodOptions, config_for, method_for, method_names
from crop.pipeline import CropPipeline, chat_prompt
from crop.regions import GridBox

logger = logging.getLogger(__name__)

REFERENCE_VISUAL_TOKENS = 576  # budgets are given as LLaVA-1.5 counts (of 576) and scaled to the model


@dataclass
class EvalSpec:
    """What to evaluate.

    Args:
        methods: registered method names (see :func:`crop.methods.method_names`); ``full`` (the
            unpruned model) is always run, as the reference.
        keep_tokens: budgets as LLaVA-1.5 counts (of 576), scaled to the model's visual tokens.
        n: number of test samples.
        split: benchmark split.
        seed: benchmark seed.
        batch_size: pairs per generate call.
        max_new_tokens: answer length limit.
        layer: ILP's K.
        pool: PLC's pooling block.
    """

    methods: list[str]
    keep_tokens: list[int]
    n: int = 200
    split: str = "test"
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 8
    layer: int = 2
    pool: int = 4

    def __post_init__(self) -> None:
        known = set(method_names()) | set(ALIASES)
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: full, {', '.join(method_names())}")
        if any(k <= 0 for k in self.keep_tokens):
            raise ValueError(f"keep_tokens must be positive, got {self.keep_tokens}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("n and batch_size must be >= 1")


def scale_budget(budget: int, visual_tokens: int) -> int:
    """A LLaVA-1.5 budget (of 576 tokens) scaled to the same fraction of ``visual_tokens``."""
    return max(1, round(budget * visual_tokens / REFERENCE_VISUAL_TOKENS))


def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import crop

    return {"crop": crop.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def localize_all(localizer: Localizer | None, samples: Sequence[SynthSample], batch_size: int,
                 progress=None) -> tuple[list[Localization], list[float]]:
    """Regions for every sample and each sample's share of the localizer time.

    ``localizer=None`` is the oracle: the ground-truth box, at zero cost.
    """
    locs: list[Localization] = []
    times: list[float] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        if localizer is None:
            locs.extend(Localization(GridBox(*s.box_grid)) for s in chunk)
            times.extend(0.0 for _ in chunk)
        else:
            t0 = time.perf_counter()
            locs.extend(localizer.localize([s.image for s in chunk], [s.question for s in chunk]))
            times.extend([(time.perf_counter() - t0) / len(chunk)] * len(chunk))
        if progress is not None:
            progress(len(chunk))
    return locs, times


def run_eval(model, processor, localizer: Localizer | None, spec: EvalSpec, localizer_name: str,
             model_name: str, progress_factory=None) -> dict[str, Any]:
    """Run every method x budget on the benchmark and return the results document.

    Args:
        model, processor: the answering VLM.
        localizer: the localizer, or ``None`` for the oracle (ground-truth boxes).
        spec: what to run.
        localizer_name, model_name: recorded in the results.
        progress_factory: ``total -> callable(n)`` for a progress bar (e.g. tqdm), or ``None``.

    Returns:
        A JSON-ready dict: config, versions, git hash, per-run metrics and per-sample predictions.
    """
    samples = list(generate(spec.n, spec.seed, spec.split))
    runs = [("full", None)] + [(m, k) for m in spec.methods if ALIASES.get(m, m) != "none" for k in spec.keep_tokens]
    total = len(samples) * (len(runs) + (0 if localizer is None else 1))
    progress = progress_factory(total) if progress_factory else None

    locs, loc_times = localize_all(localizer, samples, spec.batch_size, progress)
    first = processor(images=[samples[0].image], text=[chat_prompt(processor, samples[0].question)],
                      return_tensors="pt")
    from crop.models.base import get_adapter

    visual_tokens = get_adapter(model).image_spans(first)[0].length

    results: list[dict[str, Any]] = []
    for method, budget in runs:
        keep = None if budget is None else scale_budget(budget, visual_tokens)
        config = config_for(method, keep, MethodOptions(layer=spec.layer, pool=spec.pool, seed=spec.seed))
        uses_region = method_for(config).uses_region
        pipe = CropPipeline(model, processor, _Precomputed(), config)
        preds = []
        for start in range(0, len(samples), spec.batch_size):
            chunk = samples[start:start + spec.batch_size]
            chunk_locs = locs[start:start + spec.batch_size] if uses_region else [
                Localization(GridBox.full()) for _ in chunk]
            loc_s = sum(loc_times[start:start + spec.batch_size]) if uses_region else 0.0
            out = pipe.answer_batch([s.image for s in chunk], [s.question for s in chunk], spec.max_new_tokens,
                                    localizations=chunk_locs, localizer_s=loc_s)
            for s, r in zip(chunk, out, strict=True):
                preds.append({"id": s.id, "family": s.family, "question": s.question, "answer": s.answer,
                              "prediction": r.answer, "correct": answers_match(r.answer, s.answer),
                              "box": r.box, "box_gt": list(s.box_grid), "fallback": r.localizer_fallback,
                              "visual_tokens_kept": r.visual_tokens_kept,
                              "equivalent_tokens": r.extra.get("equivalent_tokens"), "timings": r.timings})
            if progress is not None:
                progress(len(chunk))
        results.append({"method": method, "keep_tokens_576": budget, "keep_tokens": keep, "predictions": preds})

    return {
        "benchmark": {"name": "synth", "split": spec.split, "n": spec.n, "seed": spec.seed},
        "model": model_name,
        "localizer": localizer_name,
        "visual_tokens_per_image": visual_tokens,
        "spec": {k: v for k, v in spec.__dict__.items()},
        "versions": _versions(),
        "git": _git_hash(),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "localization": _localization_metrics(locs, samples),
        "runs": [{**summarize(r["predictions"], results[0]["predictions"]), **r} for r in results],
    }


class _Precomputed:
    """A placeholder localizer: the evaluation passes precomputed localizations to every call."""

    grid = 8

    def localize(self, images, questions):  # pragma: no cover - never called
        raise RuntimeError("evaluation passes precomputed localizations")


def _localization_metrics(locs: Sequence[Localization], samples: Sequence[SynthSample]) -> dict[str, Any]:
    """Mean IoU with the ground-truth grid box, containment rate and fallbacks, overall and per family."""
    per: dict[str, list[tuple[float, bool]]] = {}
    for loc, s in zip(locs, samples, strict=True):
        gt = GridBox(*s.box_grid, grid=loc.box.grid)
        for key in (s.family, "all"):
            per.setdefault(key, []).append((loc.box.iou(gt), loc.box.contains(gt)))
    out = {key: {"mean_iou": statistics.fmean(v[0] for v in vals),
                 "contains_gt": statistics.fmean(float(v[1]) for v in vals), "n": len(vals)}
           for key, vals in per.items()}
    out["all"]["fallbacks"] = sum(loc.fallback for loc in locs)
    return out


def summarize(preds: list[dict[str, Any]], full_preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (overall, per family), accuracy kept vs full, tokens kept and time ratios vs full.

    Time ratios are medians over samples of full's time divided by medians of this run's
    (> 1 means faster); ``e2e`` includes the localizer.
    """
    def acc(rows):
        return statistics.fmean(float(r["correct"]) for r in rows) if rows else float("nan")

    families = sorted({p["family"] for p in preds})
    accuracy = acc(preds)
    full_acc = acc(full_preds)

    def med(rows, key):
        return statistics.median(r["timings"][key] for r in rows)

    def e2e(rows):
        return statistics.median(r["timings"]["total_s"] for r in rows)

    stages = sorted({stage for p in preds for stage in p["visual_tokens_kept"]})
    return {
        "accuracy": accuracy,
        "accuracy_kept": accuracy / full_acc if full_acc > 0 else float("nan"),
        "accuracy_per_family": {f: acc([p for p in preds if p["family"] == f]) for f in families},
        "visual_tokens_kept": {s: statistics.fmean(p["visual_tokens_kept"][s] for p in preds) for s in stages},
        "equivalent_tokens": statistics.fmean(p["equivalent_tokens"] for p in preds),
        "prefill_speedup": med(full_preds, "prefill_s") / med(preds, "prefill_s"),
        "e2e_speedup_with_localizer": e2e(full_preds) / e2e(preds),
        "localizer_share_of_e2e": med(preds, "localizer_s") / e2e(preds),
    }
