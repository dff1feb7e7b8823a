"""``crop bench`` on tiny-random-llava with one repeat (fast; the numbers themselves are noise here)."""

from __future__ import annotations

import json

import pytest

from crop.cli import main
from crop.eval.flops import DecoderDims, kv_cache_bytes, prefill_flops


def test_flops_ratios_follow_token_counts():
    dims = DecoderDims(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16, vocab=356)
    full = prefill_flops(dims, [600] * 4)
    ilp = prefill_flops(dims, [600, 600, 100, 100])
    ideal = prefill_flops(dims, [100] * 4)
    assert ideal < ilp < full
    assert full / ilp == pytest.approx(2 * full / (full + prefill_flops(dims, [100] * 4)), rel=1e-2)
    assert kv_cache_bytes(dims, [600, 600, 100, 100]) == 1400 * 2 * 2 * 16 * 4


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
