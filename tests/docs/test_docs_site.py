"""The docs stay honest: generated blocks are current, generated pages cover what they claim, the site builds.

- every ``<!-- generated: ... -->`` block of the README and docs/ equals what its generator writes
  from the results files now (``scripts/docs_tables.py``);
- the CLI reference (built from the parsers by ``docs/hooks.py``) has every subcommand and option;
- every folder of ``results/`` gets a page, with its plots;
- every page in mkdocs.yml's nav exists, every README link to docs/ resolves, the README is one screen;
- ``mkdocs build --strict`` passes (where mkdocs is installed: the dev extra has it).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_are_current():
    tables = _module(ROOT / "scripts" / "docs_tables.py", "docs_tables")
    files = tables.default_files()
    found = [m.group("spec") for f in files for m in tables.BLOCK.finditer(f.read_text(encoding="utf-8"))]
    assert any(spec.startswith("headline") for spec in found), "the README's headline table is generated"
    stale = {str(f.relative_to(ROOT)): tables.stale_blocks(f) for f in files}
    assert not {f: s for f, s in stale.items() if s}, "run: .venv/bin/python scripts/docs_tables.py --write"


def test_a_stale_block_is_caught(tmp_path):
    tables = _module(ROOT / "scripts" / "docs_tables.py", "docs_tables")
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: include results/k-study/k_study.md -->\n| made up | 99% |\n<!-- /generated -->\n")
    assert tables.stale_blocks(page) == ["include results/k-study/k_study.md"]
    assert tables.main(["--write", str(page)]) == 0 and tables.stale_blocks(page) == []
    with pytest.raises(ValueError, match="unknown generated block"):
        tables.render("typed-by-hand 1 2 3")


def test_cli_reference_has_every_subcommand_and_option():
    from crop.cli import SUBCOMMANDS, build_parser

    page = _module(ROOT / "docs" / "hooks.py", "docs_hooks").cli_reference()
    for name in SUBCOMMANDS:
        assert f"## crop {name}\n" in page
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("answer", "eval", "bench"):
        for action in sub.choices[name]._actions:
            for flag in action.option_strings:
                assert flag in page, f"crop {name} {flag} missing from the CLI reference"
    assert "usage: crop train" in page  # the lazily registered subcommand shows its real parser


def test_every_results_folder_has_a_page_with_its_plots():
    hooks = _module(ROOT / "docs" / "hooks.py", "docs_hooks")
    pages, assets = hooks.results_pages(), hooks.results_assets()
    folders = [p.name for p in (ROOT / "results").iterdir() if p.is_dir()]
    assert folders and all(f"results/{f}/index.md" in pages for f in folders)
    for f in folders:
        assert f"[{f}]({f}/index.md)" in pages["results/index.md"]
        for png in (ROOT / "results" / f).rglob("*.png"):
            rel = png.relative_to(ROOT / "results" / f)
            assert f"]({rel})" in pages[f"results/{f}/index.md"] and f"results/{f}/{rel}" in assets
    equivalent = pages["results/eval-matched-equivalent/index.md"]
    assert ".venv/bin/crop eval --split test --n 400" in equivalent  # the command that made it (reproduce_results.sh)
    assert (ROOT / "results/eval-matched-equivalent/results.md").read_text().splitlines()[3] in equivalent


def test_nav_pages_exist_and_readme_links_resolve():
    nav = re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    generated = {"index.md", "reference/cli.md", "results/index.md"}
    assert len(nav) >= 20
    assert [p for p in nav if p not in generated and not (ROOT / "docs" / p).exists()] == []
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and [link for link in links if not (ROOT / link).exists()] == []
    assert len(readme.encode()) <= 15_000, "the README is one screen (issue 34: at most ~15 KB)"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (pip install -e '.[docs]')")
def test_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
    assert (tmp_path / "site" / "results" / "eval-matched-equivalent" / "accuracy_vs_flops.png").exists()
