"""Scores and summaries of an evaluation: per-sample correctness, accuracy kept, localization quality.

Pure functions over the per-sample prediction rows that :func:`crop.eval.runner.run_eval` writes,
so a results file can be re-summarised without a model.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from crop.data.synth import SynthSample, answers_match
from crop.localizers.base import Localization
from crop.regions import GridBox


def sample_scores(prediction: str, sample: Any) -> dict[str, Any]:
    """``correct`` (and, for JSONL samples with their reference answers, ``answers`` and ``vqa_score``)."""
    answers = getattr(sample, "answers", None)
    if answers is None:  # a synthetic sample: one reference, the benchmark's own matching
        return {"correct": answers_match(prediction, sample.answer)}
    from crop.eval.data import exact_match, vqa_score

    return {"correct": exact_match(prediction, answers), "answers": list(answers),
            "vqa_score": vqa_score(prediction, answers)}


def box_metrics(boxes: Sequence[GridBox], gts: Sequence[GridBox | None], families: Sequence[str]) -> dict[str, Any]:
    """Mean IoU with the ground-truth grid box and containment rate, overall and per family.

    Samples without a ground-truth box (JSONL data may leave it out) are not counted; with none
    at all the means are NaN and ``n`` is 0.
    """
    per: dict[str, list[tuple[float, bool]]] = {"all": []}
    for box, gt, family in zip(boxes, gts, families, strict=True):
        if gt is None:
            continue
        for key in (family, "all"):
            per.setdefault(key, []).append((box.iou(gt), box.contains(gt)))
    nan = float("nan")
    return {key: {"mean_iou": statistics.fmean(v[0] for v in vals) if vals else nan,
                  "contains_gt": statistics.fmean(float(v[1]) for v in vals) if vals else nan, "n": len(vals)}
            for key, vals in per.items()}


def localization_metrics(locs: Sequence[Localization], samples: Sequence[SynthSample]) -> dict[str, Any]:
    """:func:`box_metrics` of the localizer's boxes, plus its fallbacks."""
    out = box_metrics([loc.box for loc in locs],
                      [None if s.box_grid is None else GridBox.from_list(s.box_grid, loc.box.grid)
                       for loc, s in zip(locs, samples, strict=True)], [s.family for s in samples])
    out["all"]["fallbacks"] = sum(loc.fallback for loc in locs)
    return out


def self_box_metrics(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`box_metrics` of the boxes a self-localizing method found (``{}`` for any other run)."""
    if not preds or not all(p.get("self_localized") for p in preds):
        return {}
    boxes = [GridBox.from_list(p["box"], 8) for p in preds]
    gts = [None if p["box_gt"] is None else GridBox.from_list(p["box_gt"], 8) for p in preds]
    return {"self_localization": box_metrics(boxes, gts, [p["family"] for p in preds])}


def summarize(preds: list[dict[str, Any]], full_preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (overall, per family), accuracy kept vs full, tokens kept per stage, equivalent tokens, FLOPs.

    FLOPs are analytic means per sample (:mod:`crop.eval.flops`): the LLM's prefill, the
    method's own selection, the localizer (for methods that use the region), and their total.
    No timings: wall-clock speed on a shared CPU is measured by ``crop bench``, interleaved.
    """
    def acc(rows):
        return statistics.fmean(float(r["correct"]) for r in rows) if rows else float("nan")

    families = sorted({p["family"] for p in preds})
    accuracy = acc(preds)
    full_acc = acc(full_preds)
    stages = sorted({stage for p in preds for stage in p["visual_tokens_kept"]})
    flops = {k: statistics.fmean(p["flops"][k] for p in preds) for k in ("llm_prefill", "selection", "localizer")}
    vqa = {}
    if preds and all("vqa_score" in p for p in preds):  # JSONL data: the VQA soft score next to the exact match
        def soft(rows):
            return statistics.fmean(r["vqa_score"] for r in rows) if rows else float("nan")

        full_soft = soft(full_preds) if all("vqa_score" in p for p in full_preds) else float("nan")
        vqa = {"vqa_score": soft(preds), "vqa_score_kept": soft(preds) / full_soft if full_soft > 0 else float("nan"),
               "vqa_score_per_family": {f: soft([p for p in preds if p["family"] == f]) for f in families}}
    return {
        "accuracy": accuracy,
        "accuracy_kept": accuracy / full_acc if full_acc > 0 else float("nan"),
        "accuracy_per_family": {f: acc([p for p in preds if p["family"] == f]) for f in families},
        "visual_tokens_kept": {s: statistics.fmean(p["visual_tokens_kept"][s] for p in preds) for s in stages},
        "equivalent_tokens": statistics.fmean(p["equivalent_tokens"] for p in preds),
        "gflops": {**{k: v / 1e9 for k, v in flops.items()}, "total": sum(flops.values()) / 1e9},
        **vqa,
        **self_box_metrics(preds),
    }
