"""``--option KEY=VALUE``: any field of any method's config from the command line, with no per-method flag."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from crop.errors import CropInputError

HELP = ("set a field of the method's config, e.g. --option ratio=0.3, --option layers=2,8,16, --option "
        "budget=exact; prefix a method to target one of several (--option dart.budget=exact); repeatable. "
        "'crop methods' lists each method's fields")


def add_option_argument(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--option`` flag."""
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=HELP)


def parse_options(raw: list[str]) -> list[tuple[str | None, str, str]]:
    """``[(method or None, field, value)]`` from ``KEY=VALUE`` strings.

    Raises:
        CropInputError: for a malformed entry.
    """
    out = []
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CropInputError(f"--option takes KEY=VALUE (e.g. ratio=0.3), got {item!r}")
        method, dot, field = key.strip().rpartition(".")
        out.append((method if dot else None, field, value))
    return out


def apply_options(config: Any, options: list[tuple[str | None, str, str]], strict: bool = True) -> Any:
    """``config`` with the options that concern it applied.

    Args:
        config: a method config.
        options: from :func:`parse_options`.
        strict: an unprefixed option the config does not have is an error (one method); with
            several methods it only has to fit one of them (see :func:`check_options_used`).

    Raises:
        CropInputError: for an unknown field or an invalid value.
    """
    from crop.methods import canonical_name, with_options

    names = {f.name for f in dataclasses.fields(config)}
    chosen = {}
    for method, field, value in options:
        if method is not None:
            try:
                if canonical_name(method) != config.method_name:
                    continue
            except ValueError as exc:
                raise CropInputError(f"--option {method}.{field}: {exc}") from None
        elif field not in names and not strict:
            continue
        chosen[field] = value
    try:
        return with_options(config, chosen)
    except (ValueError, TypeError) as exc:
        raise CropInputError(f"--option: {exc}") from None


def check_options_used(configs: list[Any], options: list[tuple[str | None, str, str]]) -> None:
    """Raise unless every unprefixed option is a field of at least one of ``configs``."""
    fields = {f.name for c in configs for f in dataclasses.fields(c)}
    unused = sorted({field for method, field, _ in options if method is None and field not in fields})
    if unused:
        raise CropInputError(f"--option {', '.join(unused)} is not a field of any method run here")
