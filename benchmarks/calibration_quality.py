"""Data-aware LeSTD on the default model: perplexity ratios to the dense model on two texts.

Texts: the default evaluation text (the Python language reference, never used for calibration) and
an out-of-domain English prose text that is in neither calibration nor tuning (by default the GPL-3
and GFDL-1.3 licence texts that Debian ships in /usr/share/common-licenses). Every variant is
scored on exactly the same tokens as the dense model; the JSON records the token digests, the
compression seconds (calibration included) and, per layer and group, the relative calibration
output error before and after the refit.

Usage: python benchmarks/calibration_quality.py [--fractions 0.9,0.7,0.5] [--variants NAME,...]
       [--max-tokens 8192] [--out benchmarks/results/calibration_quality.json]
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from lestd_export.bench import machine_info
from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.evaluate import default_text, tokenize, tokens_digest, torch_perplexity
from lestd_export.io import write_json
from lestd_export.loading import load_model

PROSE_FILES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3")

# name -> settings on top of the size fraction (what the CLI defaults give is "calibrated")
VARIANTS = {
    "data-free": dict(calibration="none"),
    "whitened": dict(calibration="default", refit=False, input_whitening=1.0),
    "right-metric": dict(calibration="default", refit=False),
    "calibrated": dict(calibration="default"),
    "refit-model": dict(calibration="default", refit_target="model"),
    "calibrated-fisher": dict(calibration="default", objective="fisher"),
    "calibrated-global": dict(calibration="default", budget="global"),
    "calibrated-healed": dict(calibration="default", heal=True),
    "tensorllm-calibrated": dict(method="tensorllm", calibration="default"),
    "svd-llm": dict(method="svd", calibration="default"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--fractions", default="0.9,0.7,0.5")
    parser.add_argument("--variants", default="data-free,calibrated,calibrated-fisher")
    parser.add_argument("--runs", default=None, metavar="F:VARIANT,...",
                        help="explicit (fraction, variant) pairs instead of fractions x variants, e.g. 0.5:calibrated-healed")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--calibration-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    loaded = load_model(args.model)
    prose = "\n\n".join(Path(p).read_text() for p in PROSE_FILES)
    texts = {"default": tokenize(loaded.tokenizer, default_text(), args.max_tokens),
             "prose": tokenize(loaded.tokenizer, prose, args.max_tokens)}
    result = {"machine": machine_info("cpu", torch.get_num_threads()),
              "model": loaded.source, "max_tokens": args.max_tokens,
              "texts": {name: {"tokens": len(ids), "sha256": tokens_digest(ids)} for name, ids in texts.items()},
              "prose_files": list(PROSE_FILES), "dense": {}, "runs": []}
    for name, ids in texts.items():
        result["dense"][name] = torch_perplexity(loaded.model, ids, progress=False)["perplexity"]
    print(json.dumps(result["dense"]))

    if args.runs:
        runs = [(float(item.split(":")[0]), item.split(":")[1]) for item in args.runs.split(",")]
    else:
        runs = [(float(f), v) for f in args.fractions.split(",") for v in args.variants.split(",")]
    for fraction, variant in runs:
        settings = dict(VARIANTS[variant], size_fraction=fraction)
        if args.calibration_tokens and settings.get("calibration", "none") != "none":
            settings["calibration_tokens"] = args.calibration_tokens
        model = copy.deepcopy(loaded.model)
        started = time.perf_counter()
        report = compress_model(model, CompressionConfig(**settings), tokenizer=loaded.tokenizer, progress=False)
        seconds = time.perf_counter() - started
        row = {"variant": variant, "size_fraction": fraction, "settings": settings, "compress_seconds": seconds,
               "achieved": report["size_fraction"]["with_indices"],
               "relative_weight_error": report["relative_weight_error"]["overall"],
               "calibration": report.get("calibration"), "healing": report.get("healing")}
        for name, ids in texts.items():
            ppl = torch_perplexity(model, ids, progress=False)["perplexity"]
            row[name] = {"perplexity": ppl, "ratio": ppl / result["dense"][name]}
        result["runs"].append(row)
        print(f"{fraction} {variant:28s} default x{row['default']['ratio']:.3f} prose x{row['prose']['ratio']:.3f} "
              f"({seconds:.0f} s)", flush=True)
        write_json(args.out, result)
        del model


if __name__ == "__main__":
    main()
