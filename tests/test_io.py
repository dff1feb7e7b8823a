"""Bad and unusual inputs: what ``load_image`` and ``crop answer`` do with each, as one table.

``BAD_INPUTS`` (images through :func:`crop.io.load_image`) and ``BAD_CLI`` (``crop answer``
arguments refused before any model loads) are the cases tried; :func:`render_table` runs them
and renders docs/bad_inputs.md, which a test keeps current
(regenerate: ``.venv/bin/python scripts/bad_inputs_table.py > docs/bad_inputs.md``).
"""

from __future__ import annotations

import contextlib
import io
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from crop.errors import CropInputError
from crop.io import load_image
from tests.conftest import ARCHS, tiny

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
GRADIENT = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520, a mid-grey mean


def _save(folder: Path, name: str, img: Image.Image, **kw) -> Path:
    path = folder / name
    img.save(path, **kw)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` but holds an 8x8 picture (a decompression bomb, cheaply)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _bytes_file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _exif_jpeg(folder: Path, orientation: int = 6) -> Path:
    """A 40x20 JPEG, left half red and right half blue, tagged with EXIF ``orientation``."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = img.getexif()
    exif[0x0112] = orientation
    return _save(folder, "phone.jpg", img, exif=exif.tobytes(), quality=95)


def _png_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    """One input tried: ``what`` (as the table shows it), how to build it, and the outcome expected.

    ``refused`` is a fragment of the one-line error, or ``None`` when the input must load; then
    ``check`` (if any) must hold for the loaded image.
    """

    what: str
    make: Callable[[Path], Any]
    refused: str | None = None
    check: Callable[[Image.Image], bool] | None = None
    max_pixels: int | None = None


def _mean(img: Image.Image) -> float:
    return float(np.asarray(img).mean())


def _mid_grey(img: Image.Image) -> bool:
    return 120 <= _mean(img) <= 136


BAD_INPUTS = [
    Case("16-bit greyscale PNG (`I;16`), values 0..65520", lambda d: _save(d, "g16.png", Image.fromarray(GRADIENT)),
         check=_mid_grey),
    Case("16-bit big-endian TIFF (`I;16B`), values 0..65520",
         lambda d: _save(d, "g16b.tif", Image.fromarray(GRADIENT.byteswap().view(">u2"))), check=_mid_grey),
    Case("32-bit integer TIFF (`I`), values 0..65520",
         lambda d: _save(d, "g32.tif", Image.fromarray(GRADIENT.astype(np.int32))), check=_mid_grey),
    Case("float TIFF (`F`), values 0..1", lambda d: _save(d, "f.tif", Image.fromarray(GRADIENT / np.float32(65535))),
         check=_mid_grey),
    Case("float TIFF (`F`), constant 7.5", lambda d: _save(d, "c.tif", Image.fromarray(np.full((8, 8), 7.5, np.float32))),
         check=lambda im: _mean(im) == 128),
    Case("in-memory PIL image, mode `I;16`", lambda d: Image.fromarray(GRADIENT), check=_mid_grey),
    Case("phone JPEG 40x20 with EXIF orientation 6", _exif_jpeg, check=lambda im: im.size == (20, 40)),
    Case("PNG declaring 10000x10000 (1x..2x Pillow's pixel limit)",
         lambda d: _bytes_file(d, "bomb1.png", _png_header(10000, 10000)), refused="image too large"),
    Case("PNG declaring 20000x20000 (over 2x Pillow's pixel limit)",
         lambda d: _bytes_file(d, "bomb2.png", _png_header(20000, 20000)), refused="image too large"),
    Case("64x64 PNG with `max_pixels=1000`", lambda d: _save(d, "small.png", Image.new("RGB", (64, 64))),
         refused="over the limit of 1,000", max_pixels=1000),
    Case("64x64 PNG with `max_pixels=4096`", lambda d: _save(d, "small.png", Image.new("RGB", (64, 64))),
         check=lambda im: im.size == (64, 64), max_pixels=4096),
    Case("20000x1 PNG", lambda d: _save(d, "line.png", Image.new("RGB", (20000, 1))), refused="image too small"),
    Case("2000x20 PNG (100:1)", lambda d: _save(d, "strip.png", Image.new("RGB", (2000, 20))),
         refused="extreme aspect ratio"),
    Case("500x10 PNG (50:1)", lambda d: _save(d, "ok_strip.png", Image.new("RGB", (500, 10))),
         check=lambda im: im.size == (500, 10)),
    Case("3x3 PNG", lambda d: _save(d, "dot.png", Image.new("RGB", (3, 3))), refused="image too small"),
    Case("numpy uint8 (48, 64, 3)", lambda d: np.full((48, 64, 3), 200, np.uint8),
         check=lambda im: im.size == (64, 48) and _mean(im) == 200),
    Case("numpy uint8 greyscale (48, 64)", lambda d: np.full((48, 64), 50, np.uint8),
         check=lambda im: im.size == (64, 48) and _mean(im) == 50),
    Case("numpy float (48, 64, 3) in [0, 1]", lambda d: np.full((48, 64, 3), 0.5),
         check=lambda im: im.size == (64, 48) and _mean(im) == 128),
    Case("numpy uint16 (48, 64)", lambda d: np.full((48, 64), 65535, np.uint16), check=lambda im: _mean(im) == 255),
    Case("numpy float (48, 64) with values up to 255", lambda d: np.full((48, 64), 255.0), refused="values in [0, 1]"),
    Case("numpy float with a NaN", lambda d: np.full((48, 64), np.nan), refused="NaN"),
    Case("numpy int64 (48, 64)", lambda d: np.zeros((48, 64), np.int64), refused="dtype int64"),
    Case("numpy batch (2, 48, 64, 3)", lambda d: np.zeros((2, 48, 64, 3), np.uint8), refused="one image at a time"),
    Case("torch float (3, 48, 64) in [0, 1]", lambda d: torch.full((3, 48, 64), 1.0),
         check=lambda im: im.size == (64, 48) and _mean(im) == 255),
    Case("torch uint8 (48, 64, 3)", lambda d: torch.zeros(48, 64, 3, dtype=torch.uint8),
         check=lambda im: im.size == (64, 48)),
    Case("torch float (5, 48, 64)", lambda d: torch.zeros(5, 48, 64), refused="C in 1, 3, 4"),
    Case("raw PNG bytes", lambda d: _png_bytes(), check=lambda im: im.size == (64, 48)),
    Case("binary file object", lambda d: io.BytesIO(_png_bytes()), check=lambda im: im.size == (64, 48)),
    Case("bytes that are not an image", lambda d: b"hello", refused="not an image file"),
    Case("a list of numbers", lambda d: [[0, 1], [2, 3]], refused="expected a path, encoded image bytes"),
    Case("missing file", lambda d: d / "missing.png", refused="not found"),
    Case("a folder", lambda d: d, refused="not a file"),
    Case("text file named .png", lambda d: _bytes_file(d, "notes.png", b"not an image"), refused="not an image"),
    Case("truncated PNG", lambda d: _bytes_file(d, "cut.png", _png_bytes((300, 300))[:100]), refused="corrupt"),
]


@dataclass(frozen=True)
class CliCase:
    """``crop answer`` arguments refused before any model loads (``{d}``: a scratch folder)."""

    argv: tuple[str, ...]
    refused: str
    linux_only: bool = False


BAD_CLI = [
    CliCase(("{d}/in.png", "q?", "--overlay", "out.jpg"), "must be a .png"),
    CliCase(("{d}/in.png", "q?", "--overlay", "{d}/no_such_dir/out.png"), "does not exist"),
    CliCase(("{d}/in.png", "q?", "--overlay", "{d}/shots.png"), "is a folder"),
    CliCase(("{d}/in.png", "q?", "--overlay", "/proc/out.png"), "not writable", linux_only=True),
    CliCase(("{d}/in.png", "q?", "--sample"), "not both"),
    CliCase(("q?",), "no image"),
    CliCase(("{d}/in.png", "q?", "--max-image-pixels", "1000"), "image too large"),
    CliCase(("{d}/in.png", "q?", "--max-image-pixels", "0"), "must be a positive integer"),
    CliCase(("{d}/strip.png", "q?"), "extreme aspect ratio"),
]


def _cli_folder(folder: Path) -> None:
    Image.new("RGB", (64, 64), (9, 90, 200)).save(folder / "in.png")
    Image.new("RGB", (2000, 20)).save(folder / "strip.png")
    (folder / "shots.png").mkdir(exist_ok=True)


def _outcome(case: Case, folder: Path) -> tuple[Image.Image | None, str]:
    """The loaded image (or ``None``) and the table's outcome text, scratch paths removed."""
    try:
        img = load_image(case.make(folder), max_pixels=case.max_pixels)
    except CropInputError as exc:
        return None, "refused: " + str(exc).replace(f"{folder}/", "").replace(str(folder), "<folder>")
    return img, f"loaded: {img.size[0]}x{img.size[1]} RGB, mean level {_mean(img):.0f}"


def _cli_outcome(case: CliCase, folder: Path) -> tuple[int, str]:
    from crop.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["answer", *(a.format(d=folder) for a in case.argv)])
    return code, err.getvalue().strip().replace(f"{folder}/", "")


def render_table() -> str:
    """docs/bad_inputs.md: every case above, run now, with its outcome."""
    lines = ["# Bad inputs tried", "",
             "Generated from the case lists in `tests/test_io.py` (`.venv/bin/python scripts/bad_inputs_table.py "
             "> docs/bad_inputs.md`); a test keeps it current.", "",
             "## Images (`crop.io.load_image`, which `CropPipeline` and `crop answer` use)", "",
             "| input | outcome |", "|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case in BAD_INPUTS:
            lines.append(f"| {case.what} | {_outcome(case, folder)[1]} |")
        lines += ["", "## `crop answer` arguments (refused before any model loads; exit code 2)", "",
                  "| arguments | outcome |", "|---|---|"]
        _cli_folder(folder)
        for case in BAD_CLI:
            code, err = _cli_outcome(case, folder)
            shown = " ".join(a.replace("{d}/", "") for a in case.argv)
            lines.append(f"| `crop answer {shown}` | exit {code}: {err} |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.what for c in BAD_INPUTS])
def test_load_image_case(case, tmp_path):
    img, outcome = _outcome(case, tmp_path)
    if case.refused is None:
        assert img is not None, outcome
        assert img.mode == "RGB"
        assert case.check is None or case.check(img), outcome
    else:
        assert img is None, f"{case.what} was accepted: {outcome}"
        assert case.refused in outcome and "\n" not in outcome, outcome


@pytest.mark.parametrize("case", BAD_CLI, ids=[" ".join(c.argv) for c in BAD_CLI])
def test_cli_refuses_before_loading_a_model(case, tmp_path, monkeypatch):
    if case.linux_only and not Path("/proc/self").exists():
        pytest.skip("needs /proc")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("crop.models.loading.load_model", no_model)
    _cli_folder(tmp_path)
    code, err = _cli_outcome(case, tmp_path)
    assert code == 2, err
    assert err.startswith("crop answer: error:") and "\n" not in err and case.refused in err, err


def test_bad_inputs_doc_is_current():
    assert DOC.read_text(encoding="utf-8") == render_table(), (
        "docs/bad_inputs.md is stale: .venv/bin/python scripts/bad_inputs_table.py > docs/bad_inputs.md")


def test_high_bit_depth_keeps_the_picture(tmp_path):
    """A 16-bit gradient used to arrive all white (convert('RGB') clips at 255); now its levels survive."""
    img = load_image(_save(tmp_path, "g16.png", Image.fromarray(GRADIENT)))
    values = np.asarray(img)[..., 0]
    assert values[0, 0] == 0 and values[-1, -1] == 255
    assert np.all(np.diff(values.reshape(-1).astype(int)) >= 0)  # still a monotone ramp
    f = load_image(_save(tmp_path, "f.tif", Image.fromarray(GRADIENT / np.float32(65535))))
    assert np.asarray(f)[-1, -1, 0] == 255 and np.asarray(f)[0, 0, 0] == 0  # used to be all black


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (rotate 90 degrees clockwise to view): the red left half ends up on top."""
    for source in (_exif_jpeg(tmp_path), Image.open(_exif_jpeg(tmp_path))):
        img = load_image(source)
        assert img.size == (20, 40)
        top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_pixel_limit_is_restored_and_warnings_are_not_printed(tmp_path, recwarn):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(CropInputError, match="image too large"):
        load_image(_bytes_file(tmp_path, "bomb.png", _png_header(10000, 10000)))
    with pytest.raises(CropInputError, match="image too large"):
        load_image(_save(tmp_path, "small.png", Image.new("RGB", (64, 64))), max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(CropInputError, match="max_pixels must be a positive integer"):
        load_image(tmp_path / "small.png", max_pixels=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_refuses_extreme_aspect_for_every_family(arch):
    """The refusal comes before the processor (a LLaVA processor would upscale 2000x20 to 33600x336)."""
    from crop.localizers import make_localizer
    from crop.pipeline import CropPipeline

    model, processor = tiny(arch)
    pipe = CropPipeline(model, processor, make_localizer("full"))
    with pytest.raises(CropInputError, match="extreme aspect ratio"):
        pipe(Image.new("RGB", (2000, 20)), "What is it?")


def test_pipeline_answers_a_numpy_image():
    from crop.localizers import make_localizer
    from crop.pipeline import CropPipeline

    model, processor = tiny("tiny-random-llava")
    pipe = CropPipeline(model, processor, make_localizer("full"))
    result = pipe(np.random.default_rng(0).random((300, 400, 3)), "What is it?", max_new_tokens=1)
    assert result.visual_tokens_in == 576


if __name__ == "__main__":
    sys.stdout.write(render_table())
