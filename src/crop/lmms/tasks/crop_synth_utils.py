"""Document functions of the ``crop_synth`` lmms-eval task (loaded by lmms-eval from the task's folder).

The prompt is the question alone: the ``crop`` model wraps it in the answerer's chat template,
as ``crop eval`` does. Scoring is ``crop eval``'s (:func:`crop.data.synth.answers_match`).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The sample's image (its ``image`` path is relative to the JSONL, i.e. to this folder)."""
    with Image.open(HERE / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``accuracy`` as ``crop eval`` scores it, and what pruning kept for this sample."""
    from crop.data.synth import answers_match
    from crop.lmms import SAMPLE_STATS

    stats = SAMPLE_STATS.get(str(doc["id"]), {})
    return {"accuracy": float(answers_match(results[0], doc["answer"])),
            "visual_tokens_kept": stats.get("visual_tokens_kept", float("nan")),
            "localizer_ms": stats.get("localizer_ms", float("nan"))}
