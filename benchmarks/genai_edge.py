"""LeSTD in the runtime edge users run: onnxruntime-genai, int4 and int8, against the genai builder's dense models.

One interleaved run (fresh process per variant and repeat, medians; ``lestd_export.bench``): the builder's dense
int4 and int8 models of the default model, and LeSTD at ``--fraction`` exported with ``export --format genai
--quantize int4|int8`` (the builder's graph with the compressed attention grafted in, every stored weight
MatMulNBits), compressed with the CLI's defaults (calibration, refit) plus ``--settings``. Every record has
prefill/decode tokens/s, file bytes and a short perplexity (the same default-text tokens for every variant).
The JSON adds, per precision, LeSTD's decode speedup, bytes ratio, bytes-bound fraction and perplexity ratio
against the builder's dense model of that precision.

Usage: python benchmarks/genai_edge.py [--fraction 0.5] [--settings dense_output|dense_output_heal|factored_output|svd_llm]
       [--repeats 5]
       [--out benchmarks/results/genai_edge_<settings>.json]
The builder 0.15.2's int8 model of a tied-embedding model does not load with its shared embedding;
lestd_export.genai.run_builder builds int8 with ``shared_embeddings=false``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lestd_export.bench import run_benchmark, to_markdown, within_repeat_ratios
from lestd_export.compress import compress_model, save_compressed
from lestd_export.config import CompressionConfig
from lestd_export.export_genai import export_genai
from lestd_export.genai import genai_baselines
from lestd_export.loading import load_model

PRECISIONS = ("int4", "int8")
SETTINGS = {"dense_output": {"dense_output": True}, "factored_output": {},
            "dense_output_heal": {"dense_output": True, "heal": True},  # + logit-KL healing (the defaults)
            "svd_llm": {"method": "svd"},  # the per-matrix baseline, calibrated (SVD-LLM), grafted the same way
            # the MLP alone as SVD-LLM factors (gate/up sharing a basis) at the fraction given, attention dense
            "mlp": {"modules": ("mlp",)}, "mlp_heal": {"modules": ("mlp",), "heal": True},  # healing's defaults
            # the MLP alone as two-core TT-matrices, and with Saten's sparse residual
            "mlp_tt": {"modules": ("mlp",), "mlp_method": "tt"},
            "mlp_saten": {"modules": ("mlp",), "mlp_method": "saten"},
            # the token table and tied lm_head alone as SVD-LLM factors at the fraction given
            "embedding": {"modules": ("embedding",)}}


def lestd_variant(root: Path, fraction: float, storage: str, settings: str, model: str | None = None) -> Path:
    """Compress ``model`` (default: the default model; calibrated; plain layout; ``fraction`` sizes the attention,
    or the MLP / table of the settings without attention) once per fraction and settings, export to genai at
    ``storage``; cached under ``root`` (delete it after changing the code: cached builds are reused as they are). The
    plain layout stores no index, so its plan is the same for int4 and int8."""
    out = root / f"lestd-{fraction}-{settings}-{storage}"
    if (out / "export_report.json").is_file():
        return out
    checkpoint = root / f"checkpoint-{fraction}-{settings}"
    loaded = load_model(str(checkpoint) if (checkpoint / "config.json").is_file() else model)
    if not loaded.compressed:
        settings_ = SETTINGS[settings]
        modules = settings_.get("modules", ("attention",))
        sizes = {"size_fraction" if "attention" in modules else f"{modules[0]}_fraction": fraction}
        config = CompressionConfig(calibration="default", storage="int4", layout="plain", **sizes, **settings_)
        report = compress_model(loaded.model, config, tokenizer=loaded.tokenizer, source=loaded.source)
        save_compressed(loaded, report, checkpoint, overwrite=True)
    export_genai(loaded, out, storage=storage, overwrite=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--settings", choices=tuple(SETTINGS), default="dense_output")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default="int4,int8", help="comma list of int4, int8 (default both)")
    parser.add_argument("--quality-tokens", type=int, default=2048)
    parser.add_argument("--root", type=Path, default=Path("artifacts/genai-edge"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/genai_edge_<settings>.json (and .md)")
    args = parser.parse_args()
    precisions = tuple(args.precisions.split(","))
    if not precisions or not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions takes a comma list of {', '.join(PRECISIONS)}")
    args.out = args.out or Path(f"benchmarks/results/genai_edge_{args.settings}.json")

    dense = dict(zip(precisions, genai_baselines(None, precisions=precisions)))
    ours = {p: lestd_variant(args.root, args.fraction, p, args.settings) for p in precisions}
    result = run_benchmark([d for p in precisions for d in (dense[p], ours[p])], baseline=dense[precisions[0]],
                           threads=2, repeats=args.repeats, quality_tokens=args.quality_tokens)
    by_dir = {Path(r["export_dir"]).resolve(): r for r in result["records"]}
    summary = {}
    for precision in precisions:
        base, mine = by_dir[dense[precision].resolve()], by_dir[ours[precision].resolve()]
        speedup = mine["decode_tokens_per_s"]["median"] / base["decode_tokens_per_s"]["median"]
        within = within_repeat_ratios(mine, base)
        paired = statistics.median(within)
        bytes_ratio = base["model_bytes"] / mine["model_bytes"]
        summary[precision] = {
            "dense": base["variant"], "lestd": mine["variant"], "decode_speedup": speedup,
            "decode_speedup_paired": paired, "decode_speedup_paired_quartiles": statistics.quantiles(within, n=4),
            "prefill_speedup": mine["prefill_tokens_per_s"]["median"] / base["prefill_tokens_per_s"]["median"],
            "bytes_ratio": bytes_ratio, "bytes_bound_fraction": speedup / bytes_ratio,
            "perplexity_ratio": mine["quality"]["perplexity"] / base["quality"]["perplexity"],
            "attention_bytes": json.loads((ours[precision] / "export_report.json").read_text())["attention_bytes"]}
    result["lestd_vs_builder"] = summary
    checkpoint = args.root / f"checkpoint-{args.fraction}-{args.settings}" / "compression_report.json"
    result["settings"] = {"fraction": args.fraction, "compression": args.settings,  # cached builds are reused:
                          "checkpoint_config": json.loads(checkpoint.read_text())["config"]}  # say what was timed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
