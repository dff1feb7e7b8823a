"""``crop eval`` resumes: a killed or failed run, run again on the same ``--out``, ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from crop.cli import main
from crop.eval.progress_store import ProgressStore, Shard, SpecMismatch

ARGS = ["eval", "--model", "tiny-random-llava", "--localizer", "box:1,1,4,4", "--n", "6", "--batch-size", "2",
        "--methods", "full,crop-plc", "--keep-tokens", "64", "--max-new-tokens", "1"]
ROWS = 6 * 2  # samples x runs (full, crop-plc at 64)


def results_text(out: Path) -> str:
    """results.json with the git hash blanked (the one value allowed to differ)."""
    return re.sub(r'"git":("[0-9a-f]*"|null)', '"git":null', (out / "results.json").read_text())


def progress_keys(out: Path) -> Counter:
    """How often each localization and each (run, sample) row occurs in the folder's progress files."""
    keys: Counter = Counter()
    for path in out.glob("progress*.jsonl"):
        for line in path.read_text().splitlines():
            item = json.loads(line)  # every line is whole
            keys[("loc", item["loc"]) if "loc" in item else ("header", item["run"]) if "header" in item
                 else (item["run"], item["i"])] += 1
    return keys


def assert_complete_once(out: Path) -> None:
    keys = progress_keys(out)
    assert set(keys.values()) == {1}, [k for k, v in keys.items() if v > 1]
    assert sum(1 for k in keys if k[0] not in ("loc", "header")) == ROWS
    assert sum(1 for k in keys if k[0] == "loc") == 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_uninterrupted_run_writes_progress_and_spec(reference):
    assert_complete_once(reference)
    spec = json.loads((reference / "eval_spec.json").read_text())
    assert spec["model"] == "tiny-random-llava" and spec["batch_size"] == 2 and "git" not in spec


def test_resume_after_a_failure_equals_uninterrupted_run(reference, tmp_path, monkeypatch):
    import tqdm

    from crop.pipeline import CropPipeline

    out = tmp_path / "eval"
    real = CropPipeline.answer_batch
    calls = []

    def failing(self, *args, **kwargs):
        if len(calls) == 4:  # after 4 answer batches (3 batches of full, 1 of crop-plc)
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CropPipeline, "answer_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*ARGS, "--out", str(out)])
    assert not (out / "results.json").exists()
    assert len([k for k in progress_keys(out) if k[0] not in ("loc", "header")]) == 8

    monkeypatch.setattr(CropPipeline, "answer_batch", real)
    bars = []
    real_tqdm = tqdm.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", recording_tqdm)
    resumed = []
    monkeypatch.setattr(CropPipeline, "answer_batch", lambda self, *a, **k: resumed.append(1) or real(self, *a, **k))
    assert main([*ARGS, "--out", str(out)]) == 0
    assert bars[0]["initial"] == 6 + 8 and bars[0]["total"] == 6 + ROWS  # the bar starts where the run stopped
    assert len(resumed) == 2  # only crop-plc's last two batches ran again
    assert results_text(out) == results_text(reference)
    assert_complete_once(out)


def test_truncated_last_line_is_ignored_and_rerun(reference, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(reference, out)
    (out / "results.json").unlink()
    progress = out / "progress.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    progress.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])  # killed mid-write
    store = ProgressStore(out)
    store.reload()  # the torn line is skipped when read
    assert len(store.rows) == ROWS - 1
    assert main([*ARGS, "--out", str(out)]) == 0
    assert results_text(out) == results_text(reference)
    assert_complete_once(out)  # the torn line is gone, the row is there once


def test_other_spec_is_refused_in_one_line(reference, tmp_path, capsys):
    out = tmp_path / "eval"
    shutil.copytree(reference, out)
    args = [a if a != "64" else "128" for a in ARGS]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "keep_tokens: [64] there, [128] now" in err and "--fresh" in err and "--out" in err


def test_fresh_drops_the_progress(reference, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(reference, out)
    other = json.loads((out / "eval_spec.json").read_text()) | {"n": 3}
    with pytest.raises(SpecMismatch, match="n: 6 there, 3 now"):
        ProgressStore(out).prepare(other)
    store = ProgressStore(out)
    store.prepare(other, fresh=True)
    assert not store.rows and not store.locs and not (out / "progress.jsonl").exists()
    assert json.loads((out / "eval_spec.json").read_text())["n"] == 3


def test_shard_batches():
    assert Shard(0, 1).batches(5, 2) == [0, 2, 4]
    assert Shard(1, 2).batches(7, 2) == [2, 6]
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "3"}) == Shard(1, 3)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        Shard(2, 2)


def test_resume_after_sigkill_equals_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "crop", *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            progress = out / "progress.jsonl"
            if progress.exists() and progress.read_text().count('"row"') >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(60)
    done = len([k for k in progress_keys_tolerant(out) if k[0] not in ("loc", "header")])
    assert 3 <= done < ROWS and not (out / "results.json").exists()
    assert main([*ARGS, "--out", str(out)]) == 0
    assert results_text(out) == results_text(reference)
    assert_complete_once(out)


def progress_keys_tolerant(out: Path) -> Counter:
    """:func:`progress_keys` of a killed run: its last line may be torn."""
    store = ProgressStore(out)
    store.reload()
    return Counter([("loc", i) for i in store.locs] + list(store.rows))


def test_in_memory_and_stored_runs_agree(tmp_path, monkeypatch):
    """The store changes where rows live, not what they are: oracle boxes, an infeasible budget, a resume."""
    from crop.eval.progress_store import fingerprint
    from crop.eval.runner import EvalSpec, run_eval
    from tests.conftest import tiny

    model, processor = tiny("tiny-random-llava")
    spec = EvalSpec(methods=["crop-ilp", "crop-plc"], keep_tokens=[64, 384], n=4, batch_size=2, max_new_tokens=1,
                    match="equivalent")
    memory = run_eval(model, processor, None, spec, "oracle", "tiny-random-llava")
    store = ProgressStore(tmp_path)
    store.prepare(fingerprint(spec, "tiny-random-llava", "oracle"))
    stored = run_eval(model, processor, None, spec, "oracle", "tiny-random-llava", store=store)
    assert json.dumps(stored) == json.dumps(memory)
    assert any("infeasible" in r for r in stored["runs"])
    from crop.pipeline import CropPipeline

    monkeypatch.setattr(CropPipeline, "answer_batch", lambda *a, **k: pytest.fail("a done batch ran again"))
    again = ProgressStore(tmp_path)  # everything done: nothing runs, the same document
    again.prepare(fingerprint(spec, "tiny-random-llava", "oracle"))
    assert json.dumps(run_eval(model, processor, None, spec, "oracle", "tiny-random-llava", store=again)) == \
        json.dumps(memory)
