"""``crop methods``: list the registered pruning methods.

Building its parser is light (``crop --help`` does not import torch), but running it imports
torch: the list comes from the method registry itself (``crop.methods``, whose classes are
torch modules) rather than from a static copy that could drift from it.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``methods`` subcommand."""
    p = subparsers.add_parser("methods", help="list the pruning methods --method accepts",
                              description="List every registered pruning method with its stage and paper.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per method."""
    from crop.methods import ALIASES, METHODS, method_names

    names = method_names()
    width = max(map(len, names))
    for name in names:
        cls = METHODS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:{width}s}  {doc}")
    print("aliases: " + ", ".join(f"{a} = {n}" for a, n in ALIASES.items()))
    return 0
