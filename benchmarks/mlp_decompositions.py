"""Which decomposition of the MLP weights loses least at equal parameters (issue 19): SVD, SVD-LLM (whitened SVD,
what `compress --modules mlp` stores), TT-matrix with 2 and 3 mode pairs (TT-LLM's FFN format) and Saten (TT plus
an unstructured sparse residual whose int32 indices are counted), on every MLP weight of a real model.

For each weight ``W [K, N]`` and parameter fraction ``f`` (stored entries / ``K N``; a sparse entry costs two: its
value and its index, at fp32), the relative output error ``sqrt(tr(E^T C E) / tr(W^T C W))`` (``C``: the weight's
calibration input Gram, default text) and the relative Frobenius error, averaged over the weights of each kind;
with --perplexity, every MLP weight replaced by the method's reconstruction (fp32, attention and table dense) and
perplexity through PyTorch on the three held-out texts of benchmarks/int4_rounding.py. A TT has no whitened form
(``L^T W`` in TT format is not ``W`` in TT format), so TT and Saten minimise the plain Frobenius error, as in both
papers.

    python benchmarks/mlp_decompositions.py --fractions 0.5,0.7,0.9 --perplexity 0.9,0.7 \
        --out benchmarks/results/mlp_decompositions.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_rounding import TEXTS  # noqa: E402

from lestd_export.calibration import collect_mlp_statistics, load_calibration  # noqa: E402
from lestd_export.evaluate import torch_perplexity  # noqa: E402
from lestd_export.loading import load_model  # noqa: E402
from lestd_export.numerics.metric import cholesky_factor  # noqa: E402
from lestd_export.numerics.tt import SATEN_SPARSE_SHARE, tt_weight  # noqa: E402
from lestd_export.registry import decoder_layers, spec_for  # noqa: E402
from lestd_export.text import tokenize  # noqa: E402

METHODS = ("svd", "svd-llm", "tt2", "tt3", "saten")


_SVDS: dict = {}  # (weight id, whitened) -> the SVD, shared by every fraction


def truncated_svd(weight: np.ndarray, rank: int, left: np.ndarray | None = None) -> np.ndarray:
    """Rank-``rank`` approximation of ``weight``, in the output-error norm when ``left`` (``L^T``) is given."""
    key = (id(weight), left is not None)
    if key not in _SVDS:
        _SVDS[key] = np.linalg.svd(weight if left is None else left @ weight, full_matrices=False)
    u, sigma, vt = _SVDS[key]
    approximation = (u[:, :rank] * sigma[:rank]) @ vt[:rank]
    return approximation if left is None else np.linalg.solve(left, approximation)


def approximate(method: str, weight: np.ndarray, fraction: float, left: np.ndarray) -> np.ndarray:
    """``weight [K, N]`` as ``method`` stores it in ``fraction`` of its entries."""
    k, n = weight.shape
    if method in ("svd", "svd-llm"):
        return truncated_svd(weight, max(1, int(fraction * k * n) // (k + n)), left if method == "svd-llm" else None)
    if method in ("tt2", "tt3"):
        return tt_weight(weight, fraction, int(method[2])).dense()
    return tt_weight(weight, fraction, 2, SATEN_SPARSE_SHARE).dense()


def relative_errors(weight: np.ndarray, approximation: np.ndarray, gram: np.ndarray) -> tuple[float, float]:
    error = weight - approximation
    output = np.einsum("kn,kn->", error, gram @ error) / np.einsum("kn,kn->", weight, gram @ weight)
    return float(np.sqrt(output)), float(np.linalg.norm(error) / np.linalg.norm(weight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="catalogue alias or path (default: the default model)")
    parser.add_argument("--fractions", default="0.5,0.7,0.9")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--perplexity", default="", help="fractions at which to measure perplexity as well")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mlp_decompositions.json"))
    args = parser.parse_args()
    methods = args.methods.split(",")

    loaded = load_model(args.model)
    model, spec = loaded.model, spec_for(loaded.model.config)
    data = load_calibration("default", model, loaded.tokenizer)
    grams = collect_mlp_statistics(model, spec, data)
    layers = decoder_layers(model, spec)
    weights = []  # (layer, path, W [K, N] float64, Gram [K, K], L^T)
    for layer, (x_gram, h_gram) in zip(layers, grams):
        for path in (*spec.mlp_in, spec.mlp_out):
            module = layer.get_submodule(path)
            gram = h_gram if path == spec.mlp_out else x_gram
            weight = module.weight.detach().double().numpy()
            weights.append((layer, path, weight.T if not spec.weight_in_out else weight, gram,
                            cholesky_factor(gram, 0.01).T))
    results = {"machine": platform.processor() or platform.machine(), "model": loaded.source,
               "weights": len(weights), "saten_sparse_share": SATEN_SPARSE_SHARE, "errors": {}, "perplexity": {}}
    for fraction in args.fractions.split(","):
        for method in methods:
            rows = [relative_errors(w, approximate(method, w, float(fraction), left), gram)
                    for _, _, w, gram, left in weights]
            kinds = {}
            for (_, path, *_), (output, frobenius) in zip(weights, rows):
                kinds.setdefault(path, []).append((output, frobenius))
            results["errors"][f"{method}@{fraction}"] = {
                "output": float(np.mean([r[0] for r in rows])), "frobenius": float(np.mean([r[1] for r in rows])),
                "by_weight": {p: {"output": float(np.mean([v[0] for v in vs])),
                                  "frobenius": float(np.mean([v[1] for v in vs]))} for p, vs in kinds.items()}}
            print(method, fraction, results["errors"][f"{method}@{fraction}"]["output"], flush=True)
            save(results, args.out)  # a partial run keeps what it measured
    texts = {name: tokenize(loaded.tokenizer, read(), max_tokens=args.eval_tokens) for name, read in TEXTS.items()}

    def perplexities() -> dict[str, float]:
        return {name: torch_perplexity(model, ids, seq_len=512, progress=False)["perplexity"]
                for name, ids in texts.items()}

    if args.perplexity:
        results["perplexity"]["dense"] = perplexities()
        originals = [layer.get_submodule(path).weight.detach().clone() for layer, path, *_ in weights]
        for fraction in args.perplexity.split(","):
            for method in methods:
                with torch.no_grad():
                    for (layer, path, w, _, left) in weights:
                        stored = approximate(method, w, float(fraction), left)
                        stored = stored if spec.weight_in_out else stored.T
                        layer.get_submodule(path).weight.copy_(torch.from_numpy(np.ascontiguousarray(stored)))
                results["perplexity"][f"{method}@{fraction}"] = perplexities()
                print(method, fraction, results["perplexity"][f"{method}@{fraction}"], flush=True)
                save(results, args.out)
        with torch.no_grad():
            for (layer, path, *_), original in zip(weights, originals):
                layer.get_submodule(path).weight.copy_(original)
    save(results, args.out)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
