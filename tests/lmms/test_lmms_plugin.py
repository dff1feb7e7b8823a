"""The lmms-eval plugin end to end: ``python -m lmms_eval --model crop`` on the shipped task, offline.

Runs in the ``.venv-lmms`` environment (``scripts/setup_lmms.sh``; CI sets ``CROP_REQUIRE_LMMS=1``
there so this cannot be skipped); elsewhere it is skipped, lmms-eval not being installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lmms

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("CROP_REQUIRE_LMMS") == "1":
        raise RuntimeError("CROP_REQUIRE_LMMS=1 but lmms-eval is not installed (run scripts/setup_lmms.sh)")
    pytest.skip("lmms-eval is not installed (scripts/setup_lmms.sh makes .venv-lmms)", allow_module_level=True)

N = 12


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from crop.cli import main

    out = tmp_path_factory.mktemp("lmms")
    assert main(["synth", "--out", str(out), "--split", "test", "--n", str(N), "--lmms-task", "--no-progress"]) == 0
    return out


def _lmms_eval(task_dir, model_args: str) -> tuple[dict, list[dict]]:
    out = task_dir / f"out-{abs(hash(model_args))}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(task_dir / "hf")}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "crop", "--model_args", model_args,
                           "--tasks", "crop_synth", "--include_path", str(task_dir), "--batch_size", "4",
                           "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out.rglob("*_results.json")  # under a folder named after pretrained=
    (samples,) = out.rglob("*_samples_crop_synth.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text())["results"]["crop_synth"], sorted(rows, key=lambda r: r["doc_id"])


@pytest.mark.parametrize("method", ["crop-ilp", "fastv"])
def test_lmms_eval_scores_equal_crop_eval(task_dir, method):
    """Same samples, method, budget and localizer: lmms-eval's answers and accuracy are crop eval's."""
    from crop.eval.runner import EvalSpec, run_eval
    from crop.localizers import make_localizer
    from crop.models.loading import load_model

    model, processor = load_model("embedded")
    spec = EvalSpec(methods=[method], keep_tokens=[64], n=N, split="test", seed=0)
    ours = run_eval(model, processor, make_localizer("embedded"), spec, "embedded", "embedded")
    run = next(r for r in ours["runs"] if r["method"] == method)
    keep = run["keep_tokens"]  # 64 of 576 scaled to the embedded answerer's grid

    scores, rows = _lmms_eval(task_dir, f"pretrained=embedded,method={method},keep_tokens={keep},localizer=embedded")
    assert [r["filtered_resps"] for r in rows] == [p["prediction"] for p in run["predictions"]]
    assert scores["accuracy,none"] == pytest.approx(run["accuracy"])
    kept = [min(p["visual_tokens_kept"].values()) for p in run["predictions"]]
    assert scores["visual_tokens_kept,none"] == pytest.approx(sum(kept) / N)
    assert scores["localizer_ms,none"] > 0  # the localizer's cost is reported beside the scores


def test_unknown_model_args_are_refused(task_dir):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "crop", "--model_args", "methd=crop-ilp",
                           "--tasks", "crop_synth", "--include_path", str(task_dir), "--limit", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert "has no option methd" in proc.stdout + proc.stderr
