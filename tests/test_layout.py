"""The package's import arrows, read from the source: what may import what, and no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "crop"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """``(module, [names])`` of every ``from crop... import`` and ``import crop...`` in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crop"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("crop"))
    return found


def test_nothing_outside_the_cli_imports_from_it():
    offenders = [(mod, imported) for mod, tree in _modules().items()
                 if not mod.startswith("crop.cli") and mod != "crop.__main__"
                 for imported, _ in _imports(tree) if imported == "crop.cli" or imported.startswith("crop.cli.")]
    assert not offenders, offenders


def test_no_private_name_is_imported_across_modules():
    offenders = [(mod, imported, name) for mod, tree in _modules().items()
                 for imported, names in _imports(tree) for name in names
                 if name.startswith("_") and not name.startswith("__") and imported != mod]
    assert not offenders, offenders


def test_the_adapter_base_does_not_import_the_adapters():
    """Adapters register themselves, as methods do; the package's ``get_adapter`` imports them, not their base."""
    base = _modules()["crop.models.base"]
    assert not [m for m, _ in _imports(base) if m in ("crop.models.llava", "crop.models.llava_next",
                                                        "crop.models.qwen2_vl")]


def test_evaluation_and_training_modules_hold_one_idea_each():
    """Issue 27: the files that had grown several ideas were split; none of their parts grows back past 400 lines."""
    long = [(str(p.relative_to(SRC)), n) for folder in ("eval", "train") for p in sorted((SRC / folder).glob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400]
    assert not long, long
