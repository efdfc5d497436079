"""``lestd-export`` command line: a thin shell over the library verbs.

Each verb lives in ``lestd_export/commands/<verb>.py`` with ``register(subparsers)`` and is found
there automatically; parsers are built without importing torch, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import pkgutil
import sys
from importlib import import_module

from . import __version__
from .errors import LestdError

from . import commands


def command_modules() -> list[str]:
    """Verb modules in ``lestd_export/commands`` (every module except the shared helpers)."""
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if m.name != "common")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lestd-export",
        description="Compress LLM attention with LeSTD and run it in the compressed domain with ONNX Runtime.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_modules():
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
