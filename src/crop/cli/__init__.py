"""The ``crop`` command line: one module per subcommand, each a thin layer over the Python API.

Every subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code.
User errors (:class:`crop.errors.CropInputError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("answer", "synth", "train", "eval", "bench", "methods")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="crop",
        description="CROP: answer visual questions with a fraction of the visual tokens "
        "(localize the region the question is about, then prune the rest).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"crop.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet must not break the others
            if exc.name == f"crop.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crop`` console script."""
    from crop.errors import CropInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CropInputError as exc:
        print(f"crop {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
