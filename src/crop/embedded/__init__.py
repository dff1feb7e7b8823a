"""The embedded models shipped with the package, and their save/load functions.

Two small VLMs trained here from scratch on the synthetic benchmark (:mod:`crop.data.synth`)
by the recipes in :mod:`crop.train`:

- the **answerer**, a real ``LlavaForConditionalGeneration`` (CLIP vision tower, projector,
  Llama LM) that answers the benchmark's questions;
- the **localizer**, a real ``Qwen2VLForConditionalGeneration`` that answers
  :func:`crop.localizers.prompt.localizer_prompt` with the 8x8 grid box as text.

Each lives in ``weights/<kind>/``: ``model.safetensors`` (weights only, loaded with
safetensors), ``config.json`` (the Hugging Face config, for reference), ``crop_embedded.json``
(the architecture sizes the builders in :mod:`crop.models.tiny` take, plus the training
summary) and ``MODEL_CARD.md``. The model is rebuilt from its sizes with those builders and the
tokenizer is built in code, so nothing but tensors is read from disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
KINDS = ("answerer", "localizer")
META_FILE = "crop_embedded.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURES = {"answerer": "llava", "localizer": "qwen2_vl"}


def embedded_dir(kind: str, weights_dir: str | Path | None = None) -> Path:
    """The folder holding the ``kind`` model (``"answerer"`` or ``"localizer"``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown embedded model {kind!r}; use one of {KINDS}")
    return Path(weights_dir) / kind if weights_dir is not None else WEIGHTS_DIR / kind


def _shape_cls(architecture: str):
    from crop.models.tiny import LlavaShape, QwenShape

    if architecture == "llava":
        return LlavaShape
    if architecture == "qwen2_vl":
        return QwenShape
    raise ValueError(f"unknown embedded architecture {architecture!r}; use 'llava' or 'qwen2_vl'")


def build_from_shape(architecture: str, shape: dict, attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """A freshly initialized model and its processor from the builders in :mod:`crop.models.tiny`.

    Args:
        architecture: ``"llava"`` or ``"qwen2_vl"``.
        shape: fields of ``LlavaShape`` / ``QwenShape``.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)``; the model's weights are random (call :func:`load_weights`).
    """
    from crop.models.tiny import llava_config, llava_processor, qwen_config, qwen_processor

    cls = _shape_cls(architecture)
    known = {f.name for f in fields(cls)}
    unknown = set(shape) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    sizes = cls(**shape)
    model_cls: type[PreTrainedModel]
    if architecture == "llava":
        from transformers import LlavaForConditionalGeneration

        processor = llava_processor(sizes)
        tok = processor.tokenizer
        config = llava_config(sizes, len(tok), tok.convert_tokens_to_ids("<image>"))
        model_cls = LlavaForConditionalGeneration
    else:
        from transformers import Qwen2VLForConditionalGeneration

        processor = qwen_processor("qwen2_vl", sizes)
        config = qwen_config("qwen2_vl", sizes)
        model_cls = Qwen2VLForConditionalGeneration
    config._attn_implementation = attn_implementation
    model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


def save_embedded(model: nn.Module, architecture: str, shape: dict | Any, out_dir: str | Path,
                  meta: dict | None = None, card: str | None = None) -> Path:
    """Write a model in the embedded layout (safetensors weights, configs, optional card).

    Args:
        model: the trained model (its ``state_dict`` is saved in float32).
        architecture: ``"llava"`` or ``"qwen2_vl"``.
        shape: the ``LlavaShape`` / ``QwenShape`` (or its fields) the model was built from.
        out_dir: the folder to write (created).
        meta: extra JSON-able metadata (training summary, metrics) for ``crop_embedded.json``.
        card: text of ``MODEL_CARD.md``.

    Returns:
        ``out_dir`` as a path.

    Raises:
        TypeError: if ``model`` has no Hugging Face config (``model.config``) to write.
    """
    from safetensors.torch import save_model
    from transformers import PreTrainedConfig

    _shape_cls(architecture)
    config = model.config
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(f"{type(model).__name__} has no Hugging Face config to save (model.config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape_dict = shape if isinstance(shape, dict) else asdict(shape)
    save_model(model.float(), str(out / WEIGHTS_FILE), metadata={"format": "pt", "architecture": architecture})
    (out / "config.json").write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    info = {"architecture": architecture, "shape": shape_dict, **(meta or {})}
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return out


def load_embedded_from(path: str | Path, attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """Load a model written by :func:`save_embedded` from ``path``.

    Args:
        path: the model's folder.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: if the folder or its weights are missing, saying how to make them.
    """
    from safetensors.torch import load_model

    folder = Path(path)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        kind = folder.name
        raise FileNotFoundError(
            f"embedded {kind} weights not found in {folder} (need {META_FILE} and {WEIGHTS_FILE}); "
            f"train them with `crop train {kind}` (see docs/training.md or the model card), "
            "or reinstall the package with its weights"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    model, processor = build_from_shape(meta["architecture"], meta["shape"], attn_implementation)
    load_model(model, str(weights_path), strict=True)
    logger.info("loaded embedded %s (%s) from %s", folder.name, meta["architecture"], folder)
    return model.eval(), processor


def load_embedded_metadata(kind: str, weights_dir: str | Path | None = None) -> dict:
    """The ``crop_embedded.json`` of the ``kind`` model (sizes, training summary, metrics)."""
    path = embedded_dir(kind, weights_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded {kind} metadata not found at {path}; train it with `crop train {kind}`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_embedded_answerer(weights_dir: str | Path | None = None, attn_implementation: str = "sdpa"):
    """The shipped answerer: a ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``.

    Args:
        weights_dir: a folder holding ``answerer/`` (default: the package's ``weights/``).
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: if the weights are missing.
    """
    return load_embedded_from(embedded_dir("answerer", weights_dir), attn_implementation)


def load_embedded_localizer(weights_dir: str | Path | None = None, attn_implementation: str = "sdpa"):
    """The shipped localizer: a ``Qwen2VLForConditionalGeneration`` and its image-only processor.

    Use it through :class:`crop.localizers.vlm.VLMLocalizer` with ``grid=8``.

    Args:
        weights_dir: a folder holding ``localizer/`` (default: the package's ``weights/``).
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: if the weights are missing.
    """
    return load_embedded_from(embedded_dir("localizer", weights_dir), attn_implementation)


__all__ = [
    "KINDS",
    "WEIGHTS_DIR",
    "build_from_shape",
    "embedded_dir",
    "load_embedded_answerer",
    "load_embedded_from",
    "load_embedded_localizer",
    "load_embedded_metadata",
    "save_embedded",
]
