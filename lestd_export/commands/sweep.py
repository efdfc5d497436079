"""``lestd-export sweep [MODEL]``: perplexity versus size for LeSTD, the baselines (data-free and
calibrated) and, with ``--ort-baselines``, ONNX Runtime int8/int4 of the dense model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DEFAULT_CALIBRATION_TOKENS
from .common import MODEL_HELP
from .eval import add_text_flags


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="perplexity vs size for lestd, tensorllm and svd (data-free and calibrated)",
        description="Load the model once, measure the dense perplexity, then compress a fresh copy for every "
                    "method/setting/calibration/heal/fraction and measure it on the same tokens; with "
                    "--ort-baselines also the dense model through ONNX Runtime in fp32, int8 and int4. "
                    "Finished runs are cached (--cache-dir), so an interrupted sweep resumes where it stopped.")
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    parser.add_argument("--fractions", default="0.9,0.8,0.7,0.6,0.5", metavar="F,F,...",
                        help="requested size fractions, each in (0, 1] (default 0.9,0.8,0.7,0.6,0.5)")
    parser.add_argument("--methods", default="lestd,tensorllm,svd", metavar="M,M,...",
                        help="methods among lestd, tensorllm, svd (default: all three)")
    parser.add_argument("--granularity", default="row", metavar="G,G,...",
                        help="LeSTD pruning granularities among row, element (default row)")
    parser.add_argument("--budget", default="layer", metavar="B,B,...",
                        help="LeSTD budget scopes among layer, global (default layer)")
    parser.add_argument("--calibration", default="none,default", metavar="C,C,...",
                        help="calibration sources among none (data-free), default, wikitext2, self or text file "
                             "paths; calibrated svd is SVD-LLM whitening (default none,default: both forms)")
    parser.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS, metavar="N",
                        help=f"calibration tokens per calibrated run (default {DEFAULT_CALIBRATION_TOKENS})")
    parser.add_argument("--heal", default="no", metavar="no,yes",
                        help="heal settings among no, yes; healing applies to calibrated lestd and tensorllm "
                             "runs only (default no)")
    parser.add_argument("--ort-baselines", action="store_true",
                        help="also export the dense model and score it through ONNX Runtime in fp32, dynamic "
                             "int8 and int4 (MatMulNBits), plotted by whole-model bytes")
    add_text_flags(parser, max_tokens=8192)
    parser.add_argument("--json", type=Path, default=None, metavar="F", help="write the result as JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="F", help="write a markdown table")
    parser.add_argument("--plot", type=Path, default=None, metavar="F", help="write a Pareto plot (PNG)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="D",
                        help="where finished runs are cached (default: $LESTD_CACHE_DIR/sweep)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_files
    from ..sweep import setting_name, sweep, to_markdown, write_outputs

    check_output_files(args.json, args.markdown, args.plot)
    result = sweep(args.model, args.fractions, args.methods, args.granularity, args.budget, max_tokens=args.max_tokens,
                   seq_len=args.seq_len, cache_dir=args.cache_dir, progress=not args.quiet,
                   text_file=args.text_file, dataset=args.dataset, calibrations=args.calibration, heal=args.heal,
                   calibration_tokens=args.calibration_tokens, ort_baselines=args.ort_baselines)
    write_outputs(result, args.json, args.markdown, args.plot)
    print(to_markdown(result))
    for path in (args.json, args.markdown, args.plot):
        if path is not None:
            print(f"wrote {path}")
    failed = [row for row in result["rows"] if row.get("transient")]
    for row in failed:
        print(f"lestd-export sweep: run {setting_name(row)} f={row['requested_fraction']} failed: {row['error']} "
              "(not cached; rerun to retry)", file=sys.stderr)
    return 1 if failed else 0
