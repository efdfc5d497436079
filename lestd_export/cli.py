"""``lestd-export`` command line: a thin shell over the library verbs.

Each verb lives in ``lestd_export/commands/<verb>.py`` with ``register(subparsers)``; parsers are
built without importing torch, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from . import __version__
from .errors import LestdError

COMMANDS = ("compress", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lestd-export",
        description="Compress LLM attention with LeSTD and run it in the compressed domain with ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        import_module(f".commands.{name}", __package__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LestdError as error:
        print(f"lestd-export {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lestd-export {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
