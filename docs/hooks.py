"""mkdocs hook: pages generated at build time, so they are always current and never typed by hand.

- ``index.md``: the README, its ``docs/...`` links made relative to the site (one text, two places);
- ``reference/cli.md``: the ``--help`` of ``crop`` and of every subcommand, from the parsers themselves;
- ``results/index.md`` and ``results/<folder>/index.md`` for every folder of ``results/``: the command(s)
  that made it (from ``scripts/*.sh`` and the folder's own JSON), the folder's ``NOTES.md`` (the run's lab
  notebook, if any), then every Markdown file a command wrote there, the plots, and the data files
  (served with the site, so the pages' links to them work).

Nothing is written into the repository: mkdocs gets the pages as generated files. The functions are
plain Python (``cli_reference``, ``results_pages``) so the tests can check them without mkdocs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
HELP_WIDTH = "100"  # argparse wraps at $COLUMNS: fix it so the page does not depend on the terminal


def cli_reference() -> str:
    """The CLI reference page: ``crop --help`` and each subcommand's ``--help``, in registration order."""
    from crop.cli import SUBCOMMANDS, build_parser

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        top = build_parser()
        sections = ["# Command line reference", "",
                    "Generated from the parsers when the docs are built (`docs/hooks.py`): what `--help` prints.", "",
                    "## crop", "", "```text", top.format_help().rstrip(), "```", ""]
        for name in SUBCOMMANDS:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                build_parser().parse_args([name, "--help"])  # lazy subcommands register their real parser here
            sections += [f"## crop {name}", "", "```text", out.getvalue().rstrip(), "```", ""]
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(sections)


def home_page() -> str:
    """The README as the site's home page: links into ``docs/`` point at the pages themselves."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", readme)


def _commands(folder: str) -> list[str]:
    """The commands in ``scripts/*.sh`` whose text names ``results/<folder>`` (continuation lines joined,
    the script's own ``NAME=value`` variables expanded, so each line runs as shown from the repo root)."""
    found = []
    pattern = re.compile(rf"results/{re.escape(folder)}(?![\w-])")
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        joined = re.sub(r"\\\n\s*", "", script.read_text(encoding="utf-8"))
        variables = dict(re.findall(r"^([A-Z][A-Z_]*)=([^\s$]+)$", joined, re.M))
        for line in joined.splitlines():
            line = line.strip()
            if pattern.search(line) and not line.startswith("#"):
                for name, value in variables.items():
                    line = re.sub(rf"\$\{{?{name}\}}?(?![A-Za-z_])", value, line)
                found.append(f"{line}    # scripts/{script.name}")
    return found


def _recorded_commands(path: Path) -> list[str]:
    """``command`` fields of the folder's JSON files (the benches and studies record their own command line)."""
    out = []
    for data_file in sorted(path.rglob("*.json")):
        if data_file.stat().st_size > 2_000_000:
            continue
        try:
            data = json.loads(data_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        command = data.get("command") if isinstance(data, dict) else None
        if isinstance(command, str) and command not in out:
            out.append(command)
        elif isinstance(command, list) and " ".join(map(str, command)) not in out:
            out.append(" ".join(map(str, command)))
    return out


def _demoted(markdown: str) -> str:
    """``markdown`` with its first ``# `` title dropped and every other heading one level deeper."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    fenced = False
    out = []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if (not fenced and re.match(r"#{1,5} ", line)) else line)
    return "\n".join(out).strip()


def _relinked(markdown: str, rel_dir: str) -> str:
    """Links between Markdown files of one results folder point at the inlined sections' anchors instead."""
    def repl(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or not target.endswith(".md"):
            return match.group(0)
        return f"{match.group(1)}(#{_anchor(str(Path(rel_dir, target)))})"
    return re.sub(r"(\[[^\]]*\])\(([^)#\s]+)\)", repl, markdown)


def _anchor(rel: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", rel.lower()).strip("-")


def results_folder_page(path: Path) -> str:
    """The page of one results folder."""
    name = path.name
    lines = [f"# {name}", ""]
    commands = _commands(name) or _recorded_commands(path)
    if commands:
        lines += ["Made by:", "", "```bash", *commands, "```", ""]
    notes = path / "NOTES.md"
    if notes.exists():
        lines += ["## Notes", "", _demoted(notes.read_text(encoding="utf-8")), ""]
    for md in sorted(p for p in path.rglob("*.md") if p != notes):
        rel = md.relative_to(path)
        lines += [f"## `{rel}` {{#{_anchor(str(rel))}}}", "",
                  _relinked(_demoted(md.read_text(encoding="utf-8")), str(rel.parent)), ""]
    plots = sorted(path.rglob("*.png"))
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.relative_to(path)}]({p.relative_to(path)})" for p in plots]
        lines.append("")
    data = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in (".md", ".png"))
    if data:
        lines += ["## Files", "", "| file | size |", "|---|---|"]
        lines += [f"| [`{p.relative_to(path)}`]({p.relative_to(path)}) | {p.stat().st_size / 1024:,.0f} KiB |"
                  for p in data]
        lines.append("")
    return "\n".join(lines)


def _summary(path: Path) -> str:
    """One line about a results folder: its NOTES.md's first sentence, else its first Markdown title."""
    for md in [path / "NOTES.md", *sorted(path.rglob("*.md"))]:
        if md.exists():
            for line in md.read_text(encoding="utf-8").splitlines():
                text = line.lstrip("# ").strip()
                if text and not text.startswith(("<!--", "|")):
                    return text.replace("|", "\\|")[:160]
    return ""


def results_pages() -> dict[str, str]:
    """``docs path -> Markdown`` of the results index and one page per results folder."""
    folders = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    index = ["# Results", "",
             "Every measurement quoted in the README and the docs, one page per folder of `results/`, "
             "generated from the folder's own files when the docs are built. `scripts/reproduce_results.sh` "
             "re-runs the evaluations and benches.", "",
             "| folder | what |", "|---|---|"]
    index += [f"| [{p.name}]({p.name}/index.md) | {_summary(p)} |" for p in folders]
    pages = {"results/index.md": "\n".join(index) + "\n"}
    pages.update({f"results/{p.name}/index.md": results_folder_page(p) for p in folders})
    return pages


def results_assets() -> dict[str, Path]:
    """``docs path -> file`` of every non-Markdown file under ``results/`` (plots, JSON, logs)."""
    return {f"results/{p.relative_to(RESULTS)}": p for p in sorted(RESULTS.rglob("*"))
            if p.is_file() and p.suffix != ".md"}


def on_files(files, config):  # mkdocs event
    from mkdocs.structure.files import File

    files.append(File.generated(config, "index.md", content=home_page()))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for uri, content in results_pages().items():
        files.append(File.generated(config, uri, content=content))
    for uri, source in results_assets().items():
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
