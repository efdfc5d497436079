"""``lestd-export compress [MODEL] -o DIR``: write a reloadable compressed checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import MODEL_HELP, add_compression_flags, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="compress a model's attention (MLP, token table) and save a checkpoint",
        description="Compress every attention layer (Stage I HOOI + Stage II pruning) and, with --modules mlp, every "
                    "MLP weight (SVD-LLM low-rank factors), with --modules embedding the token table and lm_head "
                    "(low-rank factors), and write model.safetensors, config.json, tokenizer "
                    "files and compression_report.json.")
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the compression report (also written to "
                        "DIR/compression_report.json) instead of a summary")
    add_compression_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..compress import compress_model, save_compressed
    from ..io import check_output_dir
    from ..loading import load_model

    config = config_from_args(args)
    check_output_dir(args.output, args.overwrite)
    loaded = load_model(args.model)
    report = compress_model(loaded.model, config, tokenizer=loaded.tokenizer, progress=not args.quiet,
                            source=loaded.source)
    save_compressed(loaded, report, args.output, overwrite=args.overwrite)
    print(json.dumps(report, indent=2) if args.json else summary(report, args.output))
    return 0


def summary(report: dict, out: Path) -> str:
    """What was compressed, how far, where it went and what to run next."""
    from ..compress import REPORT_FILE, WEIGHTS_FILE

    fraction = report["size_fraction"]
    requested = "" if fraction["requested"] is None else f" (requested {fraction['requested']:g})"
    lines = []
    if "attention" in report["config"]["modules"]:
        lines.append(f"compressed with {report['method']}: attention at {fraction['with_indices']:.3f} of its dense "
                     f"size{requested}, relative weight error {report['relative_weight_error']['overall']:.3f}")
    if "mlp" in report:
        mlp = report["mlp"]
        lines.append(f"compressed with {mlp['method']}: MLP at {mlp['fraction']['stored']:.3f} of its dense size "
                     f"(requested {mlp['fraction']['requested']:g}), relative {mlp['relative_error']['norm']} error "
                     f"{mlp['relative_error']['overall']:.3f}")
    if "embedding" in report:
        table = report["embedding"]
        lines.append(f"compressed with {table['method']}: token table{'' if table['tied'] else ' and lm_head'} at "
                     f"rank {table['rank']}, {table['fraction']['stored']:.3f} of its dense size (requested "
                     f"{table['fraction']['requested']:g}), relative {table['relative_error']['norm']} lm_head error "
                     f"{table['relative_error']['head']:.3f}")
    return "\n".join([
        *lines,
        f"  {report['seconds']:.1f} s",
        f"  checkpoint: {out} ({WEIGHTS_FILE} {(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MB)",
        f"  report: {out / REPORT_FILE}",
        "next:",
        f"  lestd-export export {out} -o {out}-onnx",
        f"  lestd-export eval {out}"])
