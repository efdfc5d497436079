"""Which planner objective makes LeSTD beat TensorLLM in perplexity (issue 5)? Torch perplexity of the
default model compressed with several LeSTD variants and the TensorLLM baseline, per size fraction.

Each run compresses a deep copy of the default model (SmolLM2-135M) and scores it on the first
``--max-tokens`` tokens of the default text (windows of 512). Variants that are not (yet) settings of
:class:`CompressionConfig` override fields of the planner's :class:`TuckerRequest` (the script wraps
``planner.compress_layers``). Results are appended to ``benchmarks/results/objective_study.json``
(keyed by variant, fraction and max_tokens; rerunning skips finished rows unless ``--force``).

Usage: python benchmarks/objective_study.py --variants tensorllm,balanced --fractions 0.9,0.7,0.5
       python benchmarks/objective_study.py --list
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.evaluate import load_text, tokenize, torch_perplexity
from lestd_export.io import write_json
from lestd_export.loading import load_model
from lestd_export.numerics import planner

OUT = Path(__file__).parent / "results" / "objective_study.json"

# name -> (CompressionConfig settings, TuckerRequest overrides)
VARIANTS = {
    "tensorllm": ({"method": "tensorllm"}, {}),
    "svd": ({"method": "svd"}, {}),
    "tensorllm-balanced": ({"method": "tensorllm"}, {"objective": "balanced"}),
    "frobenius": ({"method": "lestd", "objective": "frobenius"}, {}),
    "frobenius-global": ({"method": "lestd", "objective": "frobenius", "budget": "global"}, {}),
    "balanced": ({"method": "lestd", "objective": "balanced"}, {}),
    "balanced-global": ({"method": "lestd", "objective": "balanced", "budget": "global"}, {}),
    "balanced-p0.5": ({"method": "lestd", "objective": "balanced"}, {"balance_power": 0.5}),
    "balanced-p0.75": ({"method": "lestd", "objective": "balanced"}, {"balance_power": 0.75}),
    "balanced-p1.5": ({"method": "lestd", "objective": "balanced"}, {"balance_power": 1.5}),
    "balanced-p2": ({"method": "lestd", "objective": "balanced"}, {"balance_power": 2.0}),
    "balanced-p1.5-global": ({"method": "lestd", "objective": "balanced", "budget": "global"},
                             {"balance_power": 1.5}),
    "balanced-pair": ({"method": "lestd", "objective": "balanced"}, {"balance_mode": "pair"}),
    "balanced-vo2": ({"method": "lestd", "objective": "balanced"}, {"balance_boost": (("v", 2.0), ("o", 2.0))}),
    "balanced-qk2": ({"method": "lestd", "objective": "balanced"}, {"balance_boost": (("q", 2.0), ("k", 2.0))}),
    "balanced-element": ({"method": "lestd", "objective": "balanced", "granularity": "element"}, {}),
}


def summarise(layers) -> dict:
    """Ranks and rows kept per group, and the weighted (objective) relative error."""
    ranks = [list(layer.ranks) for layer in layers]
    def kept(layer, name):
        rows = layer.groups[name].rows
        return layer.ranks[0] if rows is None else int(rows.shape[-1])  # rows: [k] shared by the group

    rows = {name: [kept(layer, name) for layer in layers] for name in layers[0].groups}
    weighted = sum(layer.weighted_squared_error for layer in layers)
    energy = sum(layer.weighted_energy if layer.weighted_energy is not None else layer.energy for layer in layers)
    return {"ranks": ranks, "rows": rows, "weighted_relative_error": float(np.sqrt(weighted / energy))}


def run(loaded, ids, name: str, fraction: float) -> dict:
    settings, overrides = VARIANTS[name]
    config = CompressionConfig(size_fraction=fraction, **settings)
    original = planner.compress_layers
    captured = {}

    def wrapped(tensors, groups, request, progress=None):
        # compress.py may not pass the objective through yet: always set it from the config here
        request = planner.TuckerRequest(**{**request.__dict__, "objective": config.objective, **overrides})
        captured["request"] = {k: v for k, v in request.__dict__.items() if k not in ("tol", "max_iter")}
        captured["layers"] = original(tensors, groups, request, progress)
        return captured["layers"]

    started = time.perf_counter()
    model = copy.deepcopy(loaded.model)
    planner.compress_layers = wrapped
    try:
        report = compress_model(model, config, progress=False)
    finally:
        planner.compress_layers = original
    compress_seconds = time.perf_counter() - started
    result = torch_perplexity(model, ids, progress=False)
    summary = summarise(captured["layers"]) if "layers" in captured else {  # svd: no Tucker layers
        "weighted_relative_error": report["relative_weight_error"]["overall"]}
    return {"variant": name, "requested_fraction": fraction, "request": captured.get("request"),
            "perplexity": result["perplexity"], "tokens": result["tokens"],
            "size_fraction": report["size_fraction"]["with_indices"],
            "relative_weight_error": report["relative_weight_error"]["overall"],
            **summary,
            "compress_seconds": compress_seconds, "seconds": time.perf_counter() - started}


def to_markdown(data: dict) -> str:
    """Perplexity table: one line per variant, one column per requested fraction."""
    fractions = sorted({r["requested_fraction"] for r in data["rows"]}, reverse=True)
    variants = list(dict.fromkeys(v for v in VARIANTS if any(r["variant"] == v for r in data["rows"])))
    lines = [f"Torch perplexity, `{data['model']}`, first {data['max_tokens']} tokens of the default text, "
             f"windows of 512; dense {data['dense_perplexity']:.2f}. Generated by benchmarks/objective_study.py.",
             "", "| variant | " + " | ".join(f"{f:g}" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for variant in variants:
        cells = []
        for f in fractions:
            row = next((r for r in data["rows"] if r["variant"] == variant and r["requested_fraction"] == f), None)
            cells.append("-" if row is None else f"{row['perplexity']:.1f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tensorllm,balanced")
    parser.add_argument("--fractions", default="0.9,0.7,0.5")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name}: {spec}")
        return
    torch.set_num_threads(args.threads)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows = {(r["variant"], r["requested_fraction"], r["max_tokens"]): r for r in data["rows"]}

    loaded = load_model(None)
    text, source = load_text()
    ids = tokenize(loaded.tokenizer, text, args.max_tokens)
    if "dense_perplexity" not in data or data.get("max_tokens") != args.max_tokens:
        data.update(model=loaded.source, text_source=source, max_tokens=args.max_tokens,
                    dense_perplexity=torch_perplexity(loaded.model, ids, progress=False)["perplexity"])
        write_json(args.out, data)
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for name in args.variants.split(","):
            key = (name, fraction, args.max_tokens)
            if key in rows and not args.force:
                row = rows[key]
            else:
                row = {**run(loaded, ids, name, fraction), "max_tokens": args.max_tokens}
                rows[key] = row
                data["rows"] = sorted(rows.values(), key=lambda r: (-r["requested_fraction"], r["variant"]))
                write_json(args.out, data)
                args.out.with_suffix(".md").write_text(to_markdown(data))
            print(f"f={fraction:.2f} {name:>22}: ppl {row['perplexity']:9.2f}  size {row['size_fraction']:.4f}  "
                  f"err {row['relative_weight_error']:.4f}  w-err {row['weighted_relative_error']:.4f}  "
                  f"({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
