"""Every command and Python block of the README and the getting-started page runs (issue 34, item 4).

The docs speak of real checkpoints on a GPU; the test runs the same text with the stand-ins of
:data:`SWAPS` (a tiny random Qwen2.5-VL saved in the hub layout for every hub id, the CPU for
``cuda``, fewer repeats), in a scratch folder holding ``photo.jpg`` (the shipped sample image)
and ``my_vqa.jsonl`` (three questions about it). With ``CROP_DOCS_DEVICE=cuda`` (a GPU machine,
``scripts/gpu_check.sh``) ``cuda`` stays ``cuda``: the documented GPU path runs as written, on the
tiny checkpoint. A command is left out only for a reason in
:func:`skip_reason` (installing packages, the set-up scripts CI runs, the test suite itself, the
vLLM server, which ``tests/vllm_plugin/test_docs_serving.py`` runs in ``.venv-vllm``, and the demo
server, which ``tests/demo`` drives in a browser).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "README.md", ROOT / "docs" / "getting-started.md")
CPU_SWAPS = (
    ('device_map="cuda"', 'device_map="cpu"'),
    ('device="cuda"', 'device="cpu"'),
    ("--device cuda", "--device cpu"),
    ("--localizer-device cuda", "--localizer-device cpu"),
)
SWAPS = (
    ("Qwen/Qwen2.5-VL-7B-Instruct", "{qwen}"),
    ("Qwen/Qwen2.5-VL-3B-Instruct", "{qwen}"),
    *(() if os.environ.get("CROP_DOCS_DEVICE") == "cuda" else CPU_SWAPS),
    ("--repeats 3", "--repeats 1"),
    ("--batch 1,8", "--batch 1,2"),
)
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks(page: Path, language: str) -> list[str]:
    """The fenced ``language`` blocks of ``page``, in order."""
    return [m.group(2) for m in FENCE.finditer(page.read_text(encoding="utf-8")) if m.group(1) == language]


def commands(block: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment (none of ours quotes a '#')
        if line and not line.startswith("#"):
            out.append(line)
    return out


def skip_reason(command: str) -> str | None:
    """Why ``command`` is not run here, or None to run it."""
    if command.startswith("pip install"):
        return "installs packages (CI's set-up installs them)"
    if re.fullmatch(r"bash scripts/setup(_\w+)?\.sh", command.split(" #")[0].strip()):
        return "a set-up script (CI runs each one)"
    if "pytest" in command:
        return "the test suite itself"
    if "vllm.entrypoints" in command:
        return "the vLLM server (tests/vllm_plugin/test_docs_serving.py runs it in .venv-vllm)"
    if re.search(r"\bcrop demo\b", command):
        return "the demo web server (tests/demo drives it in a browser)"
    return None


def without_setup(command: str) -> str:
    """``command`` without a leading ``bash scripts/setup.sh &&`` (CI has run the set-up before the suite)."""
    return re.sub(r"^bash scripts/setup\.sh\s*&&\s*", "", command)


def swapped(text: str, qwen: str) -> str:
    for docs, test in SWAPS:
        text = text.replace(docs, test.replace("{qwen}", qwen))
    return text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder laid out as the docs assume, plus the tiny hub checkpoint."""
    from PIL import Image

    from tests.models.test_hub_layout import hub_qwen_folder

    folder = tmp_path_factory.mktemp("docs")
    hub_qwen_folder(folder / "tiny-qwen2.5-vl", "qwen2_5_vl", "hub")
    shutil.copy(ROOT / "examples" / "sample.png", folder / "photo.jpg")  # PIL reads it whatever the name
    (folder / "examples").symlink_to(ROOT / "examples")
    (folder / "scripts").symlink_to(ROOT / "scripts")
    bin_dir = folder / ".venv" / "bin"  # the docs' `.venv/bin/crop` and bare `crop`: this interpreter's crop
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "crop").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m crop "$@"\n')
    (bin_dir / "crop").chmod(0o755)
    width, height = Image.open(folder / "photo.jpg").size
    rows = [{"image": "photo.jpg", "question": q, "answers": [a], "box_px": [0, 0, width // 2, height // 2]}
            for q, a in (("What color is the star?", "purple"), ("What shape is red?", "circle"),
                         ("How many shapes are there?", "3"))]
    (folder / "my_vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _cases() -> list[tuple[str, str]]:
    return [(page.name, command) for page in PAGES for block in blocks(page, "bash") for command in commands(block)]


def test_the_pages_have_snippets():
    runnable = [c for _, c in _cases() if skip_reason(c) is None]
    assert len(runnable) >= 8, runnable
    assert all(blocks(page, "python") for page in PAGES)


def _environment(workdir: Path) -> dict[str, str]:
    """The commands' environment: the scratch ``.venv/bin`` first on PATH, this interpreter's import path."""
    return {**os.environ, "PATH": f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir())}


def _own_folder(workdir: Path, tmp_path: Path) -> Path:
    """A fresh folder with links to the shared files: one command's outputs never meet another's."""
    for item in workdir.iterdir():
        (tmp_path / item.name).symlink_to(item)
    return tmp_path


@pytest.mark.parametrize(("page", "command"), _cases(), ids=lambda v: v if len(v) < 60 else v[:57] + "...")
def test_command_runs(page, command, workdir, tmp_path):
    reason = skip_reason(command)
    if reason is not None:
        pytest.skip(reason)
    env = _environment(workdir)
    run = swapped(without_setup(command), str(workdir / "tiny-qwen2.5-vl"))
    done = subprocess.run(["bash", "-c", run], cwd=_own_folder(workdir, tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{page}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run_in_order(page, workdir, tmp_path, monkeypatch, capsys):
    """A page's Python blocks run one after another in one namespace, as a reader pastes them."""
    monkeypatch.chdir(_own_folder(workdir, tmp_path))
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(blocks(page, "python"), 1):
        code = compile(swapped(block, str(workdir / "tiny-qwen2.5-vl")), f"{page.name}, python block {number}", "exec")
        exec(code, namespace)  # noqa: S102  (the docs' own code, the point of the test)
    assert capsys.readouterr().out.strip(), "the blocks print their results"


def test_the_main_command_says_what_the_readme_says(workdir, tmp_path):
    """The README's first command answers 'purple' with the star's region, as its text claims."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    main = next(c for c in commands(blocks(ROOT / "README.md", "bash")[0]) if "crop answer" in c)
    assert "(`purple`)" in readme and "`[3, 6, 4, 7]`" in readme
    folder = _own_folder(workdir, tmp_path)
    done = subprocess.run(["bash", "-c", without_setup(main) + " --json"], cwd=folder, env=_environment(workdir),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["answer"].strip() == "purple" and result["box"] == [3, 6, 4, 7]
    assert (folder / "crop_answer.png").exists()
