"""``--option [METHOD.]KEY=VALUE``: any field of any method's config from the command line, with no per-method flag.

The CLI only parses the text; :func:`crop.methods.build_config` decides what reaches which config.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from crop.errors import CropInputError

if TYPE_CHECKING:  # crop.methods imports torch; building the parser must not
    from crop.methods import Option

HELP = ("set a field of the method's config, e.g. --option ratio=0.3, --option layers=2,8,16, --option "
        "budget=exact; prefix a method to target one of several (--option dart.budget=exact); repeatable. "
        "'crop methods' lists each method's fields")


def add_option_argument(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--option`` flag."""
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=HELP)


def parse_options(raw: list[str]) -> list[Option]:
    """The ``--option`` values as :class:`crop.methods.Option` entries.

    Raises:
        CropInputError: for a malformed entry.
    """
    from crop.methods import Option

    try:
        return [Option.parse(item) for item in raw]
    except ValueError as exc:
        raise CropInputError(f"--option: {exc}") from None


def option_rows(options: list[Option]) -> list[list]:
    """``[[method or None, field, value]]``: options as the JSON rows an evaluation or bench spec records."""
    return [[o.method, o.field, o.value] for o in options]
