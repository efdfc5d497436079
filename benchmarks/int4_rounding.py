"""Which int4 rounding of every weight is best at the builder's bytes, judged out of domain (issue 18).

PyTorch simulation of the onnxruntime-genai builder's int4 format (symmetric MatMulNBits, blocks along K, the
tied embedding/lm_head stored once and rounded once): every decoder Linear and the embedding/lm_head table are
replaced by the values the file would store, and perplexity is measured on three held-out texts of different
kinds, none used for calibration (calibration: the default Python docstrings):
  technical  Python's language reference (eval's default text)
  legal      the GNU GPL version 3 (/usr/share/common-licenses/GPL-3)
  narrative  Debian's project history (Debian package debian-history)
Variants at one block size have the same bytes (symmetric: K/2 bytes + one fp32 scale per block and column):
  rtn   ONNX Runtime's / the builder's round-to-nearest with the max-abs scale
  mse       each block's scale searched to minimise its squared rounding error (data-free)
  awq       the same, each row weighted by its mean squared input (activation-aware, calibrated)
  awq-sqrt  rows weighted by the root of it; awq-wide: awq over clipping ratios down to 0.5
  gptq      error-compensated rounding (GPTQ) on the awq grid, damped input Grams (calibrated)
  awq-scaled  the quantiser's own awq (lestd_export.quantize_graph): Q/K/V and gate/up rows scaled by
              diag(C)^(a/2) first (AWQ; the norm absorbs 1/s), then rounded as `lestd-export quantize` does
              (searched, refined and guarded block scales: the current code, whatever it is)
  awq-scaled-head  the tied lm_head/table too (the final norm absorbs 1/s, the lookup is multiplied by 1/s)

    python benchmarks/int4_rounding.py --out benchmarks/results/int4_rounding.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lestd_export.calibration import load_calibration
from lestd_export.evaluate import default_text, torch_perplexity
from lestd_export.loading import load_model
from lestd_export.numerics.quantize import CLIP_RATIOS, blockwise_round, codes, dequantize, gptq, search_scales
from lestd_export.quantize_graph import QuantizeConfig, input_scale, round_codes
from lestd_export.text import tokenize

TEXTS = {
    "technical": default_text,
    "legal": lambda: Path("/usr/share/common-licenses/GPL-3").read_text(),
    "narrative": lambda: gzip.open("/usr/share/doc/debian-history/docs/project-history.en.txt.gz", "rt").read(),
}


def linears(model) -> dict[str, torch.nn.Linear]:
    """Every weight Linear (decoder projections and the lm_head), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def input_grams(model, sequences: np.ndarray) -> dict[str, np.ndarray]:
    """``X^T X / N`` (float64) of every Linear's input over the calibration sequences."""
    grams: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + (x.T @ x).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears(model).items()]
    try:
        with torch.inference_mode():
            for row in sequences:
                model(torch.from_numpy(row[None]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: gram / counts[name] for name, gram in grams.items()}


def rounded(weight_in_out: np.ndarray, variant: str, block: int, gram: np.ndarray | None, damping: float):
    """The stored values of ``x @ W`` (``W [K, N]``) under one rounding variant."""
    if variant == "rtn":
        return blockwise_round(weight_in_out, 4, block)
    importance = {"mse": None, "awq": np.diag(gram), "gptq": np.diag(gram), "awq-sqrt": np.sqrt(np.diag(gram)),
                  "awq-wide": np.diag(gram)}[variant]
    ratios = np.linspace(1.0, 0.5, 26) if variant == "awq-wide" else CLIP_RATIOS
    scales = search_scales(weight_in_out, 4, block, importance=importance, ratios=ratios)
    if variant == "gptq":
        return gptq(weight_in_out, gram, scales, 4, block, damping)
    return dequantize(codes(weight_in_out, scales, 4, block), scales, block)


SHARED_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def scaled_groups(dense: dict, grams: dict, block: int, head: bool = False) -> dict[str, np.ndarray]:
    """The quantiser's AWQ scaling (``quantize_graph.input_scale``, then ``round_codes`` of ``s W``) of the groups a
    norm feeds (Q/K/V, gate/up; the tied lm_head with ``head``). Returns the effective weights ``Q(diag(s) W) / s``
    ``[K, N]`` by Linear name."""
    config = QuantizeConfig(block_size=block)
    out = {}
    for name in dense:
        for members in SHARED_INPUT + ((("lm_head",),) if head else ()):
            if not name.endswith(members[0]):
                continue
            names = [name[: -len(members[0])] + m for m in members]
            weights = [dense[n].double().numpy().T for n in names]  # [K, N_i]
            gram = grams[names[0]]
            s = input_scale(weights, gram, config)
            for n, w in zip(names, weights):
                q, scales = round_codes(w * s[:, None], config, gram / np.outer(s, s))
                out[n] = dequantize(q, scales, block) / s[:, None]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="rtn,mse,awq,gptq")
    parser.add_argument("--blocks", default="32,64")
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--calibration", default="default",
                        help="default, self (the model's samples), mixed (half each) or a file")
    parser.add_argument("--head-bits", type=int, default=None, choices=(4, 8),
                        help="the tied lm_head/table rounded to nearest at these bits instead (as --head-bits)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_rounding.json"))
    args = parser.parse_args()

    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = {name: tokenize(tokenizer, read(), max_tokens=args.eval_tokens) for name, read in TEXTS.items()}
    dense = {n: m.weight.detach().clone() for n, m in linears(model).items()}

    def perplexities() -> dict[str, float]:
        return {name: torch_perplexity(model, ids, seq_len=512, progress=False)["perplexity"]
                for name, ids in texts.items()}

    results = {"machine": platform.processor() or platform.machine(), "model": loaded.source,
               "texts": {n: len(ids) for n, ids in texts.items()}, "damping": args.damping, "runs": []}
    results["runs"].append({"variant": "dense", "block": None, "perplexity": perplexities()})
    print(results["runs"][-1], flush=True)
    if args.calibration == "mixed":  # the docstrings and the model's own samples, half the tokens each
        halves = [load_calibration(source, model, tokenizer, args.calibration_tokens // 2)
                  for source in ("default", "self")]
        length = min(h.sequences.shape[1] for h in halves)
        data = type(halves[0])(np.concatenate([h.sequences[:, :length] for h in halves]),
                               "mixed: " + " + ".join(h.source for h in halves), 0.0)
    else:
        data = load_calibration(args.calibration, model, tokenizer, args.calibration_tokens)
    results["calibration"] = data.source
    results["head_bits"] = args.head_bits
    grams = input_grams(model, data.sequences)
    for block in [int(b) for b in args.blocks.split(",")]:
        for variant in args.variants.split(","):
            started = time.perf_counter()
            scaled = scaled_groups(dense, grams, block, head=variant == "awq-scaled-head") \
                if variant.startswith("awq-scaled") else {}
            with torch.no_grad():
                for name, module in linears(model).items():  # the tied table is the lm_head's weight: once
                    w = dense[name].double().numpy().T  # [K, N]: x @ W
                    if name == "lm_head" and args.head_bits:
                        values = blockwise_round(w, args.head_bits, block)
                    elif name in scaled:
                        values = scaled[name]
                    elif variant.startswith("awq-scaled"):  # the quantiser's rounding of an unscaled weight
                        q, scales = round_codes(w, QuantizeConfig(block_size=block), grams[name])
                        values = dequantize(q, scales, block)
                    else:
                        values = rounded(w, variant, block, grams[name], args.damping)
                    module.weight.copy_(torch.from_numpy(values.T))
            seconds = time.perf_counter() - started
            row = {"variant": variant, "block": block, "seconds": round(seconds, 1), "perplexity": perplexities()}
            results["runs"].append(row)
            print(row, flush=True)
    with torch.no_grad():
        for name, module in linears(model).items():
            module.weight.copy_(dense[name])
    base = results["runs"][0]["perplexity"]
    for row in results["runs"]:
        row["x_dense"] = {n: round(p / base[n], 4) for n, p in row["perplexity"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
