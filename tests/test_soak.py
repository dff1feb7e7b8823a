"""Steady over many calls (issue 32): nothing is left on the model, and an interrupted ``generate`` undoes itself.

The soak is ``scripts/soak.py`` run small (its 2,000-call figures are in ``results/soak``); the
interrupt tests raise ``KeyboardInterrupt`` inside ``generate`` (from a logits processor at a
given step, or from a decoder layer mid-prefill) while a method is applied through the pipeline
or through ``apply_method``'s ``with`` block.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import crop.pipeline
from crop.api import _ACTIVE, apply_method
from crop.localizers import FixedBoxLocalizer
from crop.methods import build_config, method_names
from crop.models import get_adapter
from crop.pipeline import CropPipeline
from crop.regions import GridBox
from tests.conftest import chat_inputs, random_image, tiny

SOAK_PATH = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("crop_soak_script", SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


soak = _load_soak()
REAL_METHODS = [m for m in method_names() if not m.startswith("test-")]  # test files may register test-* methods

# Known: these methods keep their last prompt's tensors on the method after remove() (found by the soak);
# detach() should drop them. Strict: the test fails once they are fixed, so the marks come off then.
KEEPS_PROMPT_TENSORS: dict[str, str] = {}


def test_sixty_calls_leave_no_hook_or_active_handle_and_the_models_bit_identical(tmp_path):
    names = ("tiny-random-llava", "tiny-random-qwen2-vl")
    models = [soak.prepare_model(n, *tiny(n), tmp_path) for n in names]  # after a stock forward: its hooks in
    before = {n: {k: v.clone() for k, v in tiny(n)[0].state_dict().items()} for n in names}
    report = soak.soak(models, calls=60, warmup=0, every=8, seed=3, methods=REAL_METHODS, max_batch=3,
                       sides=(48, 160))
    # no RSS limit here (60 calls say nothing about memory); tensors kept by removed handles: see below
    assert [p for p in report.problems() if "hold tensors" not in p] == []
    assert {entry.split("[")[1].split("]")[0] for entry in report.tensors_held} <= set(KEEPS_PROMPT_TENSORS)
    assert report.outcomes.get("ok", 0) >= 40 and sum(report.outcomes.values()) == 60
    assert set(report.calls_by_model) == set(names) and set(report.calls_by_method) == set(REAL_METHODS)
    assert report.api_calls >= 3 and report.live_objects["handles"] == report.kept_handles >= 3  # one per method
    assert len(report.rss_samples) >= 4 and report.rss_samples[0][0] == report.warmup_calls == 2 * len(REAL_METHODS)
    for name, m in zip(names, models, strict=True):  # checked here too, not only by the script's own checks
        model, processor = tiny(name)
        assert soak.hook_snapshot(model) == m.hooks and _ACTIVE.get(model) is None
        state = model.state_dict()
        assert state.keys() == before[name].keys() and all(torch.equal(state[k], v) for k, v in before[name].items())
        assert torch.equal(model(**m.probe).logits, m.logits)


def test_the_checks_see_a_left_hook_a_held_tensor_and_a_changed_weight(tmp_path):
    model, processor = tiny("tiny-random-llava")
    m = soak.prepare_model("tiny-random-llava", model, processor, tmp_path)

    def left_behind(module, args):
        return None

    hook = model.model.language_model.layers[1].register_forward_pre_hook(left_behind)
    try:
        assert soak.hook_diff(m.hooks, soak.hook_snapshot(model)) == {"model.language_model.layers.1._forward_pre_hooks": {
            "before": [], "after": [left_behind.__qualname__]}}
    finally:
        hook.remove()
    assert soak.hook_snapshot(model) == m.hooks

    class Holder:
        def __init__(self):
            self.stats = {"kept": [1, 2]}
            self.model = model  # modules are not searched: their weights are their own
            self.nested = [{"rows": torch.zeros(2)}]

    assert soak.held_tensors(Holder()) == [".nested[0]['rows']"]
    report = soak.SoakReport(calls=1, warmup_calls=1, sample_every=1, seed=0, models=[], methods=[])
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[0, 0] += 1
        try:
            soak.check_leftovers(report, [m], {})
        finally:
            weight[0, 0] -= 1
    assert report.problems() == ["tiny-random-llava: state dict changed", "tiny-random-llava: forward output changed"]
    report.rss_kib = {"growth_percent": 7.5}
    assert "RSS grew 7.50%" in report.problems(max_growth=5)[-1]


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KEEPS_PROMPT_TENSORS[m]))
    if m in KEEPS_PROMPT_TENSORS else m for m in REAL_METHODS])
def test_a_removed_handle_holds_no_tensor(method, tmp_path):
    """After ``remove()`` a handle (its method, pruners, captures, adapter) keeps nothing of the prompt it ran."""
    model, processor = tiny("tiny-random-qwen3-vl")  # its adapter passes DeepStack features between stages
    m = soak.prepare_model("tiny-random-qwen3-vl", model, processor, tmp_path)
    options = [("crop-plc-trained", "compressor", m.compressor)] if method == "crop-plc-trained" else []
    inputs = chat_inputs(processor, [random_image(7), random_image(8, (300, 200))], ["Is it red?", "How many?"])
    with apply_method(model, build_config(method, m.visual_tokens // 2, options)) as handle:
        model.generate(**handle.prepare(inputs, [BOX, BOX]), max_new_tokens=2, do_sample=False)
        assert handle.stats is not None
    assert soak.held_tensors(handle) == []


def test_a_refused_budget_leaves_no_tensor_on_the_handle():
    model, processor = tiny("tiny-random-qwen3-vl")
    handle = apply_method(model, build_config("crop-plc", 2))  # below PLC's pooled context: refused in prepare
    with pytest.raises(ValueError, match="cannot meet"), handle:
        handle.prepare(chat_inputs(processor, [random_image(7)], ["Is it red?"]), [BOX])
    assert soak.held_tensors(handle) == []


def interrupt(model, raised: list[bool]):
    """Raise ``KeyboardInterrupt``, noting in ``raised`` whether a method was applied to ``model`` at that moment."""
    raised.append(_ACTIVE.get(model) is not None)
    raise KeyboardInterrupt


class InterruptAt(LogitsProcessor):
    """Raises ``KeyboardInterrupt`` when called for the ``step``-th time (step 1: right after the prefill)."""

    def __init__(self, step: int, model, raised: list[bool]) -> None:
        self.step, self.calls, self.model, self.raised = step, 0, model, raised

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            interrupt(self.model, self.raised)
        return scores


INTERRUPTS = ["after-prefill", "after-decode-step", "inside-prefill"]
MODELS = ["tiny-random-llava", "tiny-random-qwen3-vl"]  # Qwen3-VL: the DeepStack relay's hooks too
METHODS = ["crop-ilp", "fastv", "crop-plc"]  # inner-LLM (hooks on the layers, a capture) and pre-LLM
BOX = GridBox(1, 1, 4, 5)


def _raise_inside(model, where: str, raised: list[bool]):
    """For ``inside-prefill``: the test's own hook on the last decoder layer, raising in the first forward."""
    if where != "inside-prefill":
        return None
    return model.model.language_model.layers[-1].register_forward_pre_hook(lambda m, a: interrupt(model, raised))


def _step(where: str) -> int:
    """The logits-processor call that raises (none for ``inside-prefill``)."""
    return {"after-prefill": 1, "after-decode-step": 2}.get(where, 10**9)


def _interrupted_pipeline(model, processor, config, where, raised, monkeypatch):
    # the pipeline's own logits processor (its first-token clock) is the one that raises
    monkeypatch.setattr(crop.pipeline, "FirstTokenClock", lambda: InterruptAt(_step(where), model, raised))
    pipe = CropPipeline(model, processor, FixedBoxLocalizer(BOX), config)
    with pytest.raises(KeyboardInterrupt):
        pipe(random_image(7), "What color is the star?", max_new_tokens=4)
    monkeypatch.undo()


def _interrupted_api(model, processor, config, where, raised):
    inputs = chat_inputs(processor, [random_image(7)], ["What color is the star?"])
    with pytest.raises(KeyboardInterrupt), apply_method(model, config) as handle:
        model.generate(**handle.prepare(inputs, [BOX]), max_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([InterruptAt(_step(where), model, raised)]))


@pytest.mark.parametrize("where", INTERRUPTS)
@pytest.mark.parametrize("path", ["pipeline", "apply_method"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_keyboard_interrupt_in_generate_leaves_the_model_as_it_was(name, method, path, where, monkeypatch):
    model, processor = tiny(name)
    visual = get_adapter(model).image_spans(chat_inputs(processor, [random_image(7)], ["?"]))[0].visual_tokens
    config = build_config(method, visual // 2)  # half the image's tokens: every method here can meet it
    probe = chat_inputs(processor, [random_image(5), random_image(6, (300, 200))], ["Is it red?", "How many?"])
    logits = model(**probe).logits  # also installs transformers' own output-capturing hooks, before the snapshot
    hooks = soak.hook_snapshot(model)
    pipe = CropPipeline(model, processor, FixedBoxLocalizer(BOX), config)
    answer = pipe(random_image(7), "What color is the star?", max_new_tokens=4)
    side = processor.tokenizer.padding_side

    raised: list[bool] = []
    own_hook = _raise_inside(model, where, raised)
    try:
        if path == "pipeline":
            _interrupted_pipeline(model, processor, config, where, raised, monkeypatch)
        else:
            _interrupted_api(model, processor, config, where, raised)
    finally:
        if own_hook is not None:
            own_hook.remove()

    assert raised == [True]  # interrupted once, inside generate, while the method was applied

    assert soak.hook_diff(hooks, soak.hook_snapshot(model)) == {}  # no pruner, capture, relay or guard hook left anywhere
    assert _ACTIVE.get(model) is None  # no handle left active: the next apply is not refused
    assert processor.tokenizer.padding_side == side
    assert torch.equal(model(**probe).logits, logits)  # the stock model, bit for bit
    again = pipe(random_image(7), "What color is the star?", max_new_tokens=4)  # nothing carried into the next call
    assert (again.answer, again.visual_tokens_kept, again.full_resolution_tokens) == \
        (answer.answer, answer.visual_tokens_kept, answer.full_resolution_tokens)
