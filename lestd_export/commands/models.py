"""``lestd-export models``: list the catalogue of known model aliases."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the known model aliases",
                                   description="List the catalogue in models/: alias, source, recommended settings.")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import catalogue

    for alias in catalogue.list_aliases():
        item = catalogue.entry(alias)
        default = " (default)" if alias == catalogue.DEFAULT_ALIAS else ""
        print(f"{alias}{default}: {item.name}\n  {item.description}\n  recommended: {item.recommended}")
    return 0
