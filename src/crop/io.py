"""Loading user inputs (images, questions) with clear errors instead of tracebacks or silently wrong pixels.

What :func:`load_image` accepts, and what it refuses (each refusal is a one-line
:class:`crop.errors.CropInputError`):

- a path (``str`` / ``os.PathLike``), raw encoded bytes (``bytes``, ``bytearray``,
  ``memoryview``), a binary file object, a PIL image, a numpy array or a torch tensor;
- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``, as ``transformers``' own
  ``load_image`` does), so a phone photo reaches the model upright;
- high-bit-depth pixels are scaled to 8 bits instead of being clipped (:func:`to_rgb`);
- images over the decompression-bomb pixel limit (Pillow's, ``PIL.Image.MAX_IMAGE_PIXELS``,
  about 89.5 MP, unless ``max_pixels`` says otherwise) are refused before being decoded;
- images with a side under :data:`MIN_IMAGE_SIDE` pixels or an aspect ratio over
  :data:`MAX_ASPECT_RATIO` are refused (:func:`check_image`), for every model family.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crop.errors import CropInputError

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 4000

# Hugging Face image processors guess the channel axis of the array they make from the image
# (a first or last axis of length 1 or 3 is taken for channels), so an image 1 or 3 px high
# is misread; below 4 px there is nothing to answer about anyway.
MIN_IMAGE_SIDE = 4
# LLaVA processors resize the short side to 336 px: a 20000x1 image would become 6.7 million
# pixels wide before the crop, and the memory runs out. Qwen2-VL refuses above 200:1. 50:1
# still admits panoramas and long screenshots.
MAX_ASPECT_RATIO = 50

IMAGE_TYPES = ("a path, encoded image bytes, a binary file object, a PIL image, a numpy array (H,W), (H,W,C) "
               "or (C,H,W) with C in 1/3/4 and dtype uint8, uint16, bool or float in [0, 1], "
               "or a torch tensor of the same shapes")

# Pillow reads its pixel limit from a module global; a per-call limit means setting it around
# the open + decode, so our own calls are serialized.
_PIL_LIMIT_LOCK = threading.Lock()


def sample_image_path() -> Path:
    """The sample image shipped inside the package (``crop/assets/sample.png``, a synthetic scene)."""
    from importlib.resources import files

    return Path(str(files("crop") / "assets" / "sample.png"))


def load_image(source: Any, max_pixels: int | None = None) -> Image.Image:
    """An upright 8-bit RGB PIL image from a file, bytes, an array or an image.

    Args:
        source: a path, encoded bytes (``bytes``/``bytearray``/``memoryview``), a binary file
            object, a PIL image, a numpy array or a torch tensor. Arrays and tensors may be
            ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in 1, 3, 4 (numpy: channels
            last when the last axis could be channels; torch: channels first when the first
            axis could be); dtype ``uint8``, ``uint16`` (divided by 257), ``bool`` or float
            with values in ``[0, 1]`` (multiplied by 255). A 4th channel (alpha) is dropped.
        max_pixels: the decompression-bomb limit for images decoded from a file or bytes
            (``None``: Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` at call time, about 89.5 MP;
            raise it only for trusted input). An image over it is refused before decoding.
            Arrays and already-decoded PIL images are in memory and are not checked against it.

    Returns:
        An RGB image with EXIF orientation applied (:func:`to_rgb`) that passed :func:`check_image`.

    Raises:
        CropInputError: if the file is missing, unreadable, not an image, corrupt or over the
            pixel limit; if the type, shape or values of an array are not one of the above; or
            if the image's size or aspect ratio is refused by :func:`check_image`.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise CropInputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        img = to_rgb(source)
    elif isinstance(source, (str, os.PathLike)):
        img = _decode_path(Path(source), max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = _decode(io.BytesIO(bytes(source)), "the image bytes", max_pixels)
    elif isinstance(source, np.ndarray) or _is_torch_tensor(source):
        img = to_rgb(_array_to_image(source))
    elif hasattr(source, "read"):
        img = _decode(source, "the image file object", max_pixels)
    else:
        raise CropInputError(f"cannot use a {type(source).__module__}.{type(source).__qualname__} as an image; "
                             f"expected {IMAGE_TYPES}")
    return check_image(img)


def check_image(img: Image.Image) -> Image.Image:
    """``img`` itself, if its size is one every supported processor handles sanely.

    Args:
        img: any PIL image.

    Returns:
        ``img``, unchanged.

    Raises:
        CropInputError: if a side is under :data:`MIN_IMAGE_SIDE` pixels, or the longer side
            is more than :data:`MAX_ASPECT_RATIO` times the shorter one.
    """
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise CropInputError(f"image too small: {w}x{h} pixels (each side must be at least {MIN_IMAGE_SIDE})")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise CropInputError(f"extreme aspect ratio: {w}x{h} pixels is {max(w, h) / min(w, h):.0f}:1 (at most "
                             f"{MAX_ASPECT_RATIO}:1; crop or pad the image first)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright (EXIF orientation applied) as 8-bit RGB, with high bit depths scaled, not clipped.

    Pillow's ``convert("RGB")`` clips integer pixels at 255 and truncates floats, so a 16-bit
    picture turns white and a float one black. Here:

    - ``I;16`` (16-bit unsigned, any byte order): divided by 257, the type's range
      (0..65535 -> 0..255), so brightness is kept;
    - ``I`` (32-bit signed) and ``F`` (32-bit float): the values have no fixed range
      (a 16-bit PNG read as ``I``, depth maps, scientific data), so they are stretched
      min-max to 0..255 over the finite values; non-finite pixels become 0; a constant
      image becomes mid-grey (128);
    - every other mode: ``convert("RGB")`` (alpha is dropped, palettes expanded).

    A PIL image you rotated by hand still carries its EXIF orientation tag: apply
    ``ImageOps.exif_transpose`` instead (it removes the tag), or clear ``img.info["exif"]``.

    Args:
        img: any PIL image.

    Returns:
        A new RGB image (``img`` is not modified).
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a malformed EXIF block must not lose the picture
        logger.warning("ignoring unreadable EXIF orientation: %s", exc)
    if img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.float32) / 257.0  # (H, W)
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        return Image.fromarray(_min_max_uint8(np.asarray(img, dtype=np.float64))).convert("RGB")
    return img.convert("RGB")


def _min_max_uint8(values: np.ndarray) -> np.ndarray:
    """``values`` stretched to 0..255 over their finite range (constant: 128; non-finite: 0)."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi == lo:
        out = np.full(values.shape, 128.0)
    else:
        out = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    out[~finite] = 0
    return np.round(out).astype(np.uint8)


def _decode_path(path: Path, max_pixels: int | None) -> Image.Image:
    if not path.exists():
        raise CropInputError(f"image file not found: {path}")
    if not path.is_file():
        raise CropInputError(f"not a file: {path}")
    return _decode(path, str(path), max_pixels)


def _decode(fp: Any, name: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode ``fp`` under the pixel limit; every failure is a one-line error."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        limit = saved if max_pixels is None else max_pixels
        Image.MAX_IMAGE_PIXELS = limit
        try:
            with warnings.catch_warnings():
                # Pillow only warns between 1x and 2x its limit (and raises above): refuse both, silently
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fp) as img:
                    img.load()  # decode now, so a truncated or corrupt file fails here
                    return to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
            raise CropInputError(f"image too large: {name} has {size}, over the limit of {limit:,} (a guard "
                                 f"against decompression bombs; for trusted input raise it with "
                                 f"--max-image-pixels N, or max_pixels=N in load_image)") from None
        except UnidentifiedImageError:
            raise CropInputError(f"not an image file (unrecognised format): {name}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CropInputError(f"corrupt or unreadable image {name}: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported: never import it here
    return torch is not None and isinstance(obj, torch.Tensor)


def _array_to_image(source: Any) -> Image.Image:
    """A PIL image from a numpy array or torch tensor of one of the documented shapes and dtypes."""
    kind = "numpy array"
    channels_first = False
    if _is_torch_tensor(source):
        kind = "torch tensor"
        tensor = source.detach().cpu()
        source = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
        channels_first = source.ndim == 3 and source.shape[0] in (1, 3, 4)  # torch's C,H,W convention
    arr = np.asarray(source)
    if arr.ndim == 3:
        if not channels_first and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
            channels_first = True
        if channels_first:
            arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
        if arr.shape[-1] not in (1, 3, 4):
            raise CropInputError(f"cannot use a {kind} of shape {tuple(np.shape(source))} as an image: "
                                 "expected (H,W), (H,W,C) or (C,H,W) with C in 1, 3, 4")
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        hint = "; pass one image at a time (e.g. x[0])" if arr.ndim == 4 else ""
        raise CropInputError(f"cannot use a {kind} of shape {tuple(arr.shape)} as an image: expected (H,W), "
                             f"(H,W,C) or (C,H,W) with C in 1, 3, 4{hint}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and not np.isfinite(arr).all():
            raise CropInputError(f"a float {kind} used as an image has NaN or infinite values")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise CropInputError(f"a float {kind} used as an image must hold values in [0, 1], got {lo:g}..{hi:g} "
                                 "(scale it, or pass uint8 values 0..255)")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise CropInputError(f"cannot use a {kind} of dtype {arr.dtype} as an image: expected uint8 (0..255), "
                             "uint16, bool or float in [0, 1]")
    if arr.size == 0:
        raise CropInputError(f"image too small: the {kind} has shape {tuple(np.shape(source))}")
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA


def check_question(question: object) -> str:
    """The question, stripped.

    Raises:
        CropInputError: if it is not a non-empty string of reasonable length.
    """
    if not isinstance(question, str):
        raise CropInputError(f"the question must be text, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise CropInputError("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise CropInputError(f"the question is too long ({len(text)} characters, at most {MAX_QUESTION_CHARS})")
    return text
