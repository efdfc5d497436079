"""``lestd-export bench DIR [DIR ...]``: prefill/decode speed, latency, memory and a short perplexity of exports
and onnxruntime-genai directories, one process per run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark exported models (speed, latency, memory, bytes)",
        description="Run every export directory (and its ONNX Runtime int8 / int4 quantisations) and every "
                    "onnxruntime-genai directory (through genai's generation loop) in fresh processes, A/B "
                    "interleaved, with the same provider, threads and ORT_ENABLE_ALL; report prefill and decode "
                    "tokens/s, p50/p90 latency, TTFT, RSS, bytes on disk, a short perplexity on the same tokens "
                    "for every variant, and ratios vs the baseline.")
    parser.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                        help="directories written by `lestd-export export`, or onnxruntime-genai directories "
                             "(genai_config.json)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DENSE_DIR",
                        help="the reference for ratios (default: the first DIR)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's choice)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up generates per run")
    parser.add_argument("--quantize", default="none", metavar="LIST",
                        help="comma list of none,int8,int4 (quantised copies cached beside each model.onnx; "
                             "not applied to onnxruntime-genai directories)")
    parser.add_argument("--genai-baselines", default=None, metavar="MODEL",
                        help="also run the onnxruntime-genai builder's fp32 and int4 models of MODEL (alias, "
                             "Hugging Face dir or .gguf), built once and cached under the lestd-export cache "
                             "(needs onnxruntime-genai)")
    parser.add_argument("--quality-tokens", type=int, default=1024, metavar="N",
                        help="perplexity column on the first N tokens of the default text, the same tokens for "
                             "every variant (default 1024; 0: no quality column)")
    parser.add_argument("--json", type=Path, default=None, metavar="F")
    parser.add_argument("--markdown", type=Path, default=None, metavar="F")
    parser.add_argument("--plot", type=Path, default=None, metavar="F", help="PNG with throughput bars and speed vs bytes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import QUANT_MODES, plot, run_benchmark, to_markdown
    from ..config import parse_choices
    from ..io import write_json

    quantize = parse_choices(args.quantize, QUANT_MODES, "--quantize mode(s)")
    result = run_benchmark(args.dirs, baseline=args.baseline, provider=args.provider, threads=args.threads,
                           batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                           repeats=args.repeats, warmup=args.warmup, quantize=quantize, progress=not args.quiet,
                           genai_baselines=args.genai_baselines, quality_tokens=args.quality_tokens)
    table = to_markdown(result)
    if args.json:
        write_json(args.json, result)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(result, args.plot)
    print(table)
    if not args.json:
        print(json.dumps(result["ratios"], indent=2))
    return 0
