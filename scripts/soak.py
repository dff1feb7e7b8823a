"""Soak test: thousands of pipeline calls in one process leave no hook, capture, handle or memory behind.

Usage:
    .venv/bin/python scripts/soak.py --out results/soak              # 2,000 calls (issue 32's figure)
    .venv/bin/python scripts/soak.py --calls 200 --out /tmp/soak     # a quick look
    .venv/bin/python scripts/soak.py --no-onednn --out results/soak/no-onednn   # without oneDNN's shape cache

Makes ``--calls`` :class:`crop.pipeline.CropPipeline` batch calls on tiny random models (every
architecture by default), each with a seeded random draw of the model, the method (every
registered one), the budget (a share of the model's visual tokens, some above them, some below
what a method can meet), the pruning layer, the batch size (1-4), the images (random sizes) and
the regions. One call in five goes through the bare API instead (``apply_method`` +
``handle.prepare`` + ``model.generate``), and the last such handle of each method is kept, so
removed handles are checked too. A budget a method cannot meet is refused by the library with a ``ValueError`` while
its handle is applied: such calls count as ``refused`` (and exercise the error path's cleanup).

Resident memory (``VmRSS`` of ``/proc/self/status``, after ``gc.collect()``) is read at the end of
the warm-up and every ``--every`` calls after it, twice: as the process holds it (``raw``), and
after glibc's ``malloc_trim(0)`` has handed the allocator's free pages back (the growth figure and
``--max-growth`` use this one: the allocator's cache of freed memory swings the raw reading by tens of
MiB with the shapes of the last calls, a leak grows both). The warm-up starts with one call per
(model, method) at the largest batch and image, so high-water marks are reached before the
baseline is taken. At the end it checks, per model, that every hook dict of every module is
as it was before (forward, pre-forward, backward, state-dict ...), that the state dict and a probe
forward are bit-identical, that no handle is active, and that no live handle, method, pruner,
capture, relay or adapter holds a tensor. Writes ``OUT/soak.json`` (figures, checks, command, git
hash, machine, versions) and ``OUT/README.md`` (a short table); exits 1 if a check fails or RSS
grew by ``--max-growth`` percent or more.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FunctionType, MethodType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

QUESTIONS = ("What color is the star?", "How many circles are there?", "What is left of the square?",
             "Is there a triangle?", "What shape is in the top right corner?")
MAX_BATCH = 4
IMAGE_SIDES = (64, 512)  # random width and height, in pixels
SHARES = (0.1, 0.25, 0.5, 0.9, 1.5)  # budgets as shares of the model's visual tokens for a square image
API_SHARE = 0.2  # calls made through apply_method + prepare + generate instead of the pipeline
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
# settings that change what RSS counts (recorded with the figures when set)
MEMORY_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "LD_PRELOAD")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


# -- what the checks read ------------------------------------------------------------------------

def rss_kib() -> int:
    """This process's resident set size now, in KiB (``VmRSS``; ``ru_maxrss`` would only give the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (this script needs Linux)")


def hook_name(hook: Any) -> str:
    """A readable name for a registered hook (its function's qualified name), for the report."""
    func = getattr(hook, "func", hook)  # functools.partial
    return str(getattr(func, "__qualname__", type(func).__name__))


def hook_snapshot(model: nn.Module) -> dict[str, list[str]]:
    """Every non-empty hook dict of every module (and parameter), as ``"module.dict": [hook names]``.

    Compared before and after: a method that left any kind of hook on any module shows up. Take it
    after one stock forward: transformers installs its own output-capturing hooks on the first one.
    """
    seen: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                seen[f"{name or '<model>'}.{attr}"] = sorted(map(hook_name, hooks.values()))
    for name, param in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            hooks = getattr(param, attr, None)
            if hooks:
                seen[f"{name}.{attr}"] = sorted(map(hook_name, hooks.values()))
    return seen


def global_hook_snapshot() -> dict[str, list[str]]:
    """The global module hooks (``torch.nn.modules.module.register_module_forward_hook`` ...), by dict."""
    from torch.nn.modules import module as module_mod

    return {name: sorted(map(hook_name, getattr(module_mod, name).values())) for name in GLOBAL_HOOKS
            if getattr(module_mod, name, None)}


def hook_diff(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """Where two snapshots differ: ``{"module.dict": {"before": [...], "after": [...]}}``."""
    return {k: {"before": before.get(k, []), "after": after.get(k, [])} for k in sorted(set(before) | set(after))
            if before.get(k, []) != after.get(k, [])}


def held_tensors(obj: Any, path: str = "", depth: int = 6, _seen: set[int] | None = None) -> list[str]:
    """Attribute paths under ``obj`` that lead to a tensor, not entering modules (the model's weights are its own).

    Walks instance attributes, dataclass fields, dicts, lists, tuples and sets down to ``depth``.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [path or "<self>"]
    if isinstance(obj, nn.Module | type | str | bytes | int | float | bool | type(None) | FunctionType | MethodType
                  | functools.partial):
        return []
    if isinstance(obj, dict):
        items: Iterable[tuple[str, Any]] = ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    elif hasattr(obj, "__dict__"):
        items = ((f"{path}.{k}", v) for k, v in vars(obj).items())
    else:
        return []
    found: list[str] = []
    for sub_path, value in items:
        found.extend(held_tensors(value, sub_path, depth - 1, seen))
    return found


def live_objects() -> dict[str, list[Any]]:
    """Live (after ``gc.collect()``) instances of the library's per-call objects, by kind."""
    from crop.api import PruningHandle
    from crop.methods.attention import QKCapture
    from crop.methods.base import PruningMethod
    from crop.methods.inner_llm import InnerLLMPruner
    from crop.models.base import VLMAdapter
    from crop.models.deepstack import DeepStackRelay

    kinds = {"handles": PruningHandle, "methods": PruningMethod, "pruners": InnerLLMPruner, "captures": QKCapture,
             "relays": DeepStackRelay, "adapters": VLMAdapter}
    gc.collect()
    found: dict[str, list[Any]] = {kind: [] for kind in kinds}
    for obj in gc.get_objects():
        for kind, cls in kinds.items():
            if issubclass(type(obj), cls):
                found[kind].append(obj)
    return found


def probe_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The stock model's logits for ``inputs`` (compared bit for bit before and after)."""
    with torch.no_grad():
        return model(**inputs).logits.clone()


# -- the calls -------------------------------------------------------------------------------------

class RandomBoxLocalizer:
    """A localizer that answers a seeded random box for every question (the soak varies regions too).

    Args:
        rng: the soak's random generator.
        grid: the grid side.
    """

    name = "random-box"

    def __init__(self, rng: random.Random, grid: int) -> None:
        self.rng = rng
        self.grid = grid

    def localize(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list:
        from crop.localizers.base import Localization
        from crop.regions import GridBox

        out = []
        for _ in images:
            x0, y0 = self.rng.randrange(self.grid), self.rng.randrange(self.grid)
            x1, y1 = self.rng.randint(x0, self.grid - 1), self.rng.randint(y0, self.grid - 1)  # inclusive corners
            out.append(Localization(GridBox(x0, y0, x1, y1, self.grid)))
        return out


@dataclass
class Model:
    """One soaked model: its processor, reference visual tokens and what the end checks compare against."""

    name: str
    model: nn.Module
    processor: Any
    visual_tokens: int
    compressor: str
    probe: dict[str, Any]
    logits: torch.Tensor
    state: dict[str, torch.Tensor]
    hooks: dict[str, list[str]]


@dataclass
class Call:
    """One drawn call."""

    model: str
    method: str
    keep_tokens: int
    layer: int
    batch: int
    sizes: list[tuple[int, int]]
    questions: list[str]
    max_new_tokens: int
    api: bool
    seed: int


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A seeded noise image of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def prompt_inputs(processor: Any, images: Sequence[Image.Image], questions: Sequence[str]) -> dict[str, Any]:
    """Left-padded processor inputs for (image, question) pairs, as the pipeline builds them."""
    from crop.pipeline import chat_prompt

    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(processor(images=list(images), text=[chat_prompt(processor, q) for q in questions],
                              padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = side


def prepare_model(name: str, model: nn.Module, processor: Any, folder: Path) -> Model:
    """Record what the end checks compare against, and a random compressor for ``crop-plc-trained``."""
    from crop.compressor import CompressorConfig, RegionCompressor, save_compressor
    from crop.models import get_adapter

    dim = model.config.get_text_config().hidden_size
    torch.manual_seed(dim)
    compressor = folder / f"compressor-{name}"
    save_compressor(RegionCompressor(CompressorConfig(dim=dim, max_queries=64)), compressor)
    probe = prompt_inputs(processor, [random_image(0, (336, 336)), random_image(1, (300, 200))],
                          ["What color is the star?", "Is there a circle?"])
    visual = get_adapter(model).image_spans(probe)[0].visual_tokens
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    logits = probe_logits(model, probe)  # first: transformers installs its own capturing hooks on a first forward
    return Model(name, model, processor, visual, str(compressor), probe, logits, state, hook_snapshot(model))


def draw_call(rng: random.Random, models: Sequence[Model], methods: Sequence[str], largest: tuple[str, str] | None
              = None, max_batch: int = MAX_BATCH, sides: tuple[int, int] = IMAGE_SIDES) -> Call:
    """A random call; ``largest=(model, method)`` draws that pair at the largest batch and images instead."""
    if largest is not None:
        name, method = largest
        batch, sizes = max_batch, [(sides[1], sides[1])] * max_batch
    else:
        name, method = rng.choice(models).name, rng.choice(methods)
        batch = rng.randint(1, max_batch)
        sizes = [(rng.randint(*sides), rng.randint(*sides)) for _ in range(batch)]
    visual = next(m.visual_tokens for m in models if m.name == name)
    return Call(model=name, method=method, keep_tokens=max(1, round(rng.choice(SHARES) * visual)),
                layer=rng.randint(1, 3), batch=batch, sizes=sizes,
                questions=[rng.choice(QUESTIONS) for _ in range(batch)], max_new_tokens=rng.randint(1, 4),
                api=largest is None and rng.random() < API_SHARE, seed=rng.randrange(2**31))


def run_call(call: Call, m: Model, rng: random.Random, kept: dict[str, Any]) -> str:
    """Make one call; returns ``"ok"`` or ``"refused"`` (the library said the budget cannot be met).

    An API call's handle is kept (removed) in ``kept[method]``, so the end checks see a removed handle of each method.
    """
    from crop.api import apply_method
    from crop.methods import build_config
    from crop.pipeline import CropPipeline
    from crop.regions import DEFAULT_GRID

    options = [("crop-plc-trained", "compressor", m.compressor)] if call.method == "crop-plc-trained" else []
    config = build_config(call.method, call.keep_tokens, options, shared={"layer": call.layer})
    images = [random_image(call.seed + i, size) for i, size in enumerate(call.sizes)]
    localizer = RandomBoxLocalizer(rng, int(getattr(config, "grid", DEFAULT_GRID)))  # region-free: no grid field
    try:
        if call.api:
            inputs = prompt_inputs(m.processor, images, call.questions)
            boxes = [loc.box for loc in localizer.localize(images, call.questions)]
            with apply_method(m.model, config) as handle, torch.no_grad():
                kept[call.method] = handle
                m.model.generate(**handle.prepare(inputs, boxes), max_new_tokens=call.max_new_tokens,
                                 do_sample=False, pad_token_id=m.processor.tokenizer.pad_token_id)
        else:
            CropPipeline(m.model, m.processor, localizer, config).answer_batch(images, call.questions,
                                                                              call.max_new_tokens)
    except ValueError as exc:
        if "cannot meet" not in str(exc):  # the budget solvers' refusal (PLC, PyramidDrop); anything else is a bug
            raise
        return "refused"
    return "ok"


# -- the soak ---------------------------------------------------------------------------------------

@dataclass
class SoakReport:
    """What a soak found (written to ``soak.json``)."""

    calls: int
    warmup_calls: int
    sample_every: int
    seed: int
    models: list[str]
    methods: list[str]
    duration_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    refused_by_method: dict[str, int] = field(default_factory=dict)
    calls_by_model: dict[str, int] = field(default_factory=dict)
    calls_by_method: dict[str, int] = field(default_factory=dict)
    calls_by_batch: dict[str, int] = field(default_factory=dict)
    api_calls: int = 0
    rss_kib: dict[str, float] = field(default_factory=dict)
    rss_samples: list[list[int]] = field(default_factory=list)
    hooks_left: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict)
    global_hooks_left: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    active_handles: int = 0
    kept_handles: int = 0
    live_objects: dict[str, int] = field(default_factory=dict)
    tensors_held: list[str] = field(default_factory=list)
    state_dict_unchanged: dict[str, bool] = field(default_factory=dict)
    forward_unchanged: dict[str, bool] = field(default_factory=dict)

    def problems(self, max_growth: float | None = None) -> list[str]:
        """Every failed check, one line each (empty: the soak passed)."""
        out = [f"hooks left on {name}: {diff}" for name, diff in self.hooks_left.items() if diff]
        out += [f"global module hooks left: {self.global_hooks_left}"] if self.global_hooks_left else []
        out += [f"{self.active_handles} handle(s) still active"] if self.active_handles else []
        if self.live_objects.get("handles", 0) > self.kept_handles:
            out.append(f"{self.live_objects['handles']} handles alive after the calls (the soak keeps "
                       f"{self.kept_handles})")
        out += [f"live handle(s) hold tensors: {', '.join(self.tensors_held[:5])}"] if self.tensors_held else []
        out += [f"{name}: state dict changed" for name, ok in self.state_dict_unchanged.items() if not ok]
        out += [f"{name}: forward output changed" for name, ok in self.forward_unchanged.items() if not ok]
        growth = self.rss_kib.get("growth_percent")
        if max_growth is not None and growth is not None and growth >= max_growth:
            out.append(f"RSS grew {growth:.2f}% after warm-up (limit {max_growth:g}%)")
        return out


def trim_heap() -> bool:
    """Hand the C allocator's free heap pages back to the OS (glibc ``malloc_trim(0)``); ``False`` where there is none.

    glibc keeps freed memory for reuse, so RSS after a call depends on the shapes of the last few
    calls (here it swings by ~60 MiB from call to call). Trimmed, RSS counts what is still allocated:
    a leak keeps growing it, the allocator's cache does not.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def rss_reading() -> tuple[int, int]:
    """``(raw, trimmed)`` RSS in KiB after a full garbage collection: as the process holds it, then after :func:`trim_heap`."""
    gc.collect()
    raw = rss_kib()
    trim_heap()
    return raw, rss_kib()


def rss_figures(samples: Sequence[Sequence[int]]) -> dict[str, float]:
    """The RSS figures of ``[call, raw KiB, trimmed KiB]`` readings: growth of the trimmed RSS, and the raw band."""
    base, end = samples[0][2], samples[-1][2]
    raw = [s[1] for s in samples]
    return {"after_warmup": base, "end": end, "max_after_warmup": max(s[2] for s in samples),
            "growth_percent": round(100 * (end - base) / base, 3),
            "slope_kib_per_1000_calls": round(slope_per_1000([[s[0], s[2]] for s in samples]), 1),
            "raw_after_warmup": raw[0], "raw_end": raw[-1], "raw_min_after_warmup": min(raw),
            "raw_max_after_warmup": max(raw), "raw_growth_percent": round(100 * (raw[-1] - raw[0]) / raw[0], 3)}


def slope_per_1000(samples: Sequence[Sequence[int]]) -> float:
    """Least-squares RSS slope over the samples, in KiB per 1,000 calls (0 for fewer than two samples)."""
    if len(samples) < 2:
        return 0.0
    x = np.array([s[0] for s in samples], dtype=float)
    y = np.array([s[1] for s in samples], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def soak(models: Sequence[Model], calls: int, warmup: int, every: int, seed: int = 0,
         methods: Sequence[str] | None = None, progress: Callable[[int, int], None] | None = None,
         max_batch: int = MAX_BATCH, sides: tuple[int, int] = IMAGE_SIDES) -> SoakReport:
    """Make ``calls`` calls on ``models`` and check what they left behind.

    Args:
        models: the prepared models (:func:`prepare_model`).
        calls: calls in all, warm-up included.
        warmup: calls before the RSS baseline (at least one per (model, method), the largest ones).
        every: calls between RSS readings after the warm-up.
        seed: the draw's seed.
        methods: method names (default: every registered one).
        progress: called after each call with ``(calls done, RSS KiB)``.
        max_batch: the largest batch drawn (batches are 1 to ``max_batch``).
        sides: the smallest and largest image width and height drawn, in pixels.

    Returns:
        The report; :meth:`SoakReport.problems` lists what failed.
    """
    from crop.methods import method_names

    methods = list(methods or method_names())
    rng = random.Random(seed)
    largest = [(m.name, method) for m in models for method in methods]
    warmup = min(calls, max(warmup, len(largest)))
    report = SoakReport(calls=calls, warmup_calls=warmup, sample_every=every, seed=seed,
                        models=[m.name for m in models], methods=methods)
    by_name = {m.name: m for m in models}
    outcomes: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    drawn: dict[str, Counter[str]] = {"model": Counter(), "method": Counter(), "batch": Counter()}
    kept: dict[str, Any] = {}
    global_before = global_hook_snapshot()
    start = time.perf_counter()
    rss = rss_kib()
    for i in range(calls):
        call = draw_call(rng, models, methods, largest[i] if i < len(largest) else None, max_batch, sides)
        outcome = run_call(call, by_name[call.model], rng, kept)
        outcomes[outcome] += 1
        refused[call.method] += outcome == "refused"
        for key, value in (("model", call.model), ("method", call.method), ("batch", str(call.batch))):
            drawn[key][value] += 1
        report.api_calls += call.api
        done = i + 1
        if done == warmup or (done > warmup and (done - warmup) % every == 0) or done == calls:
            raw, rss = rss_reading()
            report.rss_samples.append([done, raw, rss])
        if progress is not None:
            progress(done, rss)
    report.duration_s = round(time.perf_counter() - start, 1)
    report.outcomes = dict(outcomes)
    report.refused_by_method = {k: v for k, v in sorted(refused.items()) if v}
    report.calls_by_model, report.calls_by_method, report.calls_by_batch = (
        dict(sorted(drawn[k].items())) for k in ("model", "method", "batch"))
    report.rss_kib = rss_figures(report.rss_samples)
    report.kept_handles = len(kept)
    check_leftovers(report, models, global_before)
    return report


def check_leftovers(report: SoakReport, models: Sequence[Model], global_before: dict[str, list[str]]) -> None:
    """Fill the report's end checks: hooks, active handles, tensors held by live objects, the models unchanged."""
    from crop.api import _ACTIVE

    for m in models:
        report.hooks_left[m.name] = hook_diff(m.hooks, hook_snapshot(m.model))
        state = m.model.state_dict()
        report.state_dict_unchanged[m.name] = state.keys() == m.state.keys() and all(
            torch.equal(state[k], v) for k, v in m.state.items())
        report.forward_unchanged[m.name] = torch.equal(probe_logits(m.model, m.probe), m.logits)
    report.global_hooks_left = hook_diff(global_before, global_hook_snapshot())
    report.active_handles = sum(1 for m in models if _ACTIVE.get(m.model) is not None)
    live = live_objects()
    report.live_objects = {kind: len(objs) for kind, objs in live.items()}
    report.tensors_held = [f"{kind}: {label(obj)}{path}" for kind, objs in live.items() for obj in objs
                           for path in held_tensors(obj)]


def label(obj: Any) -> str:
    """A live object's class, with the method's name for a handle or a method (``PruningHandle[dart]``, ``DART[dart]``)."""
    name = getattr(getattr(obj, "method", obj), "name", None)
    return type(obj).__name__ + (f"[{name}]" if isinstance(name, str) else "")


# -- the script ---------------------------------------------------------------------------------------

def provenance() -> dict[str, Any]:
    """The command, git hash (and whether tracked files had uncommitted changes), machine and versions."""
    import os
    import subprocess

    from crop.eval.provenance import git_hash, machine, versions

    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout
    except (OSError, subprocess.SubprocessError):
        status = ""
    python = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable
    return {"command": " ".join([python, *sys.argv]), "git": git_hash(),
            "git_uncommitted_changes": bool(status.strip()),
            "machine": {**machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "versions": versions(), "environment": {k: os.environ[k] for k in MEMORY_ENV if k in os.environ}}


def readme(report: SoakReport, meta: dict[str, Any], problems: list[str]) -> str:
    """``OUT/README.md``: the figures as a short table."""
    rss = report.rss_kib
    rows = [("calls (warm-up included)", f"{report.calls:,} ({report.warmup_calls} warm-up)"),
            ("answered / refused budgets", f"{report.outcomes.get('ok', 0)} / {report.outcomes.get('refused', 0)}"),
            ("through the bare API", str(report.api_calls)),
            ("models", ", ".join(report.models)), ("methods", str(len(report.methods))),
            ("duration", f"{report.duration_s:.0f} s"),
            ("oneDNN", ("on" if meta["onednn"] else "off (--no-onednn)") + "".join(
                f", {k}={v}" for k, v in meta["environment"].items())),
            ("RSS after warm-up (trimmed)", f"{rss['after_warmup'] / 1024:.1f} MiB"),
            ("RSS at the end (trimmed)", f"{rss['end'] / 1024:.1f} MiB"),
            ("RSS growth after warm-up (trimmed)", f"{rss['growth_percent']:+.2f}% (slope "
                                                   f"{rss['slope_kib_per_1000_calls']:+.0f} KiB per 1,000 calls)"),
            ("raw RSS after warm-up / end / band", f"{rss['raw_after_warmup'] / 1024:.1f} / {rss['raw_end'] / 1024:.1f} "
                                                   f"MiB ({rss['raw_growth_percent']:+.2f}%); "
                                                   f"{rss['raw_min_after_warmup'] / 1024:.1f}-"
                                                   f"{rss['raw_max_after_warmup'] / 1024:.1f} MiB"),
            ("hooks left / active handles / tensors held", f"{sum(len(d) for d in report.hooks_left.values())} / "
                                                          f"{report.active_handles} / {len(report.tensors_held)}"),
            ("state dict and probe forward bit-identical", str(all(report.state_dict_unchanged.values())
                                                              and all(report.forward_unchanged.values()))),
            ("result", "pass" if not problems else "FAIL: " + "; ".join(problems))]
    lines = ["# Soak: pipeline calls in one process", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"Command: `{meta['command']}` at git `{meta['git']}`; torch {meta['versions']['torch']}, "
              f"transformers {meta['versions']['transformers']}; {meta['machine']['platform']}, "
              f"{meta['machine']['cpus']} CPUs. Figures and every RSS reading: `soak.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from crop.models.tiny import TINY_MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Example: .venv/bin/python scripts/soak.py --out results/soak")
    parser.add_argument("--calls", type=int, default=2000, help="calls in all, warm-up included (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: a tenth of --calls, "
                        "at least one per model and method)")
    parser.add_argument("--every", type=int, default=50, help="calls between RSS readings (default %(default)s)")
    parser.add_argument("--models", default=",".join(TINY_MODEL_NAMES),
                        help="comma-separated tiny random model names (default: every architecture)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    parser.add_argument("--no-onednn", action="store_true",
                        help="turn oneDNN (torch.backends.mkldnn) off: its primitive cache keeps one entry per new "
                             "input shape, up to ONEDNN_PRIMITIVE_CACHE_CAPACITY (1,024 by default), and so grows "
                             "RSS with random image sizes until it is full")
    parser.add_argument("--max-growth", type=float, default=5.0,
                        help="RSS growth after warm-up, in percent, that fails the soak (default %(default)s)")
    parser.add_argument("--out", required=True, help="output folder for soak.json and README.md")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.every < 1:
        parser.error("--calls and --every must be >= 1")
    torch.set_num_threads(args.threads)
    if args.no_onednn:
        torch.backends.mkldnn.enabled = False
    # random regions often fall outside LLaVA's centre-cropped view: the pipeline's warning about it is expected
    logging.getLogger("crop").setLevel(logging.ERROR)

    from tqdm import tqdm

    from crop.models.loading import load_model

    with tempfile.TemporaryDirectory(prefix="crop-soak-") as tmp:
        models = []
        for name in args.models.split(","):
            model, processor = load_model(name.strip())
            models.append(prepare_model(name.strip(), model, processor, Path(tmp)))
        warmup = args.warmup if args.warmup is not None else args.calls // 10
        with tqdm(total=args.calls, desc="soak", unit="call", file=sys.stderr) as bar:
            def progress(done: int, rss: int) -> None:
                bar.set_postfix_str(f"RSS {rss / 1024:.0f} MiB", refresh=False)
                bar.update(1)

            report = soak(models, args.calls, warmup, args.every, args.seed, progress=progress)
    problems = report.problems(args.max_growth)
    meta = {**provenance(), "onednn": torch.backends.mkldnn.enabled}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {**meta, "target_growth_percent": args.max_growth, "passed": not problems, "problems": problems,
                **dataclasses.asdict(report)}
    (out / "soak.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme(report, meta, problems), encoding="utf-8")
    rss = report.rss_kib
    print(f"{report.calls} calls in {report.duration_s:.0f} s: RSS (trimmed) {rss['after_warmup'] / 1024:.1f} MiB "
          f"after warm-up, {rss['end'] / 1024:.1f} MiB at the end ({rss['growth_percent']:+.2f}%; raw "
          f"{rss['raw_growth_percent']:+.2f}%); "
          + ("all checks pass" if not problems else "FAILED: " + "; ".join(problems)))
    print(f"wrote {out / 'soak.json'} and {out / 'README.md'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
