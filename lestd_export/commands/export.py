"""``lestd-export export [MODEL_OR_CHECKPOINT] -o DIR``: ONNX with KV cache, validated against PyTorch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (MODEL_HELP, QUANTIZE, add_compression_flags, add_rounding_flags, compression_flags_given,
                     config_from_args)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export to ONNX (compressing first unless given a checkpoint or --dense)",
        description="Export to DIR/model.onnx in Optimum's text-generation-with-past format (input_ids, "
                    "attention_mask, position_ids, past_key_values.* -> logits, present.*) with config.json, "
                    "generation_config.json and tokenizer files, then validate ONNX Runtime against PyTorch.")
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP + ", or a compressed checkpoint")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--dense", action="store_true", help="export the uncompressed model (the baseline)")
    parser.add_argument("--format", choices=("optimum", "genai"), default="optimum",
                        help="optimum (default): Optimum's layout, for ORTModelForCausalLM and the package's runtime; "
                             "genai: an onnxruntime-genai model directory (the genai builder's graph with the "
                             "compressed attention grafted in; needs onnxruntime-genai)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (16..20, default 18)")
    parser.add_argument("--no-validate", action="store_true", help="skip the checks: ONNX Runtime vs PyTorch, and a quantised "
                        "file against the values it stores")
    parser.add_argument("--optimize", action="store_true",
                        help="apply onnxscript's ONNX Runtime fusions (use it for dense and compressed alike)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest relative logit error accepted (default 1e-3: PyTorch's own fp32 rounding "
                             "moves the default model at 0.7 by 3.7e-4 against float64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--json", action="store_true",
                        help="print the export report (also written to DIR/export_report.json) instead of a summary")
    add_compression_flags(parser)
    add_rounding_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import check_opset, export_model, load_for_export
    from ..io import check_output_dir

    check_opset(args.opset)
    check_output_dir(args.output, args.overwrite)
    default = config_from_args(args)  # planned for the format's layout and the --quantize precision
    config = default if compression_flags_given(args) else None
    loaded, _ = load_for_export(args.model, config, args.dense, default=default)
    # a quantised file's rounding, and its calibration (a data-free baseline's weights are still calibrated)
    rounding = dict(block_size=args.block_size, rounding=args.rounding, head_bits=args.head_bits,
                    calibration=args.calibration or "default", calibration_tokens=args.calibration_tokens)
    if args.format == "genai":
        from ..export_genai import export_genai

        report = export_genai(loaded, args.output, storage=QUANTIZE[args.quantize], overwrite=args.overwrite,
                              validate=not args.no_validate, tolerance=args.tolerance, **rounding)
    elif args.quantize != "none":
        from ..export_genai import export_optimum_quantized

        report = export_optimum_quantized(loaded, args.output, storage=QUANTIZE[args.quantize], opset=args.opset,
                                          overwrite=args.overwrite, validate=not args.no_validate, **rounding)
    else:
        report = export_model(loaded, args.output, opset=args.opset, validate=not args.no_validate,
                              optimize=args.optimize, overwrite=args.overwrite, tolerance=args.tolerance)
    print(json.dumps(report, indent=2) if args.json else summary(report, args.output))
    return 0


def summary(report: dict, out: Path) -> str:
    """What a user wants after an export: what was written, how large, whether it matches PyTorch, what next."""
    from ..export import ONNX_FILE, REPORT_FILE

    what = (f"{report['method']}, attention at {report['size_fraction']['with_indices']:.3f} of its dense size"
            if report["compressed"] else "the dense model")
    lines = [f"exported {what} to {out}", f"  {ONNX_FILE}: {report['model_bytes'] / 2**20:.1f} MB"]
    if report.get("quantization"):
        q = report["quantization"]
        lines.append(f"  weights: {report['storage']} (MatMulNBits block {q['block_size']}, {q['rounding']} rounding"
                     f"{', calibrated' if q['calibrated'] else ''}; token table {', '.join(q['token_table'])})")
    elif report.get("storage", "fp32") != "fp32":
        lines.append(f"  weights: {report['storage']} (MatMulNBits, the compressed attention included)")
    if report.get("attention_bytes"):
        a = report["attention_bytes"]
        lines.append(f"  attention weights: {a['compressed'] / 2**20:.1f} MB ({a['fraction']:.3f} of the builder's "
                     f"{a['dense'] / 2**20:.1f} MB)")
    if report.get("parity_fp32"):
        lines.append(f"  fp32 graph before quantising: parity with PyTorch {report['parity_fp32']['max_relative_error']:.1e}")
    stored = (report.get("quantization") or {}).get("stored_values")
    if stored:
        lines.append(f"  computes with the values it stores: relative logit error "
                     f"{stored['max_relative_logit_difference']:.1e} (tolerance {stored['tolerance']:.0e})")
    parity = report.get("parity")
    if parity is None:
        lines.append("  parity with PyTorch and stored values: not checked (--no-validate)")
    elif "greedy_tokens_equal" in parity:
        lines.append(f"  parity with PyTorch: max relative logit error {parity['max_relative_error']:.1e}, greedy "
                     f"tokens {'equal' if parity['greedy_tokens_equal'] else 'differ'} (batch {parity['batch']}, "
                     f"prefill + {parity['decode_steps']} decode steps{_against(parity)})")
    else:
        what = ("parity with PyTorch" if "checked_against" not in parity
                else f"distance from PyTorch fp32 ({report['storage']} rounding, random tokens, not a check)")
        lines.append(f"  {what}: max relative logit error {parity['max_relative_error']:.1e}, top-1 "
                     f"agreement {parity['top1_agreement']:.0%} ({parity['tokens']} tokens)")
    if report.get("runtime"):
        lines.append(f"  {report['runtime']['runtime']} loads it and generates")
    if report.get("fusions") is not None:
        lines.append(f"  fusions: {', '.join(f'{k} x{v}' for k, v in report['fusions'].items()) or 'none fired'}")
    genai = report.get("format") == "onnxruntime-genai"
    lines += [f"  report: {out / REPORT_FILE}", "next:",
              f"  lestd-export eval {out}" + ("" if genai else " --backend onnxruntime"),
              f"  lestd-export bench {out}" + (" --genai-baselines MODEL  (MODEL: the model you compressed, "
                                               "for the builder's dense fp32 and int4 beside it)" if genai else "")]
    return "\n".join(lines)


def _against(parity: dict) -> str:
    """Where the exported file is quantised, what its logits were compared with."""
    return f"; against {parity['checked_against']}" if "checked_against" in parity else ""
