"""``lestd-export MODEL.onnx -o DIR`` (``compress-onnx``): compress the attention of an existing decoder ONNX."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (INPUT_HELP, QUANTIZE, add_compression_flags, add_rounding_flags, config_from_args,
                     quantize_config)

VERB = "compress-onnx"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        VERB, help="compress the attention of an existing decoder ONNX (shorthand: lestd-export MODEL.onnx -o DIR)",
        description="Compress the attention of an existing decoder ONNX model in place of its projections "
                    "(an onnxruntime-genai build or an optimum export): calibration statistics through ONNX "
                    "Runtime, LeSTD planned to --size-fraction, the kept values refit against the dense "
                    "activations, the compressed layers grafted into the graph, optionally quantised. DIR gets "
                    "the new model, the input directory's other files and compression_report.json. "
                    "`lestd-export MODEL.onnx ...` and `lestd-export ONNX_DIR ...` run this verb.")
    parser.add_argument("model", help=INPUT_HELP)
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the compression report (also written to "
                        "DIR/compression_report.json) instead of a summary")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip loading the result in ONNX Runtime and comparing its logits with the input's "
                        "(and a quantised result against the values it stores)")
    add_compression_flags(parser)  # --quantize int4|int8 among them: every weight MatMul of the result
    add_rounding_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidConfigError
    from ..onnx_input import compress_onnx

    config = config_from_args(args)
    if args.size_fraction == 1.0 and args.ranks is None and args.core_density is None:  # no compression
        from ..onnx_input.quantize import quantize_onnx
        from .quantize import summary as quantize_summary

        if args.quantize == "none":
            raise InvalidConfigError("--size-fraction 1.0 without --quantize leaves the model as it is: give "
                                     "--quantize int4|int8 (or a smaller --size-fraction)")
        report = quantize_onnx(args.model, args.output, quantize_config(args, int(QUANTIZE[args.quantize][3:])),
                               calibration=config.calibration, calibration_tokens=config.calibration_tokens,
                               overwrite=args.overwrite, progress=not args.quiet, validate=not args.no_validate)
        print(json.dumps(report, indent=2) if args.json else quantize_summary(report, args.output))
        return 0
    report = compress_onnx(args.model, args.output, config, rounding=args.rounding, block_size=args.block_size,
                           head_bits=args.head_bits,
                           overwrite=args.overwrite, progress=not args.quiet, validate=not args.no_validate)
    print(json.dumps(report, indent=2) if args.json else summary(report, args.output))
    return 0


def summary(report: dict, out: Path) -> str:
    """What was compressed, how far, where it went and what to run next."""
    from ..onnx_input import REPORT_FILE

    fraction = report["size_fraction"]
    requested = "" if fraction["requested"] is None else f" (requested {fraction['requested']:g})"
    source, output = report["input"], report["output"]
    quantised = output["quantize"]
    lines = [
        f"compressed the attention of {source['path']} ({source['producer']}, {source['layers']} layers) with "
        f"{report['method']}: {fraction['with_indices']:.3f} of its dense size{requested}, relative weight error "
        f"{report['relative_weight_error']['overall']:.3f}, {report['seconds']:.1f} s",
        f"  model: {out / source['model_file']} ({output['model_bytes'] / 2**20:.1f} MB, "
        f"{output['bytes_fraction']:.3f} of the input's {source['bytes'] / 2**20:.1f} MB"
        + (f", int{quantised['bits']} MatMulNBits" if quantised else "") + ")",
    ]
    if "vs_input" in report:
        check = report["vs_input"]
        lines.append(f"  logits against the input: max relative difference "
                     f"{check['max_relative_logit_difference']:.2e}, top-1 agreement {check['top1_agreement']:.2f}")
    if quantised and "stored_values" in quantised:
        lines.append(f"  computes with the values it stores ({quantised['rounding']} rounding): relative logit error "
                     f"{quantised['stored_values']['max_relative_logit_difference']:.1e}")
    backend = "" if source["config"] == "genai_config.json" else " --backend onnxruntime"
    lines += [f"  report: {out / REPORT_FILE}", "next:", f"  lestd-export eval {out}{backend}",
              f"  lestd-export bench {out}"]
    return "\n".join(lines)
