"""The ``crop`` model for lmms-eval: any supported answerer, any method, budget and localizer.

lmms-eval calls :meth:`CropLMM.generate_until` with its requests; each is answered by
:class:`crop.pipeline.CropPipeline`, the code ``crop answer`` and ``crop eval`` run, so a
score here and ``crop eval``'s on the same samples are the same number. What pruning kept and
what the localizer cost are reported beside the scores twice:

* per sample, in :data:`crop.lmms.SAMPLE_STATS` (keyed by the document's ``id``), which the shipped
  task's ``process_results`` turns into the metrics ``visual_tokens_kept`` and
  ``localizer_ms`` (mean over the task, next to ``accuracy``);
* per run, through lmms-eval's throughput metrics (``results["throughput"]``):
  ``avg_visual_tokens_kept``, ``avg_localizer_ms``, ``avg_localizer_share``.

Model arguments (``--model_args k=v,...``): ``pretrained`` (``embedded``, a tiny-random-*
name, a folder or a hub id), ``method`` (default ``crop-ilp``), ``keep_tokens`` (visual
tokens of the model's own grid), ``localizer`` (any ``--localizer`` word, e.g.
``grounding:Qwen/Qwen2.5-VL-3B-Instruct``; default ``embedded`` with the embedded
answerer, else ``full``), ``layer``, ``pool``, ``grid``, ``seed``, ``device``, ``dtype``,
``attn``, ``localizer_device``, ``max_new_tokens`` (default 8, as ``crop eval``),
``batch_size`` (``max_batch_size``, which lmms-eval may pass, is accepted and unused: batches
are never resized). Any other argument is a field of the method's config (e.g. ``trim=stride``,
``budget=exact`` for DART), set through :func:`crop.methods.build_config` as ``--option`` is; a
field the method does not have is refused with the fields it has.

Several processes (``accelerate launch --num_processes N -m lmms_eval ...`` or ``torchrun
--nproc-per-node N -m lmms_eval ...``): ``rank`` and ``world_size`` come from the launcher's
``RANK`` / ``WORLD_SIZE``, so lmms-eval gives each process every N-th document, gathers the logged
samples and per-sample metrics on rank 0 and writes one result, equal to a one-process run's
(``tests/lmms/test_lmms_sharded.py``, two CPU processes over gloo). Each process answers on
``cuda:LOCAL_RANK`` when ``device`` is ``cuda`` (or ``auto`` on a machine with a GPU). The
per-run throughput figures (``results["throughput"]``) are not gathered by lmms-eval: under N
processes they describe rank 0's share; the per-sample ``visual_tokens_kept`` / ``localizer_ms``
task metrics cover every sample.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from crop.lmms import SAMPLE_STATS


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "", "none", "None") else int(value)


def _device_for_rank(device: str | None) -> str | None:
    """``cuda:LOCAL_RANK`` for ``cuda`` / ``auto`` on a machine with a GPU, else ``device`` unchanged.

    Args:
        device: a ``device`` model argument.

    Returns:
        This process's device.
    """
    import os

    if device is not None and device.strip().lower() in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class CropLMM(lmms):
    """lmms-eval's view of a CROP pipeline (a "simple" model: ``doc_to_visual`` + ``doc_to_text``)."""

    is_simple = True

    def __init__(self, pretrained: str = "embedded", method: str = "crop-ilp", keep_tokens: Any = 64,
                 localizer: str | None = None, layer: Any = 2, pool: Any = 4, grid: Any = 8, seed: Any = 0,
                 device: str = "cpu", dtype: str = "auto", attn: str = "sdpa", localizer_device: str | None = None,
                 max_new_tokens: Any = 8, batch_size: Any = 1, max_batch_size: Any = None, **fields: Any) -> None:
        super().__init__()
        import os

        from crop.localizers import make_localizer
        from crop.methods import Option, build_config
        from crop.models.loading import load_model
        from crop.pipeline import CropPipeline

        shared = {"layer": int(layer), "pool": int(pool), "grid": int(grid), "seed": int(seed)}
        try:  # checked before any model loads
            self.config = build_config(str(method), _int_or_none(keep_tokens),
                                       [Option(name, value) for name, value in fields.items()], shared)
        except ValueError as exc:
            raise ValueError(f"crop model_args: {exc} (the other model_args are in crop.lmms.model's docstring)") \
                from None
        # lmms-eval 0.7.3's evaluate() sets these too, from the same variables; set here they hold from
        # construction on, for code that reads model.rank / world_size before evaluate() runs
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self._world_size > 1:
            device, localizer_device = _device_for_rank(device) or device, _device_for_rank(localizer_device)
            from accelerate import Accelerator  # lmms-eval waits for every process through model.accelerator

            self.accelerator = Accelerator()
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        model, processor = load_model(str(pretrained), attn_implementation=attn, device=device, dtype=dtype)
        localizer = localizer or ("embedded" if pretrained == "embedded" else "full")
        self.localizer_name = str(localizer)
        loc = make_localizer(self.localizer_name, int(grid), device=localizer_device or device)
        self.pipeline = CropPipeline(model, processor, loc, self.config)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._answerer_device = torch.device(getattr(model, "device", "cpu"))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        """Where lmms-eval puts the tensors it exchanges between processes (each rank's request count).

        lmms-eval reads ``model.device`` only when ``WORLD_SIZE > 1``, for its collectives before
        generation, so this must be a device the process group's backend serves: the accelerator's
        (``cpu`` under gloo, ``cuda:LOCAL_RANK`` under NCCL), which the answerer's device need not
        be (``device=cpu`` on a GPU machine). In one process it is the answerer's device.
        """
        accelerator = getattr(self, "accelerator", None)
        return torch.device(accelerator.device) if accelerator is not None else self._answerer_device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request in batches of ``batch_size``, in request order."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        answers: list[str] = []
        kept, loc_ms, shares, elapsed, new_tokens = [], [], [], 0.0, 0
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            images, questions, ids = [], [], []
            limit = self.max_new_tokens
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in chunk:
                doc = self.task_dict[task][split][doc_id]
                visuals = doc_to_visual(doc)
                if len(visuals) != 1:
                    raise ValueError(f"crop answers about one image per question; document {doc_id} has {len(visuals)}")
                images.append(visuals[0])
                questions.append(context)
                ids.append(str(doc.get("id", f"{task}/{split}/{doc_id}")))
                limit = int(gen_kwargs.get("max_new_tokens", limit))
            tic = time.perf_counter()
            results = self.pipeline.answer_batch(images, questions, max_new_tokens=limit)
            elapsed += time.perf_counter() - tic
            for doc_key, result in zip(ids, results, strict=True):
                tokens = float(min(result.visual_tokens_kept.values()))  # the last stage's count
                ms = 1000 * result.timings["localizer_s"]
                share = result.timings["localizer_s"] / result.timings["total_s"] if result.timings["total_s"] else 0.0
                SAMPLE_STATS[doc_key] = {"visual_tokens_kept": tokens, "visual_tokens_in": float(result.visual_tokens_in),
                                         "localizer_ms": ms}
                kept.append(tokens)
                loc_ms.append(ms)
                shares.append(share)
                new_tokens += len(self.tokenizer(result.answer, add_special_tokens=False)["input_ids"])
                answers.append(result.answer)
        n = max(len(answers), 1)
        log_metrics(elapsed, new_tokens, new_tokens / elapsed if elapsed else 0.0,
                    additional_metrics={"visual_tokens_kept": sum(kept) / n, "localizer_ms": sum(loc_ms) / n,
                                        "localizer_share": sum(shares) / n})
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("crop answers by generation (output_type: generate_until); loglikelihood tasks "
                                  "are not supported")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("crop answers single-turn questions; multi-round tasks are not supported")
