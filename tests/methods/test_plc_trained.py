"""The trained PLC: the compressor module, the anchors + compressed split, order and positions, save/load."""

from __future__ import annotations

import pytest
import torch

from crop.api import apply_method
from crop.compressor import (
    CompressorConfig,
    RegionCompressor,
    compressor_flops,
    grid_coordinates,
    load_compressor,
    save_compressor,
)
from crop.config import CropPLCTrainedConfig
from crop.methods.plc_trained import compress_with, split_budget
from crop.models import get_adapter
from crop.regions import GridBox
from tests.conftest import chat_inputs, random_compressor, random_image, tiny

IMAGES = [random_image(61, (400, 300)), random_image(62, (336, 500))]
QUESTIONS = ["What color is the star?", "How many circles are there?"]


def test_an_untrained_compressor_outputs_mixes_of_the_tokens_it_may_read():
    torch.manual_seed(0)
    comp = RegionCompressor(CompressorConfig(dim=8, max_queries=5))
    tokens = torch.randn(12, 8)
    attend = torch.zeros(12, dtype=torch.bool)
    attend[3:7] = True
    out, weights = comp(tokens, grid_coordinates([(3, 4)]), 5, attend)
    assert out.shape == (5, 8) and weights.shape == (5, 12)
    assert torch.all(weights[:, ~attend] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(out, weights @ tokens)  # the residual MLP starts at zero
    with pytest.raises(ValueError, match="1 to 5"):
        comp(tokens, grid_coordinates([(3, 4)]), 6)
    with pytest.raises(ValueError, match="another answerer"):
        comp(torch.randn(12, 9), grid_coordinates([(3, 4)]), 2)


def test_save_and_load_round_trip(tmp_path):
    comp = RegionCompressor(CompressorConfig(dim=8, max_queries=4, key_dim=16))
    save_compressor(comp, tmp_path / "c", {"answerer": "test"})
    loaded, meta = load_compressor(tmp_path / "c")
    assert meta["answerer"] == "test" and loaded.config == comp.config
    for (name, a), (_, b) in zip(comp.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="crop train plc"):
        load_compressor(tmp_path / "missing")


def test_budget_split():
    assert split_budget(CropPLCTrainedConfig(keep_tokens=64), 64) == (48, 16)
    assert split_budget(CropPLCTrainedConfig(keep_tokens=64, context_share=0.9), 32) == (32, 32)  # bank caps M
    assert split_budget(CropPLCTrainedConfig(keep_tokens=3, context_share=0.01), 8) == (2, 1)  # at least one
    assert split_budget(CropPLCTrainedConfig(keep_tokens=20, anchors=False), 64) == (0, 20)
    with pytest.raises(ValueError, match="at most 8"):
        split_budget(CropPLCTrainedConfig(keep_tokens=20, anchors=False), 8)
    with pytest.raises(ValueError, match="needs keep_tokens"):
        CropPLCTrainedConfig(keep_tokens=None)
    with pytest.raises(ValueError, match="attend"):
        CropPLCTrainedConfig(attend="inside")


def _one_image(name: str):
    """``(adapter, span, features, compressor, its folder)`` for one prompt on a tiny model."""
    model, proc = tiny(name)
    adapter = get_adapter(model)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    folder = random_compressor(adapter.text_config.hidden_size)
    comp, _ = load_compressor(folder)
    return adapter, adapter.image_spans(inputs)[0], adapter.encode_images(inputs)[0], comp, folder


@pytest.mark.parametrize("name", ["tiny-random-llava", "tiny-random-llava-next", "tiny-random-qwen2-vl"])
def test_anchors_are_the_region_tokens_and_every_token_sits_at_its_source(name):
    adapter, span, features, comp, folder = _one_image(name)
    box = GridBox(2, 2, 5, 4)
    config = CropPLCTrainedConfig(keep_tokens=40, compressor=folder)
    image, anchors = compress_with(comp, adapter, config, features, span, box)
    assert anchors == adapter.select(span, box, 30).tolist()
    assert image.visual_tokens == 40
    assert torch.equal(image.source, image.source.sort().values)  # placed in span order of their sources
    for anchor in anchors:  # each anchor is its own feature, at its own position
        where = (image.source == anchor).nonzero()[0, 0]
        assert torch.equal(image.tokens[where], features[anchor])
    if span.grids and any(g.stride > g.cols for g in span.grids):  # LLaVA-NeXT: newlines of rows with a source
        assert image.structure > 0


def test_outside_queries_never_read_the_anchors_and_the_ablation_has_none():
    adapter, span, features, comp, folder = _one_image("tiny-random-llava")
    box = GridBox(0, 0, 3, 3)
    seen = {}
    hook = comp.register_forward_hook(lambda m, a, out: seen.update(attend=a[3] if len(a) > 3 else None,
                                                                    weights=out[1]))
    try:
        _, anchors = compress_with(comp, adapter, CropPLCTrainedConfig(keep_tokens=40, compressor=folder), features,
                                   span, box)
        assert torch.all(seen["weights"][:, anchors] == 0)
        _, none = compress_with(comp, adapter, CropPLCTrainedConfig(keep_tokens=40, compressor=folder, anchors=False),
                                features, span, box)
        assert none == [] and seen["attend"] is None  # no anchors: the queries read every token
        compress_with(comp, adapter, CropPLCTrainedConfig(keep_tokens=40, compressor=folder, attend="all"), features,
                      span, box)
        assert seen["attend"] is None
    finally:
        hook.remove()


def test_method_runs_in_a_batch_and_refuses_another_answerers_compressor(tmp_path):
    model, proc = tiny("tiny-random-llava")
    inputs = chat_inputs(proc, IMAGES, QUESTIONS)
    folder = random_compressor(get_adapter(model).text_config.hidden_size)
    boxes = [GridBox(1, 1, 3, 3), GridBox(4, 4, 7, 7)]
    with apply_method(model, CropPLCTrainedConfig(keep_tokens=24, compressor=folder)) as h:
        run = h.prepare(inputs, boxes)
        logits = model(**run).logits
        assert h.stats.visual_tokens_kept["llm_input"] == [24, 24]
        assert h.stats.region_tokens == [18, 18]
        # its cost is the compressor's forward making 6 of the 24 tokens (context_share 0.25) from all of them
        assert h.method.selection_flops(200, 144) == compressor_flops(h.method.compressor.config, 144, 6) > 0
    assert torch.isfinite(logits).all()
    other = save_compressor(RegionCompressor(CompressorConfig(dim=7)), tmp_path / "other")
    with apply_method(model, CropPLCTrainedConfig(keep_tokens=24, compressor=str(other))) as h:
        with pytest.raises(ValueError, match="belongs to the answerer"):
            h.prepare(inputs, boxes)
    with apply_method(model, CropPLCTrainedConfig(keep_tokens=24, compressor=str(tmp_path / "none"))) as h:
        with pytest.raises(ValueError, match="crop train plc"):
            h.prepare(inputs, boxes)


def test_a_setting_the_compressor_was_not_trained_with_is_warned_about(tmp_path, caplog):
    model, proc = tiny("tiny-random-llava")
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    dim = get_adapter(model).text_config.hidden_size
    torch.manual_seed(0)
    folder = save_compressor(RegionCompressor(CompressorConfig(dim=dim, max_queries=32)), tmp_path / "no-anchors",
                             {"method": {"context_share": 0.25, "anchors": False, "attend": "outside"}})
    box = [GridBox(1, 1, 3, 3)]
    with caplog.at_level("WARNING", logger="crop.methods.plc_trained"):
        with apply_method(model, CropPLCTrainedConfig(keep_tokens=24, compressor=str(folder), anchors=False)) as h:
            h.prepare(inputs, box)
        assert not caplog.records  # the setting it was trained with: silent
        with apply_method(model, CropPLCTrainedConfig(keep_tokens=24, compressor=str(folder))) as h:
            h.prepare(inputs, box)
    (record,) = caplog.records
    assert "anchors=True (trained with False)" in record.getMessage()


def test_gradients_reach_the_compressor_through_the_frozen_answerer():
    model, proc = tiny("tiny-random-llava")
    adapter = get_adapter(model)
    inputs = chat_inputs(proc, IMAGES[:1], QUESTIONS[:1])
    span = adapter.image_spans(inputs)[0]
    comp = RegionCompressor(CompressorConfig(dim=adapter.text_config.hidden_size, max_queries=8))
    config = CropPLCTrainedConfig(keep_tokens=20, compressor="unused")
    with torch.enable_grad():
        features = adapter.encode_images(inputs)[0].detach()
        image, _ = compress_with(comp, adapter, config, features, span, GridBox(0, 0, 2, 2))
        run = adapter.compressed_inputs(inputs, [span], [image])
        loss = model(**run).logits[:, -1].logsumexp(-1).sum()
        loss.backward()
    assert comp.queries.grad is not None and comp.queries.grad.abs().sum() > 0
    assert comp.mlp[-1].weight.grad.abs().sum() > 0


def test_the_recipe_trains_resumes_and_serves(tmp_path, capsys):
    from crop.cli import main
    from crop.train.plc import PLCTrainConfig, synth_examples, train_plc

    model, proc = tiny("tiny-random-llava")
    train = synth_examples(1, seed=3)
    config = PLCTrainConfig(steps=12, batch_size=1, lr=3e-2, warmup_steps=1, budgets=(64,), checkpoint_every=6)
    out = tmp_path / "compressor"
    summary = train_plc(model, proc, train, config, tmp_path / "run", out, "tiny-random-llava", progress=False)
    assert summary["steps_run"] == 12 and summary["loss_last_10"] < summary["loss_first_10"]  # it learns the answer
    assert all(not p.requires_grad for p in model.parameters())  # the answerer stays frozen
    _, meta = load_compressor(out)
    assert meta["answerer"] == "tiny-random-llava" and "ground-truth region box" in (out / "MODEL_CARD.md").read_text()
    longer = PLCTrainConfig(steps=14, batch_size=1, lr=3e-2, warmup_steps=1, budgets=(64,), checkpoint_every=6)
    resumed = train_plc(model, proc, train, longer, tmp_path / "run", out, "tiny-random-llava", resume=True,
                        progress=False)
    assert resumed["steps_run"] == 14
    for p in model.parameters():
        p.requires_grad_(True)  # the cached test model as other tests expect it
    assert main(["answer", "--sample", "What color is the star?", "--model", "tiny-random-llava", "--localizer",
                 "box:1,1,4,4", "--method", "crop-plc-trained", "--keep-tokens", "40", "--option",
                 f"compressor={out}", "--max-new-tokens", "2"]) == 0
    assert "llm_input: 40" in capsys.readouterr().out


def test_the_recipe_with_lora_saves_the_merged_answerer(tmp_path):
    pytest.importorskip("peft")
    from crop.models.tiny import build_tiny_model
    from crop.train.plc import PLCTrainConfig, synth_examples, train_plc

    model, proc = build_tiny_model("tiny-random-llava", seed=0)  # its own copy: LoRA wraps the model
    config = PLCTrainConfig(steps=2, batch_size=1, warmup_steps=1, budgets=(64,), lora=True, lora_rank=2)
    train_plc(model, proc, synth_examples(2, seed=0), config, tmp_path / "run", tmp_path / "out", "tiny",
              progress=False)
    assert (tmp_path / "out" / "answerer" / "config.json").is_file()
    assert (tmp_path / "out" / "compressor.safetensors").is_file()


def test_two_processes_train_the_compressor_one_process_trains(tmp_path):
    """Data parallel through accelerate (2 CPU processes, gloo; what ``accelerate launch`` runs on GPUs)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def run(name: str, launcher: list[str]):
        out = tmp_path / name
        proc = subprocess.run([*launcher, "-m", "crop", "train", "plc", "--answerer", "tiny-random-llava", "--n-train",
                               "4", "--steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--budgets", "64",
                               "--run-dir", str(tmp_path / f"run-{name}"), "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(out / "compressor.safetensors"), json.loads(proc.stdout[proc.stdout.index("{"):])

    one, s1 = run("one", [sys.executable])
    two, s2 = run("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29534"])
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s1["loss_first_10"] == pytest.approx(s2["loss_first_10"], rel=1e-5)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
