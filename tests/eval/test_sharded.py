"""``torchrun --nproc-per-node 2 -m crop eval``: two CPU processes share the batches, rank 0 merges, same results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from crop.cli import main

ARGS = ["eval", "--model", "tiny-random-llava", "--localizer", "box:1,1,4,4", "--num-samples", "6", "--batch-size", "2",
        "--methods", "full,crop-plc", "--keep-tokens", "64", "--max-new-tokens", "1"]


def results_text(out: Path) -> str:
    """results.json with the git hash blanked."""
    return re.sub(r'"git":("[0-9a-f]*"|null)', '"git":null', (out / "results.json").read_text())


def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "crop", *ARGS, "--out", str(two)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*ARGS, "--out", str(one)]) == 0
    assert results_text(two) == results_text(one)
    # each batch answered by exactly one process: rank 0 took batches 0 and 2 (samples 0-1, 4-5), rank 1 batch 1
    seen: Counter = Counter()
    for rank, samples in ((0, {0, 1, 4, 5}), (1, {2, 3})):
        rows = [json.loads(line) for line in (two / f"progress.rank{rank}.jsonl").read_text().splitlines()]
        keys = [(r["run"], r["i"]) for r in rows if "row" in r]
        assert {i for _, i in keys} == samples and {r["loc"] for r in rows if "loc" in r} == samples
        seen.update(keys)
    assert set(seen.values()) == {1} and len(seen) == 6 * 2
    assert not (two / "progress.jsonl").exists()
