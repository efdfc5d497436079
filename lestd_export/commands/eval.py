"""``lestd-export eval TARGET``: perplexity of a model (PyTorch) or an ONNX export (ONNX Runtime)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import MODEL_HELP


def add_text_flags(parser: argparse.ArgumentParser, max_tokens: int | None = None) -> None:
    """Text source and window flags (shared with ``sweep``, whose token limit defaults to 8192)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text-file", type=Path, default=None, metavar="F", help="evaluate on a UTF-8 text file")
    source.add_argument("--dataset", choices=("default", "wikitext2"), default=None,
                        help="default: the Python language reference shipped with Python (offline, the default); "
                             "wikitext2: WikiText-2 test split (needs the 'datasets' package and network)")
    parser.add_argument("--seq-len", type=int, default=512, metavar="N",
                        help="window length in tokens; windows do not overlap (default 512)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                        help=f"use at most the first N tokens of the text (default: {max_tokens or 'all'})")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure perplexity (PyTorch model or ONNX export)",
        description="Perplexity over non-overlapping windows, with PyTorch (any model argument, compressed "
                    "checkpoints included) or ONNX Runtime (an export directory holding model.onnx).")
    parser.add_argument("target", nargs="?", default=None,
                        help=f"torch backend: {MODEL_HELP}; onnxruntime backend: an export directory or an "
                             "onnxruntime-genai directory (genai_config.json)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default=None,
                        help="torch or onnxruntime (default: onnxruntime for an onnxruntime-genai directory, "
                             "torch otherwise)")
    add_text_flags(parser)
    parser.add_argument("--tasks", default=None, metavar="LIST",
                        help="comma list of lm-eval-harness tasks (e.g. hellaswag,piqa) for zero-shot accuracy "
                             "of the PyTorch model; skipped with a note when lm-eval is not installed")
    parser.add_argument("--json", type=Path, default=None, metavar="F", help="also write the result to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate
    from ..io import check_output_files, write_json

    check_output_files(args.json)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    result = evaluate(args.target, backend=args.backend, text_file=args.text_file, dataset=args.dataset,
                      seq_len=args.seq_len, max_tokens=args.max_tokens, progress=not args.quiet, tasks=tasks)
    if "skipped" in result.get("tasks", {}):
        print(f"note: {result['tasks']['skipped']}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        write_json(args.json, result)
    return 0
