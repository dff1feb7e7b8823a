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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crop.data.synth import SynthSample, generate
from crop.eval.flops import DecoderDims, prefill_flops, visual_per_layer, vlm_localization_flops
from crop.eval.matching import MATCH_MODES, budget_for, scale_budget
from crop.eval.metrics import localization_metrics, sample_scores, summarize
from crop.eval.progress_store import ProgressStore, Shard, loc_item
from crop.eval.provenance import git_hash, machine, versions
from crop.localizers.base import Localization, Localizer
from crop.methods import Option, canonical_name, check_options_used, config_builder, method_for
from crop.methods.self_region import self_localized_name
from crop.models import get_adapter
from crop.pipeline import CropPipeline, chat_prompt
from crop.regions import GridBox
from crop.timing import clock

logger = logging.getLogger(__name__)


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
        check_options_used(self.methods, self.options)  # each names a known method and reaches one of them
        if self.match not in MATCH_MODES:
            raise ValueError(f"unknown match {self.match!r}; choose one of {', '.join(MATCH_MODES)}")


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
            t0 = clock()
            locs.extend(localizer.localize([s.image for s in chunk], [s.question for s in chunk]))
            times.extend([(clock() - t0) / len(chunk)] * len(chunk))
        if progress is not None:
            progress(len(chunk))
    return locs, times


def run_eval(model, processor, localizer: Localizer | None, spec: EvalSpec, localizer_name: str,
             model_name: str, progress_factory=None, samples: Sequence | None = None,
             store: ProgressStore | None = None) -> dict[str, Any]:
    """Run every method x budget on the benchmark and return the results document.

    Args:
        model, processor: the answering VLM.
        localizer: the localizer, or ``None`` for the oracle (ground-truth boxes).
        spec: what to run.
        localizer_name, model_name: recorded in the results.
        progress_factory: ``total -> callable(n)`` for a progress bar (e.g. tqdm), or ``None``; when a
            resumed run has work done it is called as ``progress_factory(total, initial)``.
        samples: the samples, if already loaded (default: :func:`load_samples`).
        store: a prepared :class:`crop.eval.progress_store.ProgressStore`: every localization and
            prediction row is appended to it as its batch finishes, what it already holds is not run
            again, only this process's shard of the batches runs, and rank 0 waits for the others'
            rows and builds the results from the store. ``None``: everything in memory, one process.

    Returns:
        A JSON-ready dict: config, versions, git hash, per-run metrics and per-sample predictions;
        ``{}`` on a process other than rank 0 of a sharded run (rank 0 returns the whole document).
    """
    samples = load_samples(spec) if samples is None else list(samples)
    if localizer is None:
        check_oracle(samples)
    names = [canonical_name(m) for m in spec.methods]
    if getattr(localizer, "in_model", False):  # --localizer self: ILP finds its own box (CROP-self)
        names = [self_localized_name(n) for n in names]
    runs = [("full", None)] + [(m, k) for m in dict.fromkeys(names) if m != "none" for k in spec.keep_tokens]
    shard = store.shard if store is not None else Shard()
    batch = spec.batch_size
    starts = shard.batches(len(samples), batch)  # this process's batches, as a one-process run makes them
    mine = [i for start in starts for i in range(start, min(start + batch, len(samples)))]
    total = len(mine) * (len(runs) + (0 if localizer is None else 1))
    done_locs = {} if store is None or localizer is None else store.locs
    initial = sum(i in done_locs for i in mine) + (0 if store is None else sum(
        (r, i) in store.rows for r in range(len(runs)) for i in mine))
    progress = None
    if progress_factory:
        progress = progress_factory(total, initial) if initial else progress_factory(total)

    locs_at: dict[int, Localization] = dict(done_locs)
    if localizer is None:  # the oracle: free and deterministic, every sample on every process
        locs_at.update(enumerate(localize_all(None, samples, batch)[0]))
    for start in starts:
        chunk = samples[start:start + batch]
        if localizer is None or all(start + j in locs_at for j in range(len(chunk))):
            continue
        found, _ = localize_all(localizer, chunk, batch, progress)
        locs_at.update((start + j, loc) for j, loc in enumerate(found))
        if store is not None:
            store.append(loc_item(start + j, s.id, loc) for j, (s, loc) in enumerate(zip(chunk, found, strict=True)))
    first = processor(images=[samples[0].image], text=[chat_prompt(processor, samples[0].question)],
                      return_tensors="pt")

    adapter = get_adapter(model)
    visual_tokens = adapter.image_spans(first)[0].visual_tokens  # newline (structure) tokens count as text
    text_tokens = int(first["input_ids"].shape[1]) - visual_tokens
    loc_flops = float(vlm_localization_flops(localizer, samples[0].question, samples[0].image))
    shared = {"layer": spec.layer, "pool": spec.pool, "seed": spec.seed}  # for every method that has the field
    options = [Option.of(row) for row in spec.options]
    dims = DecoderDims.from_config(adapter.text_config)

    results: list[dict[str, Any]] = []
    for index, (method, budget) in enumerate(runs):
        config_at = config_builder(method, options, shared)
        target, solution = budget_for(adapter, config_at, budget, spec.match, visual_tokens, text_tokens, loc_flops,
                                       dims)
        if solution is not None and not solution.feasible:
            logger.info("%s at %s: %s", method, budget, solution.reason)
            results.append({"method": method, "keep_tokens_576": budget, "keep_tokens": solution.keep_tokens,
                            "match": spec.match, "target": target, "infeasible": solution.reason, "predictions": []})
            if progress is not None:
                progress(len(mine))
            continue
        keep = None if budget is None else (solution.keep_tokens if solution is not None else
                                            scale_budget(budget, visual_tokens))
        config = config_at(keep)
        uses_region = method_for(config).uses_region
        pipe = CropPipeline(model, processor, _Precomputed(), config)
        preds = []
        header = {"method": method, "keep_tokens_576": budget, "keep_tokens": keep, "match": spec.match,
                  "target": target}
        for start in starts:
            chunk = samples[start:start + batch]
            todo = [store is None or (index, start + j) not in store.rows for j in range(len(chunk))]
            if not any(todo):  # done before a resume
                continue
            if store is not None and index not in store.headers:
                store.append([{"run": index, "header": header}])
            chunk_locs = [locs_at[start + j] for j in range(len(chunk))] if uses_region else [
                Localization(GridBox.full()) for _ in chunk]
            out = pipe.answer_batch([s.image for s in chunk], [s.question for s in chunk], spec.max_new_tokens,
                                    localizations=chunk_locs, localizer_s=0.0)
            items = []
            for j, (s, r) in enumerate(zip(chunk, out, strict=True)):
                layer_tokens = [r.extra["prompt_tokens"] - r.visual_tokens_in + c for c in visual_per_layer(
                    {k: [v] for k, v in r.visual_tokens_kept.items()}, 0, dims.layers)]
                row = {"id": s.id, "family": s.family, "question": s.question, "answer": s.answer,
                       "prediction": r.answer, **sample_scores(r.answer, s),
                       "box": r.box, "box_gt": None if s.box_grid is None else list(s.box_grid),
                       "fallback": r.localizer_fallback,
                       **({"self_localized": True} if r.extra.get("self_localized") else {}),
                       "visual_tokens_kept": r.visual_tokens_kept,
                       "equivalent_tokens": r.extra.get("equivalent_tokens"),
                       "flops": {"llm_prefill": prefill_flops(dims, layer_tokens),
                                 "selection": r.extra["selection_flops"],
                                 "localizer": loc_flops if uses_region else 0.0}}
                if store is None:
                    preds.append(row)
                elif todo[j]:  # a batch cut short by a kill is run again; only its missing rows are written
                    items.append({"run": index, "i": start + j, "id": s.id, "row": row})
            if store is not None:
                store.append(items)  # flushed and fsynced: this batch survives a kill from here on
            if progress is not None:
                progress(sum(todo))
        results.append({**header, "predictions": preds})

    if store is not None:
        if shard.rank != 0:
            return {}
        feasible = [index for index, r in enumerate(results) if "infeasible" not in r]
        store.wait_for(0 if localizer is None else len(samples),
                       [(index, i) for index in feasible for i in range(len(samples))])
        if localizer is not None:
            locs_at = dict(store.locs)
        for index in feasible:
            rows = [store.rows[(index, i)] for i in range(len(samples))]
            stale = [s.id for s, row in zip(samples, rows, strict=True) if row["id"] != s.id]
            if stale:
                raise ValueError(f"the progress files in {store.folder} hold other samples (first: id {stale[0]!r}); "
                                 f"use another --out or pass --fresh")
            results[index]["predictions"] = rows
    locs = [locs_at[i] for i in range(len(samples))]

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
        "versions": versions(),
        "git": git_hash(),
        "machine": machine(),
        "localization": localization_metrics(locs, samples),
        "runs": [{**summarize(r["predictions"], full_preds), **r} if r["predictions"] else r for r in results],
    }


class _Precomputed:
    """A placeholder localizer: the evaluation passes precomputed localizations to every call."""

    grid = 8

    def localize(self, images, questions):  # pragma: no cover - never called
        raise RuntimeError("evaluation passes precomputed localizations")


