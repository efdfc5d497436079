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


ONNX_VERB = "compress-onnx"  # what `lestd-export MODEL.onnx ...` / `lestd-export ONNX_DIR ...` runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lestd-export",
        description="Compress LLM attention with LeSTD and run it in the compressed domain with ONNX Runtime.",
        epilog=f"lestd-export MODEL.onnx -o DIR [compression flags] [--quantize int4|int8|none] (or a directory "
               f"holding a decoder .onnx) compresses the attention of an existing decoder ONNX, an onnxruntime-genai "
               f"build or an optimum export: shorthand for `lestd-export {ONNX_VERB} MODEL.onnx ...`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_modules():
        import_module(f".commands.{name}", __package__).register(subparsers)
    return parser


def verbs(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def expand_shorthand(argv: list[str], known: set[str]) -> list[str]:
    """``MODEL.onnx ...`` or ``ONNX_DIR ...`` (no verb) -> ``compress-onnx MODEL.onnx ...``."""
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        from .onnx_input import is_onnx_input

        if is_onnx_input(argv[0]):
            return [ONNX_VERB, *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(expand_shorthand(argv, verbs(parser)))
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
