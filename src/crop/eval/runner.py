"""Evaluation on the synthetic localized-VQA benchmark (or your own JSONL data): accuracy and cost per method x budget.

One localizer pass serves every CROP run (the region does not depend on the pruning method),
and its analytic FLOPs are added to every region-guided run's FLOPs: localization is part of
CROP's cost, always. Budgets are matched per method as ``EvalSpec.match`` says
(:mod:`crop.eval.matching`). The unpruned model (``full``) runs once; its accuracy is the reference
for "accuracy kept".

With ``EvalSpec.data`` (a JSONL file, :mod:`crop.eval.data`) the samples are read from it
instead of generated: ``correct`` is then the normalised exact match against any reference
answer, each prediction also has its ``vqa_score`` (the VQA soft score) and each run its mean
``vqa_score``; samples without a box count in the localization metrics only if they have one.
"""

from __future__ import annotations

import logging
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crop.data.synth import SynthSample, answers_match, generate
from crop.eval.flops import DecoderDims, prefill_flops, visual_per_layer, vlm_localization_flops
from crop.eval.matching import (
    MATCH_MODES,
    BudgetSolution,
    planned_counts,
    planned_equivalent,
    planned_flops,
    solve_budget,
)
from crop.localizers.base import Localization, Localizer
from crop.methods import METHODS, MethodOptions, canonical_name, config_for, method_for, with_options
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
        layer: the pruning layer K of single-stage inner-LLM methods.
        pool: PLC's pooling block.
        match: how a budget label becomes each method's budget (:mod:`crop.eval.matching`):
            ``"label"`` (each method's native meaning of the number), ``"equivalent"`` (solved
            so that every method runs the same equivalent visual tokens) or ``"flops"`` (the
            same analytic prefill FLOPs, selection and localizer included, as an unpruned model
            fed the label's tokens from layer 0).
        options: ``[method or None, field, value]`` config fields to set (``--option``): a
            prefixed one for that method only, an unprefixed one for every method that has the field.
        data: a JSONL file of your own samples (:func:`crop.eval.data.read_vqa_jsonl`) instead
            of the synthetic benchmark (``split`` and ``seed`` then only seed the methods); its
            first ``n`` samples are used.
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
    match: str = "label"
    options: list[list] = field(default_factory=list)
    data: str | None = None

    def __post_init__(self) -> None:
        for m in self.methods:
            canonical_name(m)  # raises for an unknown name, listing the known ones
        if any(k <= 0 for k in self.keep_tokens):
            raise ValueError(f"keep_tokens must be positive, got {self.keep_tokens}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("n and batch_size must be >= 1")
        for target, _field, _value in self.options:
            if target is not None:
                canonical_name(target)
        if self.match not in MATCH_MODES:
            raise ValueError(f"unknown match {self.match!r}; choose one of {', '.join(MATCH_MODES)}")


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


def load_samples(spec: EvalSpec) -> list:
    """The samples ``spec`` evaluates: the first ``spec.n`` of its JSONL file, or ``spec.n`` synthetic ones.

    Raises:
        ValueError: for a bad data file (naming the file and line).
    """
    if spec.data is None:
        return list(generate(spec.n, spec.seed, spec.split))
    from crop.eval.data import read_vqa_jsonl

    return read_vqa_jsonl(spec.data)[:spec.n]


def check_oracle(samples: Sequence) -> None:
    """Raise unless every sample has a ground-truth box (what the oracle localizer returns).

    Raises:
        ValueError: naming how many samples lack one and the first of them.
    """
    missing = [s.id for s in samples if s.box_grid is None]
    if missing:
        raise ValueError(f"--localizer oracle needs a box for every sample; {len(missing)} of {len(samples)} have "
                         f"none (first: id {missing[0]!r}); add box_grid or box_px, or use another localizer")


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
             model_name: str, progress_factory=None, samples: Sequence | None = None) -> dict[str, Any]:
    """Run every method x budget on the benchmark and return the results document.

    Args:
        model, processor: the answering VLM.
        localizer: the localizer, or ``None`` for the oracle (ground-truth boxes).
        spec: what to run.
        localizer_name, model_name: recorded in the results.
        progress_factory: ``total -> callable(n)`` for a progress bar (e.g. tqdm), or ``None``.
        samples: the samples, if already loaded (default: :func:`load_samples`).

    Returns:
        A JSON-ready dict: config, versions, git hash, per-run metrics and per-sample predictions.
    """
    samples = load_samples(spec) if samples is None else list(samples)
    if localizer is None:
        check_oracle(samples)
    names = [canonical_name(m) for m in spec.methods]
    if getattr(localizer, "in_model", False):  # --localizer self: ILP finds its own box (CROP-self)
        names = [_self_localized_name(n) for n in names]
    runs = [("full", None)] + [(m, k) for m in dict.fromkeys(names) if m != "none" for k in spec.keep_tokens]
    total = len(samples) * (len(runs) + (0 if localizer is None else 1))
    progress = progress_factory(total) if progress_factory else None

    locs, _ = localize_all(localizer, samples, spec.batch_size, progress)
    first = processor(images=[samples[0].image], text=[chat_prompt(processor, samples[0].question)],
                      return_tensors="pt")
    from crop.models.base import get_adapter

    adapter = get_adapter(model)
    visual_tokens = adapter.image_spans(first)[0].length
    text_tokens = int(first["input_ids"].shape[1]) - visual_tokens
    loc_flops = float(vlm_localization_flops(localizer, samples[0].question, samples[0].image))
    options = MethodOptions(layer=spec.layer, pool=spec.pool, seed=spec.seed)
    dims = DecoderDims.from_config(adapter.text_config)

    results: list[dict[str, Any]] = []
    for method, budget in runs:
        config_at = config_maker(method, options, spec.options)
        target, solution = _budget_for(adapter, config_at, budget, spec.match, visual_tokens, text_tokens, loc_flops,
                                       dims)
        if solution is not None and not solution.feasible:
            logger.info("%s at %s: %s", method, budget, solution.reason)
            results.append({"method": method, "keep_tokens_576": budget, "keep_tokens": solution.keep_tokens,
                            "match": spec.match, "target": target, "infeasible": solution.reason, "predictions": []})
            if progress is not None:
                progress(len(samples))
            continue
        keep = None if budget is None else (solution.keep_tokens if solution is not None else
                                            scale_budget(budget, visual_tokens))
        config = config_at(keep)
        uses_region = method_for(config).uses_region
        pipe = CropPipeline(model, processor, _Precomputed(), config)
        preds = []
        for start in range(0, len(samples), spec.batch_size):
            chunk = samples[start:start + spec.batch_size]
            chunk_locs = locs[start:start + spec.batch_size] if uses_region else [
                Localization(GridBox.full()) for _ in chunk]
            out = pipe.answer_batch([s.image for s in chunk], [s.question for s in chunk], spec.max_new_tokens,
                                    localizations=chunk_locs, localizer_s=0.0)
            for s, r in zip(chunk, out, strict=True):
                layer_tokens = [r.extra["prompt_tokens"] - r.visual_tokens_in + c for c in visual_per_layer(
                    {k: [v] for k, v in r.visual_tokens_kept.items()}, 0, dims.layers)]
                preds.append({"id": s.id, "family": s.family, "question": s.question, "answer": s.answer,
                              "prediction": r.answer, **_scores(r.answer, s),
                              "box": r.box, "box_gt": None if s.box_grid is None else list(s.box_grid),
                              "fallback": r.localizer_fallback,
                              **({"self_localized": True} if r.extra.get("self_localized") else {}),
                              "visual_tokens_kept": r.visual_tokens_kept,
                              "equivalent_tokens": r.extra.get("equivalent_tokens"),
                              "flops": {"llm_prefill": prefill_flops(dims, layer_tokens),
                                        "selection": r.extra["selection_flops"],
                                        "localizer": loc_flops if uses_region else 0.0}})
            if progress is not None:
                progress(len(chunk))
        results.append({"method": method, "keep_tokens_576": budget, "keep_tokens": keep, "match": spec.match,
                        "target": target, "predictions": preds})

    full_preds = results[0]["predictions"]
    benchmark = {"name": "synth", "split": spec.split, "n": spec.n, "seed": spec.seed}
    if spec.data is not None:  # "split" names the file: the report's and plots' titles read it
        benchmark = {"name": "jsonl", "path": str(spec.data), "split": Path(spec.data).name, "n": len(samples),
                     "seed": spec.seed}
    return {
        "benchmark": benchmark,
        "model": model_name,
        "localizer": localizer_name,
        "visual_tokens_per_image": visual_tokens,
        "llm_layers": dims.layers,
        "localizer_gflops": loc_flops / 1e9,
        "spec": {k: v for k, v in spec.__dict__.items()},
        "versions": _versions(),
        "git": _git_hash(),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "localization": _localization_metrics(locs, samples),
        "runs": [{**summarize(r["predictions"], full_preds), **r} if r["predictions"] else r for r in results],
    }


def _scores(prediction: str, sample) -> dict[str, Any]:
    """``correct`` (and, for JSONL samples with their reference answers, ``answers`` and ``vqa_score``)."""
    answers = getattr(sample, "answers", None)
    if answers is None:  # a synthetic sample: one reference, the benchmark's own matching
        return {"correct": answers_match(prediction, sample.answer)}
    from crop.eval.data import exact_match, vqa_score

    return {"correct": exact_match(prediction, answers), "answers": list(answers),
            "vqa_score": vqa_score(prediction, answers)}


def config_maker(method: str, options: MethodOptions, extra: list[list]):
    """``budget -> config`` of ``method`` with the shared options and the ``--option`` fields that concern it."""
    import dataclasses

    def config_at(keep):
        config = config_for(method, keep, options)
        names = {f.name for f in dataclasses.fields(config)}
        chosen = {name: value for target, name, value in extra
                  if (target is None and name in names) or (target is not None and canonical_name(target) == method)}
        return with_options(config, chosen) if chosen else config

    return config_at


def _budget_for(adapter, config_at, budget: int | None, match: str, visual: int, text: int, loc_flops: float,
                dims: DecoderDims):
    """``(target, solution)``: what a label asks of ``method`` under ``match`` (``solution=None``: use the label)."""
    if budget is None:
        return None, None
    if match == "label":
        keep = scale_budget(budget, visual)
        try:  # a budget the method cannot run (e.g. PyramidDrop below its first stage) is reported, not run
            planned_counts(adapter, config_at, keep, visual)
        except ValueError as exc:
            return keep, BudgetSolution(keep, float("nan"), keep, False, str(exc))
        return keep, None
    tokens = budget * visual / REFERENCE_VISUAL_TOKENS  # the label's share of this model's visual tokens
    if match == "equivalent":
        return tokens, solve_budget(lambda b: planned_equivalent(adapter, config_at, b, visual), tokens, visual,
                                    tolerance=1.0)
    target = float(prefill_flops(dims, [text + round(tokens)] * dims.layers))  # the label's tokens from layer 0
    per_token = float(prefill_flops(dims, [text + 1] * dims.layers) - prefill_flops(dims, [text] * dims.layers))
    return target, solve_budget(lambda b: planned_flops(adapter, config_at, b, visual, text, loc_flops), target,
                                visual, tolerance=per_token, unit=lambda v: f"{v / 1e9:.3f} GFLOPs")


class _Precomputed:
    """A placeholder localizer: the evaluation passes precomputed localizations to every call."""

    grid = 8

    def localize(self, images, questions):  # pragma: no cover - never called
        raise RuntimeError("evaluation passes precomputed localizations")


def _self_localized_name(name: str) -> str:
    """What method ``name`` runs as when the localizer is ``self``: ILP becomes CROP-self; PLC cannot run."""
    if name == "crop-ilp":
        return "crop-self"
    if name != "crop-self" and METHODS.get(name).uses_region:
        raise ValueError(f"--localizer self cannot serve {name}: it needs the region before the LLM runs, and the "
                         "answerer's own attention gives it only inside the prefill (a second pass would be needed)")
    return name


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


def _localization_metrics(locs: Sequence[Localization], samples: Sequence[SynthSample]) -> dict[str, Any]:
    """:func:`box_metrics` of the localizer's boxes, plus its fallbacks."""
    out = box_metrics([loc.box for loc in locs],
                      [None if s.box_grid is None else GridBox(*s.box_grid, grid=loc.box.grid)
                       for loc, s in zip(locs, samples, strict=True)], [s.family for s in samples])
    out["all"]["fallbacks"] = sum(loc.fallback for loc in locs)
    return out


def _self_box_metrics(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`box_metrics` of the boxes a self-localizing method found (``{}`` for any other run)."""
    if not preds or not all(p.get("self_localized") for p in preds):
        return {}
    boxes = [GridBox(*p["box"], grid=8) for p in preds]
    gts = [None if p["box_gt"] is None else GridBox(*p["box_gt"], grid=8) for p in preds]
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
        **_self_box_metrics(preds),
    }
