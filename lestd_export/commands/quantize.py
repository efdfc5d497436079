"""``lestd-export quantize MODEL.onnx|DIR -o OUT``: every weight of an fp32 decoder ONNX in int4/int8, our rounding."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InvalidConfigError
from .common import INPUT_HELP, add_rounding_flags, quantize_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantise every weight of an fp32 decoder ONNX (no compression) with calibrated rounding",
        description="Quantise every weight MatMul of an fp32 decoder ONNX (an onnxruntime-genai -p fp32 build or "
                    "an optimum export) to MatMulNBits in the builder's symmetric layout (no zero points: its "
                    "bytes and fast kernel), the token table stored once (shared with a tied lm_head). "
                    "--rounding awq (default): activation-aware input scaling folded into the normalisations, "
                    "then each block's scale searched and refined to minimise the rounding error weighted by each "
                    "input channel's mean square on calibration text; gptq adds error compensation on that grid; "
                    "rtn is ONNX Runtime's / the builder's round-to-nearest. --head-bits 8 keeps the token table "
                    "and lm_head in int8. The file must compute with the values it stores (checked in fp32 "
                    "arithmetic; --no-validate skips it).")
    parser.add_argument("model", help=INPUT_HELP)
    parser.add_argument("-o", "--output", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 4, 8),
                        help="bits per weight (default 4; 2: the token table and lm_head stay int4 unless "
                             "--head-bits says otherwise)")
    parser.add_argument("--target-mb", type=float, default=None, metavar="MB",
                        help="whole-file target in MB (1e6 bytes; the written model files): every weight MatMul gets its "
                             "own bits (2/4/8) and block (32/64/128), or SVD-LLM low-rank factors in int4, chosen for "
                             "the least predicted loss (each option's calibration output error times the KL per unit "
                             "output error measured for that weight through ONNX Runtime); --bits and --block-size "
                             "then only set the token table's storage when it is not tied to the lm_head")
    parser.add_argument("--no-low-rank", action="store_true",
                        help="with --target-mb: quantisation only (no low-rank factors among the choices)")
    parser.add_argument("--plan-cache", default=None, metavar="FILE.json",
                        help="with --target-mb: keep the weighed options and measured prices here and reuse them for "
                             "later targets on the same model and calibration (they do not depend on the target)")
    parser.add_argument("--calibration", default="default",
                        help="calibration text for awq/gptq: default (Python docstrings), a text file, or none")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the stored-value check and the comparison with the input's logits")
    parser.add_argument("--json", action="store_true", help="print the report instead of a summary")
    add_rounding_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..onnx_input.budget import BudgetRequest
    from ..onnx_input.quantize import quantize_onnx

    config = quantize_config(args, args.bits)
    if (args.no_low_rank or args.plan_cache) and args.target_mb is None:
        raise InvalidConfigError("--no-low-rank and --plan-cache only apply with --target-mb")
    budget = None if args.target_mb is None else BudgetRequest(round(args.target_mb * 1e6), not args.no_low_rank,
                                                                args.plan_cache)
    report = quantize_onnx(args.model, args.output, config, calibration=args.calibration,
                           calibration_tokens=args.calibration_tokens, overwrite=args.overwrite,
                           progress=not args.quiet, validate=not args.no_validate, budget=budget)
    print(json.dumps(report, indent=2) if args.json else summary(report, args.output))
    return 0


def summary(report: dict, out: Path) -> str:
    """What was quantised, how large it is, and the checks."""
    output = report["output"]
    lines = [f"{out}: {report['weight_matmuls']} weight MatMuls in int{report['bits']} (block "
             f"{report['block_size']}, {report['rounding']}{', calibrated' if report['calibrated'] else ''}), token "
             f"table {', '.join(report['token_table']) or 'none'}; {output['model_bytes'] / 1e6:.1f} MB "
             f"({output['bytes_fraction']:.2f} of the input)"]
    if "budget" in report:
        plan = report["budget"]
        kinds = "; ".join(f"{kind} {entry['bytes'] / 1e6:.1f} MB ("
                          + ", ".join(f"{n} x {storage}" for storage, n in entry["storage"].items()) + ")"
                          for kind, entry in plan["by_kind"].items())
        lines.append(f"  whole-file plan: {plan['stored_bytes'] / 1e6:.2f} MB stored of {plan['target_bytes'] / 1e6:.2f}"
                     f" MB targeted, {plan['factored']} weights as low-rank factors; {kinds}")
    if "stored_values" in report:
        lines.append(f"  computes with the values it stores: relative logit error "
                     f"{report['stored_values']['max_relative_logit_difference']:.1e}")
    else:
        lines.append("  stored values: not checked (--no-validate)")
    if "vs_input" in report:
        lines.append(f"  top-1 agreement with the fp32 input: {report['vs_input']['top1_agreement']:.0%}")
    return "\n".join(lines)
