"""``crop bench`` on tiny-random-llava with one repeat (fast; the numbers themselves are noise here)."""

from __future__ import annotations

import json

import pytest
import torch

from crop.cli import main
from crop.eval.flops import (
    DecoderDims,
    decode_flops,
    kv_cache_bytes,
    llava_vision_flops,
    localization_flops,
    prefill_flops,
    vit_flops,
)


def test_flops_ratios_follow_token_counts():
    dims = DecoderDims(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=356)
    full = prefill_flops(dims, [600] * 4)
    ilp = prefill_flops(dims, [600, 600, 100, 100])
    ideal = prefill_flops(dims, [100] * 4)
    assert ideal < ilp < full
    assert full / ilp == pytest.approx(2 * full / (full + prefill_flops(dims, [100] * 4)), rel=1e-2)
    assert kv_cache_bytes(dims, [600, 600, 100, 100]) == 1400 * 2 * 2 * 16 * 4


def test_vision_and_localization_flops_from_configs():
    from crop.models.tiny import LlavaShape, QwenShape, llava_config, qwen_config

    qwen = qwen_config("qwen2_vl", QwenShape(vision_hidden=32, vision_layers=2, text_hidden=32, text_heads=2,
                                             text_kv_heads=1, text_intermediate=64, text_layers=3))
    dims = DecoderDims.from_config(qwen.get_text_config())
    vision = vit_flops(64, 32, 64, 2, 4704)  # Qwen2-VL vision: embed_dim 32, mlp_ratio 2, depth 2
    one = localization_flops(qwen, 100, 64, 4704, 1)
    assert one == prefill_flops(dims, [100] * 3) + vision  # one token: its logits come from the prefill
    two = localization_flops(qwen, 100, 64, 4704, 2)
    assert two - one == decode_flops(dims, [100] * 3)  # the second token is one decode step
    llava = llava_config(LlavaShape(image_size=112, patch_size=14, vision_hidden=32, text_hidden=32,
                                    text_intermediate=64, text_layers=2), 300, 299)
    per_image = llava_vision_flops(llava, 64)
    assert per_image > vit_flops(65, 32, 0, 0, 3 * 14 * 14)  # patch embedding (CLS included) plus blocks
    assert llava_vision_flops(llava, 16) < per_image


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny-random-llava", "--repeats", "1", "--new-tokens", "3", "--keep-tokens",
                 "64", "--batch", "1", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").exists() and (out / "bench.png").stat().st_size > 1000
    cases = results["batches"][0]["cases"]
    assert set(cases) == {"full", "crop-ilp@64", "crop-plc@64", "ideal@64"}
    ilp = cases["crop-ilp@64"]
    assert ilp["visual_tokens_kept"]["after_layer_2"] == [64]
    lengths = ilp["kv_cache_lengths"]
    assert lengths[0] == lengths[1] == lengths[2] + 512 == lengths[3] + 512
    for row in cases.values():
        assert row["kv_vs_analytic"] == pytest.approx(1.0)  # batch 1: no padding, the cache is exactly the kept tokens
        assert row["timings"]["prefill_s"]["median"] > 0 and row["flops"]["llm_prefill"] > 0
    assert cases["full"]["flops"]["llm_prefill"] > ilp["flops"]["llm_prefill"] > cases["ideal@64"]["flops"]["llm_prefill"]
    assert cases["crop-plc@64"]["visual_tokens_kept"]["llm_input"] == [64]
    (out / "bench.md").unlink()
    assert main(["bench", "--render-only", "--out", str(out)]) == 0  # reports are rendered from the JSON alone
    assert "share of layer-interpolated" in (out / "bench.md").read_text()


def test_bench_charges_the_embedded_localizer(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny-random-llava", "--localizer", "embedded", "--methods", "crop-ilp",
                 "--repeats", "1", "--new-tokens", "2", "--keep-tokens", "64", "--batch", "1", "--out", str(out)]) == 0
    cases = json.loads((out / "bench.json").read_text())["batches"][0]["cases"]
    ilp, full = cases["crop-ilp@64"], cases["full"]
    assert ilp["timings"]["localizer_s"]["median"] > 0 and full["timings"]["localizer_s"]["median"] == 0
    assert ilp["flops"]["localizer"] > 0 and full["flops"].get("localizer", 0) == 0
    assert ilp["localizer_share_of_e2e"] > 0


def test_bench_reports_crop_self_localization_cost(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny-random-llava", "--methods", "full,crop-ilp,crop-self", "--repeats", "2",
                 "--new-tokens", "2", "--keep-tokens", "64", "--batch", "1", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    cases = results["batches"][0]["cases"]
    own, ilp = cases["crop-self@64"], cases["crop-ilp@64"]
    assert own["flops"]["localizer"] == 0 and own["timings"]["localizer_s"]["max"] == 0  # no second model
    assert own["flops"]["selection"] > 0 and ilp["flops"]["selection"] == 0
    assert own["flops"]["llm_prefill"] == ilp["flops"]["llm_prefill"]  # the same tokens at every layer
    cost = own["self_localization_cost"]
    assert cost["analytic_share_of_full_prefill"] == pytest.approx(
        own["flops"]["selection"] / cases["full"]["flops"]["llm_prefill"])
    measured = cost["measured_share_of_full_prefill"]
    assert measured["min"] <= measured["median"] <= measured["max"]
    assert "CROP-self's localization cost" in (out / "bench.md").read_text()


def test_bench_runs_without_autograd(tmp_path):
    """Issue 16: encoding under autograd kept the vision tower's activations alive (an 18 GB peak)."""
    from crop.eval.bench import BenchSpec, run_bench
    from crop.localizers import make_localizer
    from crop.models.loading import load_model

    model, processor = load_model("tiny-random-llava")
    seen = []
    hooks = [m.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
             for m in (model.model.vision_tower, model.model.language_model)]
    try:
        with torch.enable_grad():  # as a caller's default
            run_bench(model, processor, make_localizer("box:1,1,4,4"),
                      BenchSpec(methods=["crop-ilp", "crop-plc"], keep_tokens=[64], batches=[1], repeats=1,
                                new_tokens=2), "tiny-random-llava", "box")
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen)


def test_bench_times_the_trained_plc_with_the_compressor_given_by_option(tmp_path):
    """Issue 17: the compressor's FLOPs are part of crop-plc-trained's cost, and --option reaches its config."""
    from tests.conftest import random_compressor

    folder = random_compressor(64)  # tiny-random-llava's LLM width
    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny-random-llava", "--methods", "crop-plc,crop-plc-trained", "--repeats", "1",
                 "--new-tokens", "2", "--keep-tokens", "64", "--option", f"crop-plc-trained.compressor={folder}",
                 "--out", str(out)]) == 0
    cases = json.loads((out / "bench.json").read_text())["batches"][0]["cases"]
    trained, pooled = cases["crop-plc-trained@64"], cases["crop-plc@64"]
    assert trained["flops"]["selection"] > 0 == pooled["flops"]["selection"]
    assert trained["flops"]["llm_prefill"] == pooled["flops"]["llm_prefill"]  # the same tokens from layer 0
    assert main(["bench", "--model", "tiny-random-llava", "--option", "nomethod.x=1", "--out", str(out)]) == 2
