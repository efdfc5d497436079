"""Flags shared by the verbs that compress or quantise (compress, export, sweep, compress-onnx, quantize)."""

from __future__ import annotations

import argparse

from ..config import (BUDGETS, DEFAULT_CALIBRATION_TOKENS, DEFAULT_HEAL_BATCH, DEFAULT_HEAL_LR, DEFAULT_HEAL_STEPS,
                      DEFAULT_HEAL_TOKENS, GRANULARITIES, HEAL_DEVICES, METHODS, MLP_METHODS, MODULES, OBJECTIVES,
                      REFIT_TARGETS, CompressionConfig, parse_choices, parse_ranks)

INPUT_HELP = ("decoder .onnx file, or a directory holding one (the file genai_config.json names, else model.onnx): "
              "an onnxruntime-genai build (-p fp32) or an optimum export; its directory needs genai_config.json or "
              "config.json, and tokenizer files to calibrate on text")  # an ONNX input (compress-onnx, quantize)
MODEL_HELP = ("model: catalogue alias (default: smollm2-135m), local Hugging Face directory, .gguf file, "
              "or hub id org/name (needs network)")


def add_compression_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression")
    group.add_argument("--method", choices=METHODS, default="lestd",
                       help="lestd (default): Tucker basis + pruned core; tensorllm: Tucker basis, dense core; "
                            "svd: per-matrix truncated SVD")
    group.add_argument("--modules", default="attention", metavar="LIST",
                       help="what to compress, comma-separated: attention (default; --method), mlp (every MLP "
                            "weight as SVD-LLM low-rank factors, gate and up sharing one input basis) and/or embedding "
                            "(the token table and lm_head as low-rank factors, a tied pair stored once). On "
                            "SmolLM2-135M a factored MLP or table loses to quantising harder at every size measured "
                            "(README, Below int4)")
    group.add_argument("--mlp-fraction", type=float, default=None, metavar="F",
                       help="with --modules mlp: stored MLP parameters as a fraction of the dense ones, in (0, 1] "
                            "(default 0.9), shared out over its matrices by relative output energy (--budget global: "
                            "over all layers)")
    group.add_argument("--mlp-method", choices=MLP_METHODS, default="svd",
                       help="with --modules mlp: svd (default; SVD-LLM factors, gate and up sharing one input basis), "
                            "tt (each weight a two-core TT-matrix, TT-LLM's FFN format) or saten (TT plus an "
                            "unstructured sparse residual holding a quarter of the entries, indices counted). A TT "
                            "near the dense size has a large rank: at 0.9 of SmolLM2's MLP it computes 26-30x the "
                            "dense weight's multiply-adds per token (README); for research, not for speed")
    group.add_argument("--embedding-fraction", type=float, default=None, metavar="F",
                       help="with --modules embedding: stored entries of the token table (and of an untied lm_head) "
                            "as a fraction of the dense ones, in (0, 1] (default 0.9; the rank is a multiple of 32)")
    group.add_argument("--size-fraction", type=float, default=None, metavar="F",
                       help="stored attention parameters (factors + core values + int32 indices) as a fraction "
                            "of the dense ones, in (0, 1]; default 0.7 when the planner has something to choose")
    group.add_argument("--ranks", type=parse_ranks, default=None, metavar="R1,R2",
                       help="explicit Tucker ranks, integers or 'full' (svd: one rank for every matrix)")
    group.add_argument("--core-density", type=float, default=None, metavar="D",
                       help="fraction of core entries to keep (overrides the planner; without --ranks: full ranks)")
    group.add_argument("--granularity", choices=GRANULARITIES, default="row",
                       help="prune whole core rows (row, default: the unit that runs fast) or single entries "
                            "(element, the paper)")
    group.add_argument("--budget", choices=BUDGETS, default="layer",
                       help="share the budget per layer (default) or globally by normalised importance")
    group.add_argument("--objective", choices=OBJECTIVES, default=None,
                       help="norm the planner minimises: balanced (lestd default: each q/k/v/o head group by its "
                            "relative error, invariant to Q/K and V/O rescaling), fisher (needs calibration: each "
                            "group by its measured loss sensitivity, layers compared in loss units) or frobenius "
                            "(the papers' plain norm; the only one for tensorllm)")
    group.add_argument("--calibration", default=None, metavar="SOURCE",
                       help="activation data for data-aware compression: default (offline: Python standard-library "
                            "docstrings, disjoint from eval's default text), a UTF-8 text file, wikitext2 (needs "
                            "'datasets' and network), self (samples of the model), or none (the papers' data-free "
                            "method). Default: 'default' for lestd, 'none' for the baselines")
    group.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS, metavar="N",
                       help=f"calibration tokens (default {DEFAULT_CALIBRATION_TOKENS}, in sequences of up to 512)")
    group.add_argument("--no-refit", action="store_true",
                       help="with calibration: skip the layer-by-layer least-squares refit of the kept values")
    group.add_argument("--refit-target", choices=REFIT_TARGETS, default="layer",
                       help="what the refit fits: layer (default: the dense layer on the compressed model's "
                            "inputs) or model (the dense model's outputs)")
    group.add_argument("--input-whitening", type=float, default=None, metavar="P",
                       help="power of the input Gram in the shared basis's metric, 0..1 (default: 1 with "
                            "--dense-output, 0.5 with --quantize or --format genai, else 0 (an ONNX input: 0); 1 whitens the "
                            "Q/K/V inputs exactly but, with a factored output projection, shifts the output "
                            "heads' budget to outlier dimensions)")
    group.add_argument("--heal", action="store_true",
                       help="with calibration: distil the compressed model against the dense one (logit KL), "
                            "updating only stored values; about 15 minutes for the default model on 2 cores with the "
                            "defaults")
    group.add_argument("--heal-tokens", type=int, default=DEFAULT_HEAL_TOKENS, metavar="N",
                       help=f"distinct healing tokens read from the calibration source (default {DEFAULT_HEAL_TOKENS}: "
                            "the whole default text; fewer cycle)")
    group.add_argument("--heal-steps", type=int, default=DEFAULT_HEAL_STEPS, metavar="N",
                       help=f"healing steps (default {DEFAULT_HEAL_STEPS})")
    group.add_argument("--heal-batch", type=int, default=DEFAULT_HEAL_BATCH, metavar="N",
                       help=f"256-token sequences per healing step, their gradients averaged (default "
                            f"{DEFAULT_HEAL_BATCH})")
    group.add_argument("--heal-lr", type=float, default=DEFAULT_HEAL_LR, metavar="LR",
                       help=f"healing's peak Adam learning rate, cosine-decayed (default {DEFAULT_HEAL_LR:g})")
    group.add_argument("--heal-device", choices=HEAL_DEVICES, default="auto",
                       help="where healing runs: auto (default: a CUDA GPU when torch sees one, else the CPU), cpu, "
                            "cuda")
    group.add_argument("--quantize", choices=tuple(QUANTIZE), default="none",
                       help="store the attention weights (and, on export, every MatMul weight) as int8 or int4 "
                            "(ONNX Runtime MatMulNBits, block 32, accuracy level 4, as the onnxruntime-genai builder "
                            "writes); the size fraction then holds for the quantised file. Default none (fp32)")
    group.add_argument("--dense-output", action="store_true",
                       help="keep the output projection dense and exact, compress Q/K/V only (the size fraction "
                            "still counts all four); fewer MatMuls per layer in the quantised and genai layouts")
    group.add_argument("--damping", type=float, default=0.01,
                       help="ridge added to calibration Gram matrices, relative to their mean diagonal (default 0.01)")
    group.add_argument("--hooi-tol", type=float, default=1e-6, help="HOOI stop: relative change of ||G||^2")
    group.add_argument("--hooi-max-iter", type=int, default=10, help="HOOI stop: maximum sweeps")


QUANTIZE = {"none": "fp32", "int8": "int8", "int4": "int4"}  # --quantize -> CompressionConfig.storage


def add_rounding_flags(parser: argparse.ArgumentParser) -> None:
    """How a quantised file rounds its weights (``--rounding``, ``--block-size``): every verb that writes one."""
    from ..quantize_graph import BLOCK_SIZES, ROUNDINGS

    group = parser.add_argument_group("quantisation")
    group.add_argument("--rounding", default="awq", choices=ROUNDINGS,
                       help="awq (default): activation-aware scaling and block scales from calibration (the "
                            "--calibration text); gptq: error compensation on that grid; rtn: ONNX Runtime's and "
                            "the genai builder's round-to-nearest")
    group.add_argument("--block-size", type=int, default=32, choices=BLOCK_SIZES,
                       help="weights per scale along the reduction axis (default 32, the genai builder's)")
    group.add_argument("--head-bits", type=int, default=None, choices=(4, 8),
                       help="bits of the token table and the lm_head (stored once when tied; default: the other "
                            "weights' bits): 8 costs 16%% more bytes on SmolLM2-135M and removes most of int4's loss")


def quantize_config(args: argparse.Namespace, bits: int):
    """The :class:`~lestd_export.quantize_graph.QuantizeConfig` of the rounding flags at ``bits``."""
    from ..quantize_graph import QuantizeConfig

    return QuantizeConfig(bits=bits, block_size=args.block_size, rounding=args.rounding, head_bits=args.head_bits)


def default_calibration(method: str) -> str:
    """The CLI's calibration source when none is given: calibrated LeSTD and SVD (SVD-LLM; data-free truncated SVD
    of the default model's attention at 0.5 is perplexity 24,671 against 23.5 calibrated, a model nobody should be
    handed by default), data-free TensorLLM (the paper's Stage-I-only baseline)."""
    return "none" if method == "tensorllm" else "default"


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    """A validated config from the compression flags (raises InvalidConfigError)."""
    return CompressionConfig(method=args.method, size_fraction=args.size_fraction, ranks=args.ranks,
                             core_density=args.core_density, granularity=args.granularity, budget=args.budget,
                             objective=args.objective, hooi_tol=args.hooi_tol, hooi_max_iter=args.hooi_max_iter,
                             calibration=args.calibration or default_calibration(args.method),
                             calibration_tokens=args.calibration_tokens, refit=not args.no_refit,
                             refit_target=args.refit_target, input_whitening=args.input_whitening, heal=args.heal,
                             heal_tokens=args.heal_tokens, heal_steps=args.heal_steps, heal_batch=args.heal_batch,
                             heal_lr=args.heal_lr, heal_device=args.heal_device, damping=args.damping,
                             storage=QUANTIZE[args.quantize], dense_output=args.dense_output,
                             modules=tuple(parse_choices(args.modules, MODULES, "modules")),
                             mlp_fraction=args.mlp_fraction, mlp_method=args.mlp_method,
                             embedding_fraction=args.embedding_fraction,
                             layout="plain" if getattr(args, "format", "optimum") == "genai" else "shared")


def compression_flags_given(args: argparse.Namespace) -> bool:
    """Whether any compression flag differs from its default (exporting a checkpoint takes none;
    ``--quantize`` is also an export setting and does not count)."""
    defaults = {"method": "lestd", "size_fraction": None, "ranks": None, "core_density": None,
                "granularity": "row", "budget": "layer", "objective": None, "hooi_tol": 1e-6, "hooi_max_iter": 10,
                "calibration": None, "calibration_tokens": DEFAULT_CALIBRATION_TOKENS, "no_refit": False, "heal": False,
                "heal_tokens": DEFAULT_HEAL_TOKENS, "heal_steps": DEFAULT_HEAL_STEPS, "heal_batch": DEFAULT_HEAL_BATCH,
                "heal_lr": DEFAULT_HEAL_LR, "heal_device": "auto", "damping": 0.01, "refit_target": "layer",
                "input_whitening": None, "dense_output": False, "modules": "attention", "mlp_fraction": None,
                "mlp_method": "svd", "embedding_fraction": None}
    return any(getattr(args, key) != value for key, value in defaults.items())
