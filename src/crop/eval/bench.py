"""Efficiency measurements: vision, localizer, LLM prefill, decode, KV cache, FLOPs, vs the ideal.

Everything runs in one process. Each repeat measures every case once, interleaved (full,
then each method x budget, then each budget's ideal), so slow drifts of the machine hit all
cases alike; medians and min/max over repeats are reported after a warm-up round.

Cases, for one batch of synthetic images and questions:

- ``full``: the unpruned model;
- ``crop-ilp@N``: all tokens for layers < K, then text + N visual tokens;
- ``crop-plc@N``: N visual tokens (region + pooled context) from layer 0;
- ``crop-self@N``: as ``crop-ilp@N``, the box found in the answerer's own attention (no localizer;
  its cost, the captured attention rows, is reported against the full prefill);
- ``ideal@N``: the ILP's N kept visual tokens fed from layer 0 (what a perfect pre-LLM selection
  would cost; ILP cannot reach it by construction, its first K layers see every token).

The LLM prefill is timed on precomputed image features (the vision tower is timed on its own,
once per repeat, and shared by every case); the localizer (prefill + box decode) is timed once
per repeat and charged to every CROP case's end-to-end time.

On a GPU every clock reading first waits for the queued kernels
(:func:`crop.models.loading.synchronize`), so a time covers the work it names and not just its launch.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList

from crop.api import PruningHandle
from crop.data.synth import generate
from crop.eval.flops import (
    DecoderDims,
    decode_flops,
    kv_cache_bytes,
    prefill_flops,
    vision_flops,
    visual_per_layer,
    vlm_localization_flops,
)
from crop.eval.matching import scale_budget
from crop.eval.provenance import git_hash, machine, versions
from crop.localizers.base import Localizer
from crop.methods import ALIASES, InnerLLMMethod, Option, check_options_used, config_builder, method_names
from crop.methods.self_region import self_localized_name
from crop.models import get_adapter
from crop.models.base import CompressedImage
from crop.models.loading import synchronize
from crop.pipeline import FirstTokenClock, cache_after_prefill, chat_prompt
from crop.regions import GridBox

logger = logging.getLogger(__name__)



@dataclass
class BenchSpec:
    """What to measure.

    Args:
        methods: registered method names (``full`` always runs, as the reference).
        keep_tokens: budgets as LLaVA-1.5 counts (of 576), scaled to the model's visual tokens.
        batches: batch sizes.
        repeats: measured rounds (after one warm-up round).
        new_tokens: tokens generated per answer (decode is timed over them).
        layer: ILP's K.
        pool: PLC's pooling block.
        seed: benchmark seed of the images/questions.
        options: ``[method or None, field, value]`` config fields to set (``--option``), as in
            :class:`crop.eval.runner.EvalSpec`.
    """

    methods: list[str]
    keep_tokens: list[int]
    batches: list[int]
    repeats: int = 3
    new_tokens: int = 32
    layer: int = 2
    pool: int = 4
    seed: int = 0
    options: list[list] = field(default_factory=list)

    def __post_init__(self) -> None:
        known = set(method_names()) | set(ALIASES)
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: full, {', '.join(method_names())}")
        if self.repeats < 1 or self.new_tokens < 2 or any(b < 1 for b in self.batches):
            raise ValueError("repeats >= 1, new_tokens >= 2 and batch sizes >= 1 are required")
        if any(k <= 0 for k in self.keep_tokens):
            raise ValueError(f"keep_tokens must be positive, got {self.keep_tokens}")
        check_options_used(self.methods, self.options)  # each names a known method and reaches one of them


def _sync() -> None:
    """Wait for every device's queued work before a clock reading (``torch.cuda.synchronize``; no-op on the CPU)."""
    synchronize()


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the seconds it took (device work included)."""
    _sync()
    start = time.perf_counter()
    out = fn(*args)
    _sync()
    return out, time.perf_counter() - start


class _Bench:
    """Measurements for one batch: builds each case's inputs and times generate on them."""

    def __init__(self, model, processor, localizer: Localizer | None, spec: BenchSpec, batch: int):
        self.model, self.processor, self.localizer, self.spec = model, processor, localizer, spec
        self.adapter = get_adapter(model)
        samples = list(generate(batch, spec.seed, "test"))
        self.images = [s.image for s in samples]
        self.questions = [s.question for s in samples]
        self.gt_boxes = [GridBox(*s.box_grid) for s in samples]
        tokenizer = processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            self.inputs = processor(images=self.images, text=[chat_prompt(processor, q) for q in self.questions],
                                    padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        self.spans = self.adapter.image_spans(self.inputs)
        self.visual = self.spans[0].length
        self.pad_id = tokenizer.pad_token_id
        self.boxes = self.gt_boxes

    def localize(self) -> float:
        if self.localizer is None:
            return 0.0
        locs, seconds = _timed(self.localizer.localize, self.images, self.questions)
        self.boxes = [loc.box for loc in locs]
        return seconds

    def encode(self) -> tuple[list[torch.Tensor], float]:
        return _timed(self.adapter.encode_images, self.inputs)

    def feature_inputs(self, feats: list[torch.Tensor], keep: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """Inputs that feed precomputed features (all of them, or only ``keep`` per image)."""
        images = []
        for i, f in enumerate(feats):
            idx = torch.arange(f.shape[0]) if keep is None else keep[i]
            images.append(CompressedImage(f[idx], idx))
        return self.adapter.compressed_inputs(self.inputs, self.spans, images)

    def generate(self, run: dict[str, Any]) -> dict[str, Any]:
        """Time one greedy generate: prefill (to the first token's scores) and decode per token."""
        clock = FirstTokenClock()
        n = self.spec.new_tokens
        _sync()
        start = time.perf_counter()
        out = self.model.generate(**run, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True,
                                  pad_token_id=self.pad_id)
        _sync()
        end = time.perf_counter()
        lengths, kv_bytes = cache_after_prefill(out, out.sequences.shape[1] -
                                                 run["input_ids"].shape[1] - 1)
        first = clock.first if clock.first is not None else end  # generate always scores a first token
        return {"prefill_s": first - start, "decode_s_per_token": (end - first) / (n - 1),
                "kv_cache_lengths": lengths, "kv_cache_bytes": kv_bytes}


def _time_encoding(adapter) -> list[float]:
    """Make this (per-handle) adapter instance add the seconds its image encoders take to the returned cell.

    A pre-LLM method's ``prepare`` runs the vision tower again; the benchmark charges the vision
    tower once per case (``vision_s``) and only the rest of ``prepare`` as selection/compression.
    """
    spent = [0.0]
    for name in ("encode_images", "encode_images_with_saliency"):
        original = getattr(adapter, name, None)
        if original is None:
            continue

        def timed(*args, _original=original, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _sync()
                spent[0] += time.perf_counter() - start

        setattr(adapter, name, timed)
    return spent


def _text_tokens(inputs, visual_in: list[int]) -> list[int]:
    mask = inputs.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(visual_in)
    return [int(n) - v for n, v in zip(lengths, visual_in, strict=True)]


def _selection_flops(handle: PruningHandle | None, bench: _Bench) -> int:
    """The method's own selection FLOPs over the batch (0 for the reference cases)."""
    if handle is None:
        return 0
    prompt = _text_tokens(bench.inputs, [0] * len(bench.spans))  # each sample's real prompt length
    return sum(handle.method.selection_flops(n, s.visual_tokens) for n, s in zip(prompt, bench.spans, strict=True))


def _self_localization_cost(samples: dict[str, dict[str, list]], budget: int) -> dict[str, float] | None:
    """CROP-self's extra prefill time over CROP-ILP at the same budget, as a share of the full prefill.

    Both keep the same tokens at every layer; the difference is the captured attention rows and
    the box search. Ratios are paired repeat by repeat (the cases are interleaved), then
    summarized (median, min, max).
    """
    own, ilp, full = (samples.get(n, {}).get("prefill_s") for n in (f"crop-self@{budget}", f"crop-ilp@{budget}", "full"))
    if not own or not ilp or not full:
        return None
    return _summary([(a - b) / f for a, b, f in zip(own, ilp, full, strict=True)])


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.no_grad()
def run_bench(model, processor, localizer: Localizer | None, spec: BenchSpec, model_name: str, localizer_name: str,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Measure every case for every batch size; returns the results document (JSON-ready).

    Everything runs without autograd: with it, encoding the images (and a pre-LLM method's
    prepare, which re-encodes) recorded the vision tower's activations for a backward pass
    that never comes, inflating the vision time and holding GBs (issue 16: 18 GB peak).
    """
    dims = DecoderDims.from_config(model.config.get_text_config())
    out_batches = []
    for batch in spec.batches:
        bench = _Bench(model, processor, localizer, spec, batch)
        budgets = [(k, scale_budget(k, bench.visual)) for k in spec.keep_tokens]
        methods = [m for m in spec.methods if ALIASES.get(m, m) != "none"]
        if getattr(localizer, "in_model", False):  # --localizer self: ILP finds its own box (CROP-self)
            methods = list(dict.fromkeys(self_localized_name(m) for m in methods))
        cases = [("full", None)] + [(m, b) for m in methods for b in budgets] + [("ideal", b) for b in budgets]
        shared = {"layer": spec.layer, "pool": spec.pool, "seed": spec.seed}  # for every method that has the field
        options = [Option.of(row) for row in spec.options]
        samples: dict[str, dict[str, list]] = {}
        kv_info: dict[str, dict[str, Any]] = {}
        kept_info: dict[str, Any] = {}
        for rep in range(spec.repeats + 1):  # round 0 is the warm-up
            localizer_s = bench.localize()
            feats, vision_s = bench.encode()
            full_run = bench.feature_inputs(feats)
            for method, budget in cases:
                name = method if budget is None else f"{method}@{budget[0]}"
                prepare_s, handle, uses_region = 0.0, None, False
                if budget is None:  # "full", the only case without a budget
                    run = full_run
                elif method == "ideal":  # the region's tokens under the budget, fed from layer 0
                    keep = [bench.adapter.select(s, box, budget[1]) for s, box in zip(bench.spans, bench.boxes,
                                                                                       strict=True)]
                    run = bench.feature_inputs(feats, keep)
                else:
                    handle = PruningHandle(model, config_builder(method, options, shared)(budget[1]))
                    uses_region = handle.method.uses_region
                    if isinstance(handle.method, InnerLLMMethod):  # prunes inside the LLM: run on the features
                        _, prepare_s = _timed(handle.prepare, bench.inputs, bench.boxes)
                        run = full_run
                    else:  # builds its own inputs; its prepare re-encodes, so charge only the rest
                        encode_s = _time_encoding(handle.adapter)
                        run, prepare_s = _timed(handle.prepare, bench.inputs, bench.boxes)
                        prepare_s = max(prepare_s - encode_s[0], 0.0)
                try:
                    with torch.no_grad():
                        measured = bench.generate(run)
                finally:
                    if handle is not None:
                        handle.remove()
                if rep == 0:
                    stats = handle.stats if handle is not None else None
                    kept_info[name] = {"stats": stats.visual_tokens_kept if stats else {"llm_input": [
                        int(k.numel()) for k in keep] if method == "ideal" else [bench.visual] * batch},
                        "equivalent": stats.equivalent_tokens if stats else None, "uses_region": uses_region,
                        "selection": _selection_flops(handle, bench)}
                    kv_info[name] = {"kv_cache_lengths": measured["kv_cache_lengths"],
                                     "kv_cache_bytes": measured["kv_cache_bytes"]}
                    continue
                crop_case = uses_region
                row = samples.setdefault(name, {k: [] for k in ("vision_s", "localizer_s", "prepare_s", "prefill_s",
                                                                 "decode_s_per_token", "end_to_end_s")})
                row["vision_s"].append(vision_s)
                row["localizer_s"].append(localizer_s if crop_case else 0.0)
                row["prepare_s"].append(prepare_s)
                row["prefill_s"].append(measured["prefill_s"])
                row["decode_s_per_token"].append(measured["decode_s_per_token"])
                row["end_to_end_s"].append(vision_s + (localizer_s if crop_case else 0.0) + prepare_s +
                                           measured["prefill_s"] + measured["decode_s_per_token"] * (spec.new_tokens - 1))
            if progress is not None:
                progress(1)
        out_batches.append(_batch_report(model, localizer, bench, dims, spec, batch, cases, samples, kv_info,
                                         kept_info))
    return {
        "model": model_name, "localizer": localizer_name, "spec": dict(spec.__dict__),
        "versions": versions(), "git": git_hash(),
        "machine": {**machine(), "threads": torch.get_num_threads()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batches": out_batches,
    }


def _batch_report(model, localizer, bench: _Bench, dims: DecoderDims, spec: BenchSpec, batch: int, cases,
                  samples, kv_info, kept_info) -> dict[str, Any]:
    """Medians, ratios and analytic numbers of one batch size."""
    text = [n + s.length - s.visual_tokens for n, s in zip(_text_tokens(bench.inputs, [s.length for s in bench.spans]),
                                                              bench.spans, strict=True)]  # structure counts as text
    loc_flops = vlm_localization_flops(localizer, bench.questions[0], bench.images[0])
    rows = {}
    for method, budget in cases:
        name = method if budget is None else f"{method}@{budget[0]}"
        kept = kept_info[name]["stats"]
        per_layer = [[t + c for c in visual_per_layer(kept, i, dims.layers)] for i, t in enumerate(text)]
        prefill = sum(prefill_flops(dims, layers) for layers in per_layer)
        half = spec.new_tokens // 2
        decode = sum(decode_flops(dims, [n + half for n in layers]) for layers in per_layer)
        # the cache holds keys and values in the model's dtype (2 bytes in bf16/fp16, 4 in float32)
        analytic_kv = sum(kv_cache_bytes(dims, layers, bytes_per_value=model.dtype.itemsize) for layers in per_layer)
        med = {k: _summary(v) for k, v in samples[name].items()}
        rows[name] = {
            "method": method, "keep_tokens_576": None if budget is None else budget[0],
            "keep_tokens": None if budget is None else budget[1],
            "visual_tokens_kept": kept, "equivalent_tokens": kept_info[name]["equivalent"], "timings": med,
            "flops": {"vision": vision_flops(model.config, bench.visual) * batch,
                      "localizer": loc_flops * batch if kept_info[name]["uses_region"] else 0,
                      "selection": kept_info[name]["selection"],
                      "llm_prefill": prefill, "decode_per_token": decode},
            "kv_cache_bytes": kv_info[name]["kv_cache_bytes"], "kv_cache_bytes_analytic": analytic_kv,
            "kv_cache_lengths": kv_info[name]["kv_cache_lengths"],
            "throughput_per_s": batch / med["end_to_end_s"]["median"],
        }
    full = rows["full"]
    for row in rows.values():
        t = row["timings"]
        row["prefill_speedup"] = full["timings"]["prefill_s"]["median"] / t["prefill_s"]["median"]
        row["prefill_speedup_analytic"] = full["flops"]["llm_prefill"] / row["flops"]["llm_prefill"]
        row["share_of_analytic"] = row["prefill_speedup"] / row["prefill_speedup_analytic"]
        row["decode_ratio"] = t["decode_s_per_token"]["median"] / full["timings"]["decode_s_per_token"]["median"]
        row["end_to_end_speedup"] = full["timings"]["end_to_end_s"]["median"] / t["end_to_end_s"]["median"]
        row["localizer_share_of_e2e"] = t["localizer_s"]["median"] / t["end_to_end_s"]["median"]
        row["kv_vs_analytic"] = row["kv_cache_bytes"] / row["kv_cache_bytes_analytic"]
        if row["method"] == "crop-self":  # its localizer is the capture: its cost vs the full prefill
            row["self_localization_cost"] = {
                "measured_share_of_full_prefill": _self_localization_cost(samples, row["keep_tokens_576"]),
                "analytic_share_of_full_prefill": row["flops"]["selection"] / full["flops"]["llm_prefill"]}
        if row["keep_tokens_576"] is not None and f"ideal@{row['keep_tokens_576']}" in rows:
            ideal = rows[f"ideal@{row['keep_tokens_576']}"]
            row["prefill_share_of_ideal"] = (row["prefill_speedup"] /
                                             (full["timings"]["prefill_s"]["median"] /
                                              ideal["timings"]["prefill_s"]["median"]))
    return {"batch": batch, "visual_tokens_per_image": bench.visual, "text_tokens": text, "cases": rows}
