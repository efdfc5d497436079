"""``lestd-export quantize MODEL.onnx|DIR -o OUT``: every weight of an fp32 decoder ONNX in int4/int8, our rounding."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .onnx_input import INPUT_HELP


def register(subparsers) -> None:
    from ..quantize_graph import BLOCK_SIZES, ROUNDINGS

    parser = subparsers.add_parser(
        "quantize", help="quantise every weight of an fp32 decoder ONNX (no compression) with calibrated rounding",
        description="Quantise every weight MatMul of an fp32 decoder ONNX (an onnxruntime-genai -p fp32 build or "
                    "an optimum export) to MatMulNBits in the builder's symmetric layout (no zero points: its "
                    "bytes and fast kernel), the token table stored once (shared with a tied lm_head). "
                    "--rounding awq (default) chooses each block's scale to minimise the rounding error weighted "
                    "by each input channel's mean square on calibration text; gptq adds error compensation on "
                    "that grid; rtn is ONNX Runtime's / the builder's round-to-nearest.")
    parser.add_argument("model", help=INPUT_HELP)
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight (default 4)")
    parser.add_argument("--block-size", type=int, default=32, choices=BLOCK_SIZES,
                        help="weights per scale along the reduction axis (default 32, the builder's)")
    parser.add_argument("--rounding", default="awq", choices=ROUNDINGS, help="rounding (default awq)")
    parser.add_argument("--calibration", default="default",
                        help="calibration text for awq/gptq: default (Python docstrings), a text file, or none")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip comparing the result's logits with the input's")
    parser.add_argument("--json", action="store_true", help="print the report instead of a summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..onnx_input.quantize import quantize_onnx
    from ..quantize_graph import QuantizeConfig

    config = QuantizeConfig(bits=args.bits, block_size=args.block_size, rounding=args.rounding)
    report = quantize_onnx(args.model, args.output, config, calibration=args.calibration,
                           calibration_tokens=args.calibration_tokens, overwrite=args.overwrite,
                           progress=not args.quiet, validate=not args.no_validate)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    output = report["output"]
    print(f"{args.output}: {report['weight_matmuls']} weight MatMuls in int{report['bits']} (block "
          f"{report['block_size']}, {report['rounding']}{', calibrated' if report['calibrated'] else ''}), token "
          f"table {', '.join(report['token_table']) or 'none'}; {output['model_bytes'] / 1e6:.1f} MB "
          f"({output['bytes_fraction']:.2f} of the input)")
    if "vs_input" in report:
        print(f"  top-1 agreement with the fp32 input: {report['vs_input']['top1_agreement']:.0%}")
    return 0
