"""The lmms-eval plugin on two processes: ``torchrun --nproc-per-node 2 -m lmms_eval --model crop`` (CPU, gloo).

The same evaluation runs once in one process and once in two; the two-process run must evaluate
every document exactly once (lmms-eval gives each rank every second document and gathers the
logged samples and per-sample metrics on rank 0) and end with the one-process run's predictions and
metrics. The split has an odd number of documents, so rank 1 gets one fewer and lmms-eval pads it
with a copy of a request, whose answer must not reach the results.

lmms-eval exits 0 even when the evaluation raised (it logs the error), so each run is also checked
for its results file. Runs in ``.venv-lmms`` (``scripts/setup_lmms.sh``), like
``test_lmms_plugin.py``; skipped elsewhere unless ``CROP_REQUIRE_LMMS=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.lmms

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("CROP_REQUIRE_LMMS") == "1":
        raise RuntimeError("CROP_REQUIRE_LMMS=1 but lmms-eval is not installed (run scripts/setup_lmms.sh)")
    pytest.skip("lmms-eval is not installed (scripts/setup_lmms.sh makes .venv-lmms)", allow_module_level=True)

N = 11  # odd: the two ranks get 6 and 5 documents, and lmms-eval pads rank 1 with one request
MODEL_ARGS = "pretrained=embedded,method=crop-ilp,keep_tokens=8,localizer=embedded"
SCORES = ("accuracy,none", "visual_tokens_kept,none")  # localizer_ms is a timing: it differs between runs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lmms_eval(task_dir: Path, out: Path, launcher: list[str]) -> tuple[dict, list[dict], str]:
    """Run lmms-eval on the shipped task under ``launcher``; its task scores, logged samples and log."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(task_dir / "hf"),
           "OMP_NUM_THREADS": "1"}  # the same threads per process in both runs (torchrun's default)
    proc = subprocess.run([*launcher, "-m", "lmms_eval", "--model", "crop", "--model_args", MODEL_ARGS,
                           "--tasks", "crop_synth", "--include_path", str(task_dir), "--batch_size", "4",
                           "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    results = list(out.rglob("*_results.json"))
    samples = list(out.rglob("*_samples_crop_synth.jsonl"))
    assert proc.returncode == 0 and len(results) == len(samples) == 1, log[-6000:]
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    return json.loads(results[0].read_text())["results"]["crop_synth"], rows, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(one-process run, two-process run)``, each ``(scores, logged samples, log)``."""
    from crop.cli import main

    task_dir = tmp_path_factory.mktemp("lmms-sharded")
    assert main(["synth", "--out", str(task_dir), "--split", "test", "--n", str(N), "--lmms-task", "--no-progress"]) == 0
    one = _lmms_eval(task_dir, task_dir / "out-1", [sys.executable])
    two = _lmms_eval(task_dir, task_dir / "out-2",
                     [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                      "--master-addr", "127.0.0.1", "--master-port", str(_free_port())])
    return one, two


def test_both_processes_answered(runs):
    """Both ranks ran the evaluation, each calling the model (``generate_until``) on its own requests."""
    _, (_, _, log) = runs
    assert "Running on rank 0" in log and "Running on rank 1" in log
    assert log.count("Metric summary") == 2  # generate_until ran once in each process


def test_every_document_is_evaluated_exactly_once(runs):
    _, (_, rows, _) = runs
    counts = Counter(r["doc_id"] for r in rows)
    assert sorted(counts) == list(range(N)), f"documents lost: {sorted(set(range(N)) - set(counts))}"
    assert all(c == 1 for c in counts.values()), f"documents evaluated twice: {[d for d, c in counts.items() if c > 1]}"


def test_two_processes_equal_one_process(runs):
    """Same answer, target and per-sample metrics for every document; same task scores."""
    (scores_1, rows_1, _), (scores_2, rows_2, _) = runs

    def by_doc(rows: list[dict]) -> dict[int, tuple]:
        return {r["doc_id"]: (r["filtered_resps"], r["target"], r["accuracy"], r["visual_tokens_kept"]) for r in rows}

    assert by_doc(rows_2) == by_doc(rows_1)
    for key in SCORES:
        assert scores_2[key] == pytest.approx(scores_1[key], rel=1e-12), key  # sums taken in another order
    assert len({str(r["filtered_resps"]) for r in rows_1}) > 1  # not a comparison of constant answers
