"""The eval fingerprint records where and how the answerer runs: a resume under other settings is refused."""

from __future__ import annotations

import pytest
import torch

from crop.eval.progress_store import ProgressStore, SpecMismatch, fingerprint, runtime_settings
from crop.eval.runner import EvalSpec

SPEC = EvalSpec(methods=["crop-ilp"], keep_tokens=[64], n=4, batch_size=2)
CPU = {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}


def test_runtime_settings_are_resolved_as_the_loader_resolves_them():
    assert runtime_settings("cpu", "auto", "sdpa") == CPU
    assert runtime_settings(torch.device("cpu"), torch.float32, "sdpa") == CPU  # objects or words, the same record
    assert runtime_settings("cpu", "bfloat16", "eager") == {**CPU, "dtype": "bfloat16", "attn_implementation": "eager"}
    assert runtime_settings("auto", "float32", device_map="auto")["device_map"] == "auto"


def test_the_device_index_is_not_recorded(monkeypatch):
    """Under a launcher each rank runs on its own GPU (cuda:LOCAL_RANK); every rank must write the same fingerprint."""
    import crop.models.loading

    monkeypatch.setattr(crop.models.loading, "resolve_device", lambda spec: torch.device(str(spec)))
    ranks = [fingerprint(SPEC, "m", "oracle", runtime_settings(f"cuda:{r}", "float16")) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["device"] == "cuda" and ranks[0]["dtype"] == "float16"


def test_the_fingerprint_holds_device_dtype_and_attention():
    fp = fingerprint(SPEC, "tiny-random-llava", "oracle", CPU)
    assert {k: fp[k] for k in CPU} == CPU
    assert fp["model"] == "tiny-random-llava" and fp["methods"] == ["crop-ilp"]
    assert not set(CPU) & set(fingerprint(SPEC, "m", "oracle"))  # unknown settings are not guessed


@pytest.mark.parametrize(("key", "other"), [("device", "cuda"), ("dtype", "bfloat16"),
                                            ("attn_implementation", "eager")])
def test_a_resume_under_another_device_dtype_or_attention_is_refused(tmp_path, key, other):
    ProgressStore(tmp_path).prepare(fingerprint(SPEC, "tiny-random-llava", "oracle", CPU))
    ProgressStore(tmp_path).prepare(fingerprint(SPEC, "tiny-random-llava", "oracle", dict(CPU)))  # same: resumes
    changed = fingerprint(SPEC, "tiny-random-llava", "oracle", {**CPU, key: other})
    with pytest.raises(SpecMismatch, match=f"{key}: '{CPU[key]}' there, '{other}' now") as info:
        ProgressStore(tmp_path).prepare(changed)
    assert "\n" not in str(info.value) and "--fresh" in str(info.value)
    ProgressStore(tmp_path).prepare(changed, fresh=True)  # starting over under the new settings is allowed
