"""``lestd-export compress [MODEL] -o DIR``: write a reloadable compressed checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import MODEL_HELP, add_compression_flags, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="compress a model's attention and save a checkpoint",
        description="Compress every attention layer (Stage I HOOI + Stage II pruning) and write "
                    "model.safetensors, config.json, tokenizer files and compression_report.json.")
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compression_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..compress import compress_model, save_compressed
    from ..io import check_output_dir
    from ..loading import load_model

    config = config_from_args(args)
    check_output_dir(args.output, args.overwrite)
    loaded = load_model(args.model)
    report = compress_model(loaded.model, config, progress=not args.quiet, source=loaded.source)
    save_compressed(loaded, report, args.output, overwrite=args.overwrite)
    summary = {k: report[k] for k in ("method", "size_fraction", "params", "seconds")}
    summary["relative_weight_error"] = report["relative_weight_error"]["overall"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0
