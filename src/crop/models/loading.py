"""Loading answerer / localizer models by name: tiny random shapes, the embedded pair, or checkpoints.

Also where a model's device and precision are decided (:func:`resolve_device`,
:func:`resolve_dtype`, :func:`check_attention`): every CLI subcommand and the Python loaders
take the same ``device`` / ``dtype`` / ``attn_implementation`` / ``device_map`` words, and an
unavailable device or an unsupported dtype is a one-line :class:`~crop.errors.CropInputError`
before any weights are read.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import torch

from crop.errors import CropInputError
from crop.models.real_geometry import FULL_DEPTH_NAMES, REAL_GEOMETRY_NAMES, build_real_geometry
from crop.models.tiny import SHAPE_MODEL_NAMES, TINY_MODEL_NAMES, build_tiny_model

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAPS = ("auto",)
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The concrete device for a ``--device`` word, checked to exist on this machine.

    Args:
        spec: ``"auto"`` (or ``None``): CUDA if available, else MPS if available, else the CPU;
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a :class:`torch.device`.

    Returns:
        The device (``"cuda"`` becomes ``cuda:0``).

    Raises:
        CropInputError: for an unknown word or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not _DEVICE_RE.match(spec):
        raise CropInputError(f"unknown device {spec!r}; choose one of {', '.join(DEVICES)}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise CropInputError("device mps is not available on this machine (needs Apple silicon and a torch "
                                 "built with MPS); use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CropInputError(f"device {spec} is not available on this machine ({why}, torch {torch.__version__}); "
                             "use --device cpu or auto")
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise CropInputError(f"device {spec} is not available: this machine has {count} CUDA device(s) "
                             f"(cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The parameter dtype for a ``--dtype`` word on ``device``, checked to be usable there.

    Args:
        spec: ``"auto"`` (or ``None``): bfloat16 on a CUDA device that supports it, else float32;
            ``"float32"``, ``"bfloat16"``, ``"float16"``, or a :class:`torch.dtype` among those.
        device: where the model runs (a resolved device).

    Raises:
        CropInputError: for an unknown dtype or one the device cannot run.
    """
    device = torch.device(device)
    if isinstance(spec, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if spec not in names:
            raise CropInputError(f"unsupported dtype {spec}; choose one of auto, {', '.join(DTYPES)}")
        spec = names[spec]
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" and _cuda_bf16(device) else torch.float32
    if spec not in DTYPES:
        raise CropInputError(f"unknown dtype {spec!r}; choose one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[spec]
    if dtype is torch.bfloat16 and device.type == "cuda" and not _cuda_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise CropInputError(f"dtype bfloat16 is not supported on {device} ({name}); use --dtype float16 or float32")
    if dtype is torch.bfloat16 and device.type == "mps" and not _works_on(device, dtype):
        raise CropInputError("dtype bfloat16 is not supported on mps with this macOS / torch; use --dtype float16 "
                             "or float32")
    return dtype


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())


def _works_on(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        (torch.ones(2, 2, dtype=dtype, device=device) @ torch.ones(2, 2, dtype=dtype, device=device)).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def check_attention(attn_implementation: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse an attention implementation that cannot run with this device and dtype.

    Raises:
        CropInputError: for an unknown implementation, or ``flash_attention_2`` without a CUDA
            device, a half-precision dtype and the ``flash-attn`` package.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise CropInputError(f"unknown attention implementation {attn_implementation!r}; choose one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation != "flash_attention_2":
        return
    if torch.device(device).type != "cuda":
        raise CropInputError(f"--attn flash_attention_2 needs a CUDA device, not {device}; use sdpa")
    if dtype not in (torch.float16, torch.bfloat16):
        raise CropInputError(f"--attn flash_attention_2 needs --dtype bfloat16 or float16, not {_name(dtype)}")
    if importlib.util.find_spec("flash_attn") is None:
        raise CropInputError("--attn flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                             "use sdpa")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued kernels (CUDA, MPS) so a wall-clock reading covers them; no-op on the CPU.

    Args:
        device: the device whose work to wait for; ``None``: every initialised CUDA device (and MPS).
    """
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                torch.cuda.synchronize(index)
        if _mps_available():
            torch.mps.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def input_device(model) -> torch.device:
    """The device a model's inputs go to: its input embedding's (with a device map, the first shard's)."""
    return model.get_input_embeddings().weight.device


class DeviceProcessor:
    """A processor whose outputs are already on the model's device, floating tensors in its dtype.

    ``CropPipeline``, the localizer and the evaluation call the processor and pass what it
    returns straight to the model; wrapping the processor is how a model off the CPU gets its
    inputs there without any of them knowing. Every other attribute (``tokenizer``,
    ``image_processor``, ``apply_chat_template``, ``batch_decode``, ...) is the wrapped processor's.

    Args:
        processor: the model's processor.
        device: where the model's inputs go (:func:`input_device`).
        dtype: the model's floating dtype (pixel values are cast to it).
    """

    def __init__(self, processor, device: torch.device, dtype: torch.dtype) -> None:
        object.__setattr__(self, "processor", processor)
        object.__setattr__(self, "device", torch.device(device))
        object.__setattr__(self, "dtype", dtype)

    def __call__(self, *args: Any, **kwargs: Any):
        out = self.processor(*args, **kwargs)
        if kwargs.get("return_tensors") != "pt" or not hasattr(out, "to"):
            return out
        try:
            return out.to(device=self.device, dtype=self.dtype)  # BatchFeature: casts floating tensors only
        except TypeError:  # BatchEncoding (text only) takes no dtype; it holds no floating tensors
            return out.to(self.device)

    def __getattr__(self, name: str) -> Any:
        if name == "processor":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.processor, name, value)

    def __repr__(self) -> str:
        return f"DeviceProcessor({self.processor!r}, device={self.device}, dtype={_name(self.dtype)})"


def load_model(spec: str, attn_implementation: str = "sdpa", role: str = "answerer", device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "auto", device_map: str | None = None):
    """``(model, processor)`` for a model name, a local checkpoint directory, or a hub id.

    Args:
        spec: ``"embedded"`` (the shipped toy model for ``role``), one of
            :data:`crop.models.tiny.TINY_MODEL_NAMES` or ``SHAPE_MODEL_NAMES`` (random weights),
            :data:`crop.models.real_geometry.REAL_GEOMETRY_NAMES` (a 7B checkpoint's exact
            geometry with 2 decoder layers and random weights, built directly in ``dtype`` on
            the device), ``FULL_DEPTH_NAMES`` (the same at full depth, for GPU timings),
            a local folder exported by ``crop train`` (``crop_embedded.json`` + safetensors),
            a local checkpoint directory, or a hub id.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (CUDA, half
            precision, the ``flash-attn`` package).
        role: ``"answerer"`` or ``"localizer"`` (which embedded model ``"embedded"`` means).
        device: ``"cpu"`` (default), ``"auto"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (see
            :func:`resolve_device`); ignored with ``device_map``.
        dtype: ``"auto"`` (default: bfloat16 on CUDA, else float32), ``"float32"``,
            ``"bfloat16"`` or ``"float16"`` (see :func:`resolve_dtype`).
        device_map: ``"auto"``: let accelerate spread the model over the visible GPUs (then the
            CPU); ``device`` must then be ``"auto"``.

    Returns:
        ``(model, processor)``, the model in eval mode on its device(s) and in ``dtype``; off
        the CPU (or in another dtype than float32) the processor is a :class:`DeviceProcessor`
        that puts its outputs where the model reads them.

    Raises:
        CropInputError: if the model cannot be found or loaded, or the device / dtype /
            attention implementation / device map cannot be used here.
    """
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise CropInputError(f"unknown device map {device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
        if str(device).strip().lower() != "auto":
            raise CropInputError(f"--device-map {device_map} places the model itself: leave --device at auto "
                                 f"(got {device})")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    check_attention(attn_implementation, target, torch_dtype)
    if spec in TINY_MODEL_NAMES or spec in SHAPE_MODEL_NAMES:
        model, processor = build_tiny_model(spec, attn_implementation=_built_attn(attn_implementation))
    elif spec in REAL_GEOMETRY_NAMES or spec in FULL_DEPTH_NAMES:
        # built in the target dtype (no float32 copy of billions of parameters), on the target device
        # unless accelerate places it
        model, processor = build_real_geometry(spec, dtype=torch_dtype, device="cpu" if device_map else target,
                                               attn_implementation=_built_attn(attn_implementation))
    elif spec == EMBEDDED:
        from crop import embedded

        loader = embedded.load_embedded_answerer if role == "answerer" else embedded.load_embedded_localizer
        try:
            model, processor = loader()
        except FileNotFoundError as exc:
            raise CropInputError(str(exc)) from None
    elif spec.startswith("tiny-random"):
        raise CropInputError(f"unknown model {spec!r}; tiny random models: {', '.join(TINY_MODEL_NAMES)}")
    elif _is_embedded_layout(spec):  # a model `crop train` exported (e.g. runs/x-export): built in code, then loaded
        from crop import embedded

        model, processor = embedded.load_embedded_from(spec)
    else:
        model, processor = _from_pretrained(spec, attn_implementation, target, torch_dtype, device_map)
        return model, processor_for(model, processor)
    # models built in code: random or embedded weights in float32 on the CPU, then placed
    model = model.to(torch_dtype)
    if attn_implementation != _built_attn(attn_implementation) or spec == EMBEDDED or _is_embedded_layout(spec):
        _set_attention(model, attn_implementation)
    model = _dispatch(model, torch_dtype) if device_map is not None else model.to(target)
    return model.eval(), processor_for(model, processor)


def _is_embedded_layout(spec: str) -> bool:
    """Whether ``spec`` is a local folder in the layout ``crop train`` exports (its metadata file + safetensors)."""
    from crop.embedded import META_FILE

    return Path(spec).is_dir() and (Path(spec) / META_FILE).is_file()


def _built_attn(attn_implementation: str) -> str:
    # flash attention is switched on after the cast to half precision (it refuses float32 weights)
    return "sdpa" if attn_implementation == "flash_attention_2" else attn_implementation


def _set_attention(model, attn_implementation: str) -> None:
    try:
        model.set_attn_implementation(attn_implementation)
    except (ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CropInputError(f"cannot use --attn {attn_implementation}: {first}") from None


def _dispatch(model, dtype: torch.dtype):
    """Spread a model built in code over the visible devices with accelerate (``device_map="auto"``)."""
    from accelerate import dispatch_model, infer_auto_device_map

    layout = infer_auto_device_map(model, no_split_module_classes=list(model._no_split_modules or []), dtype=dtype)
    logger.info("device map: %s", layout)
    return dispatch_model(model, layout)


def processor_for(model, processor):
    """``processor`` as is for a float32 CPU model, else a :class:`DeviceProcessor` feeding ``model``'s device and dtype.

    :class:`crop.CropPipeline` calls it on the processor it is given, so a model loaded with plain
    ``from_pretrained(..., device_map="cuda", dtype=torch.bfloat16)`` and its stock processor work
    together; a processor already wrapped is returned as is.
    """
    if isinstance(processor, DeviceProcessor):
        return processor
    device, dtype = input_device(model), model.dtype
    if device.type == "cpu" and dtype == torch.float32:
        return processor
    return DeviceProcessor(processor, device, dtype)


def _from_pretrained(spec: str, attn_implementation: str, device: torch.device, dtype: torch.dtype,
                     device_map: str | None):
    """A real checkpoint through the stock transformers auto classes (PIL image processors).

    The processor is read before the weights (a processor problem costs no weight loading), and
    through :func:`crop.models.processors.load_checkpoint_processor`, which serves Qwen2-VL /
    Qwen2.5-VL checkpoints image-only when their stock processor would need torchvision.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from crop.models.processors import load_checkpoint_processor

    is_local = Path(spec).exists()
    if not is_local and ("/" not in spec or spec.count("/") > 1 or spec.startswith((".", "/"))):
        raise CropInputError(f"unknown model {spec!r}: not a local path, not a hub id (owner/name), and not one of "
                             f"{EMBEDDED}, {', '.join(TINY_MODEL_NAMES + SHAPE_MODEL_NAMES + REAL_GEOMETRY_NAMES + FULL_DEPTH_NAMES)}")
    # transformers 5.x takes ``dtype`` (``torch_dtype`` is its deprecated alias); loading straight onto
    # the device (``device_map``) avoids a float32 copy of the weights in host memory
    placement = device_map if device_map is not None else (None if device.type == "cpu" else str(device))
    try:
        processor = load_checkpoint_processor(spec, AutoConfig.from_pretrained(spec).model_type)
        model = AutoModelForImageTextToText.from_pretrained(spec, attn_implementation=attn_implementation, dtype=dtype,
                                                            device_map=placement)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CropInputError(f"could not load model {spec!r}: {first}") from None
    return model.eval(), processor
