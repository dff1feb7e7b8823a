"""The ``crop`` command line: one module per subcommand, each a thin layer over the Python API.

Every subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code.
User errors (:class:`crop.errors.CropInputError`) print one line and exit with code 2.

Building the parser stays light (no torch, no transformers), so ``crop --help`` is quick:
subcommands import heavy modules only when they run, and a subcommand whose *parser* needs
them (``train``: its fine-tuning options live with the torch recipe) is listed in
:data:`LAZY_SUBCOMMANDS` with its one-line help and registered only when it is the one invoked.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("answer", "synth", "train", "eval", "bench", "methods", "demo")
# name -> the help line its ``register`` gives (a test keeps the two equal)
LAZY_SUBCOMMANDS = {"train": "train the embedded models"}


class _LazySubParsersAction(argparse._SubParsersAction):
    """Subparsers where some entries are placeholders until their subcommand is parsed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, str] = {}

    def add_lazy(self, name: str, help: str, module: str) -> None:
        """List ``name`` (with ``help``) now; call ``module.register`` only when ``name`` is parsed."""
        self._lazy[name] = module
        self.add_parser(name, help=help, add_help=False)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values and values[0] in self._lazy:
            name = values[0]
            module = importlib.import_module(self._lazy.pop(name))
            del self._name_parser_map[name]
            self._choices_actions = [a for a in self._choices_actions if a.dest != name]
            module.register(self)  # the real parser replaces the placeholder
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="crop",
        description="CROP: answer visual questions with a fraction of the visual tokens "
        "(localize the region the question is about, then prune the rest).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details to stderr")
    parser.register("action", "parsers", _LazySubParsersAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if not isinstance(sub, _LazySubParsersAction):  # the action registered above
        raise TypeError(f"unexpected subparsers action {type(sub).__name__}")
    for name in SUBCOMMANDS:
        if name in LAZY_SUBCOMMANDS:
            sub.add_lazy(name, LAZY_SUBCOMMANDS[name], f"crop.cli.{name}")
            continue
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
