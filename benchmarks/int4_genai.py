"""The int4 frontier in the real file and runtime (issue 18): our quantiser against the onnxruntime-genai builder's
and ONNX Runtime's own quantisers, file bytes against perplexity on three held-out texts.

Builds the default model with the builder (fp32; int4 at blocks 32 and 64; int8), quantises the fp32 build with
ONNX Runtime's MatMulNBitsQuantizer (--ort: RTN symmetric, HQQ with its fp32 zero points; the token table, which
that quantiser leaves fp32, stored in int4 by our round-to-nearest so that sizes compare) and with
`lestd-export quantize` (--ours: rounding:block[:head bits[:bits]]), exports the compressed variants of benchmarks/genai_edge.py at
--fraction (--compressed: LeSTD --dense-output, factored output, SVD-LLM; `export --format genai --quantize int4`
with its default calibrated rounding), writes whole-file plans at --targets fractions of the builder's int4 bytes
(`quantize --target-mb`, issue 19: with low-rank factors among the choices, `plan-F`, and quantisation only,
`plan-F-quant`), and measures for every file: the bytes on disk, perplexity
through ONNX Runtime on three held-out texts (technical: Python's language reference; legal: GPL-3; narrative:
Debian's project history; calibration: the default Python docstrings, none of them), and, for --timed files,
decode speed in onnxruntime-genai's own loop against the builder's int4 (interleaved, --repeats runs, paired
ratios). Writes the JSON and a plot of MB against perplexity per text.

    python benchmarks/int4_genai.py --out benchmarks/results/int4_frontier.json
    python benchmarks/int4_genai.py --targets 0.95,0.9,0.8,0.7 --ours awq:32,awq:64,awq:128,awq:256,awq:32::2 \
        --out benchmarks/results/whole_model_frontier.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
from pathlib import Path

from lestd_export.bench import run_benchmark
from lestd_export.evaluate import evaluate
from lestd_export.export import model_files_bytes
from lestd_export.genai import run_builder
from lestd_export.loading import load_model
from lestd_export.onnx_input import resolve_input
from lestd_export.onnx_input.budget import BudgetRequest
from lestd_export.onnx_input.quantize import quantize_onnx
from lestd_export.quantize_graph import QuantizeConfig

from genai_edge import lestd_variant  # compress (calibrated, plain layout) and export to genai, cached
from int4_rounding import TEXTS  # the three held-out texts (benchmarks/int4_rounding.py)


def ort_quantized(fp32: Path, out: Path, algorithm: str, block: int) -> None:
    """ONNX Runtime's MatMulNBitsQuantizer (``rtn``: symmetric round-to-nearest; ``hqq``: HQQ, fp32 zero points) of
    every MatMul of the fp32 build, then the token table it leaves fp32 stored in int4 by our round-to-nearest."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    from lestd_export.quantize_graph import quantize_graph

    model = onnx.load(str(fp32 / "model.onnx"))
    config = (HQQWeightOnlyQuantConfig(block_size=block, bits=4) if algorithm == "hqq"
              else DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4))
    quantizer = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=algorithm != "hqq", accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    quantize_graph(model, QuantizeConfig(rounding="rtn", block_size=block), progress=False)  # the table only
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(fp32, staging, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx.save(model, str(staging / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    staging.rename(out)


def beaten_by(runs: dict) -> dict:
    """For each file not ours, our files of at most its bytes (+1%) with at most its perplexity on every text."""
    ours = {name: row for name, row in runs.items() if name.startswith("ours")}
    return {name: [mine for mine, o in ours.items() if o["bytes"] <= 1.01 * row["bytes"]
                   and all(o["x_dense"][t] <= x for t, x in row["x_dense"].items())]
            for name, row in runs.items() if not name.startswith("ours") and name != "builder-fp32"}


def plan_verdicts(runs: dict) -> dict:
    """For each whole-file plan with low-rank factors among its choices (``plan-*`` not ``-quant``): the
    quantisation-only files of at most its bytes, and which of them it beats on every text."""
    verdicts = {}
    for name, row in runs.items():
        if not name.startswith("plan-") or name.endswith("-quant"):
            continue
        rivals = {other: o for other, o in runs.items() if other != name and other != "builder-fp32"
                  and not (other.startswith("plan-") and not other.endswith("-quant"))
                  and not other.startswith("lestd-") and o["bytes"] <= row["bytes"]}
        verdicts[name] = {"no_larger_quantisation_only": sorted(rivals), "beats": sorted(
            other for other, o in rivals.items() if all(row["x_dense"][t] < x for t, x in o["x_dense"].items())),
            "factored_weights": row.get("factored")}
    return verdicts


def machine() -> str:
    """The CPU's model name and core count (``platform.processor()`` is empty on Linux)."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return f"{names[0]}, {len(names)} cores" if names else platform.machine()


def plot(results: dict, path: Path) -> None:
    """File MB against perplexity (x dense), one panel per text, one marker per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(TEXTS)
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4.2), sharey=False)
    families = {"builder": ("s", "tab:gray"), "ort-rtn": ("v", "tab:orange"), "ort-hqq": ("^", "tab:red"),
                "ours": ("o", "tab:blue"), "lestd": ("x", "tab:green"), "plan-quant": ("D", "tab:purple"),
                "plan-lowrank": ("P", "tab:olive")}

    def family_of(name: str) -> str:
        if name.startswith("plan-"):
            return "plan-quant" if name.endswith("-quant") else "plan-lowrank"
        return next((f for f in families if name.startswith(f)), "")

    for axis, text in zip(axes, texts):
        for family, (marker, color) in families.items():
            rows = sorted((r["bytes"] / 1e6, r["x_dense"][text], name) for name, r in results["runs"].items()
                          if family_of(name) == family and "fp32" not in name and r["x_dense"][text] < 2.5)
            if rows:
                axis.plot([r[0] for r in rows], [r[1] for r in rows], marker=marker, color=color, label=family,
                          linestyle="-" if family in ("ours", "plan-quant", "plan-lowrank") else ":")
                for mb, x, name in rows:
                    speed = (results.get("speed") or {}).get(name, {})
                    label = name.split("-", 1)[1] + (f" {speed['decode_speedup_paired']:.2f}x" if speed else "")
                    axis.annotate(label, (mb, x), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_title(f"{text} (dense ppl {results['runs']['builder-fp32']['perplexity'][text]:.1f})")
        axis.set_xlabel("file MB")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity / dense (files under 2.5x)")
    axes[0].legend()
    fig.suptitle(f"{results['model']} frontier, onnxruntime-genai layout ({results['machine']}); "
                 "N.NNx: decode speed against the builder's int4 (paired)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="catalogue alias or path (default: the default model)")
    parser.add_argument("--root", type=Path, default=Path("artifacts/int4-genai"))
    parser.add_argument("--ours", default="awq:16,awq:32,awq:64,awq:128,awq:16:8,awq:32:8,awq:64:8,awq:32::8",
                        help="rounding:block[:head bits[:bits]],... of ours (bits default 4)")
    parser.add_argument("--builder", default="fp32,int4,int4-block64,int8",
                        help="the builder's files (fp32 is always needed)")
    parser.add_argument("--ort", default="rtn:16,rtn:32,rtn:64,rtn:128,hqq:16,hqq:32,hqq:64,hqq:128",
                        help="algorithm:block,... of ONNX Runtime's quantiser")
    parser.add_argument("--compressed", default="", help="genai_edge.py settings,... (dense_output, factored_output, "
                        "svd_llm) exported at int4 beside the quantisation-only files")
    parser.add_argument("--fraction", default="0.5", help="--compressed: size fractions, comma-separated (of the "
                        "attention; of the MLP or the token table for the mlp and embedding settings)")
    parser.add_argument("--targets", default="", help="whole-file plans (quantize --target-mb) at these fractions "
                        "of the builder's int4 bytes, e.g. 0.95,0.9,0.8,0.7 (F:quant or F:lowrank: that plan alone)")
    parser.add_argument("--plans", default="lowrank,quant",
                        help="--targets: lowrank (low-rank factors among the choices), quant (quantisation only)")
    parser.add_argument("--timed", default="ours-awq-32,ours-awq-64",
                        help="files whose decode speed is measured against the builder's int4 ('' for none)")
    parser.add_argument("--keep-speed", action="store_true",
                        help="keep the decode speeds --out already records for files not timed in this run (each "
                             "recorded run's ratios are its own: interleaved, paired, against the builder's int4)")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_frontier.json"))
    args = parser.parse_args()

    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    hf = root / "hf"
    if not hf.exists():
        loaded.model.save_pretrained(hf)
        loaded.tokenizer.save_pretrained(hf)
    source = loaded.source
    del loaded  # the PyTorch model is not needed again: its memory goes to the quantiser (0.5B: 2.5 GB)
    builds = {"builder-fp32": ("fp32", {}), "builder-int4": ("int4", {}),
              "builder-int4-block64": ("int4", {"int4_block_size": "64"}), "builder-int8": ("int8", {})}
    builds = {name: build for name, build in builds.items() if name[len("builder-"):] in args.builder.split(",")}
    for name, (precision, options) in builds.items():
        if not (root / name).exists():
            run_builder(hf, root / name, precision, extra_options=options)
    names = list(builds)
    for item in filter(None, args.ort.split(",")):
        algorithm, block = item.split(":")
        name = f"ort-{algorithm}-{block}"
        if not (root / name).exists():
            ort_quantized(root / "builder-fp32", root / name, algorithm, int(block))
        names.append(name)
    for item in filter(None, args.ours.split(",")):
        rounding, block, head, bits = (item.split(":") + ["", ""])[:4]
        name = f"ours-{rounding}-{block}" + (f"-head{head}" if head else "") + (f"-int{bits}" if bits else "")
        if not (root / name).exists():
            quantize_onnx(root / "builder-fp32", root / name, QuantizeConfig(
                bits=int(bits or 4), block_size=int(block), rounding=rounding, head_bits=int(head) if head else None))
        names.append(name)
    int4_bytes = model_files_bytes(resolve_input(root / "builder-int4")[1]) if (root / "builder-int4").exists() else 0
    factored = {}
    for target in filter(None, args.targets.split(",")):
        fraction, _, only = target.partition(":")  # F:quant or F:lowrank: that plan alone at F
        for kind in [only] if only else filter(None, args.plans.split(",")):
            name = f"plan-{fraction}" + ("-quant" if kind == "quant" else "")
            if not (root / name).exists():
                quantize_onnx(root / "builder-fp32", root / name, QuantizeConfig(), budget=BudgetRequest(
                    int(float(fraction) * int4_bytes), low_rank=kind == "lowrank",
                    cache=str(root / "plan-options.json")))  # weighed once for every target
            report = json.loads((root / name / "quantization_report.json").read_text())
            factored[name] = report["budget"]["factored"]
            names.append(name)
    for fraction in args.fraction.split(","):
        for settings in filter(None, args.compressed.split(",")):
            lestd_variant(root, float(fraction), "int4", settings, args.model)
            names.append(f"lestd-{float(fraction)}-{settings}-int4")
    results = {"machine": machine(), "model": source, "eval_tokens": args.eval_tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        texts = {}
        for text, read in TEXTS.items():
            texts[text] = Path(tmp) / f"{text}.txt"
            texts[text].write_text(read())
        cache_file = root / "perplexity-cache.json"  # a file's perplexities, kept until the file changes
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        for name in names:
            directory = root / name
            model_file = resolve_input(directory)[1]
            stamp = [p.stat().st_mtime_ns for p in sorted(directory.glob("model.onnx*"))]
            row = {"bytes": model_files_bytes(model_file), "perplexity": {}}
            for text, path in texts.items():
                key = f"{name}|{text}|{args.eval_tokens}"
                if cache.get(key, {}).get("stamp") != stamp:
                    cache[key] = {"stamp": stamp, "perplexity": evaluate(
                        directory, text_file=path, max_tokens=args.eval_tokens, progress=False)["perplexity"]}
                    cache_file.write_text(json.dumps(cache, indent=1))
                row["perplexity"][text] = cache[key]["perplexity"]
            if name in factored:
                row["factored"] = factored[name]
            results["runs"][name] = row
            print(name, row, flush=True)
    dense = results["runs"]["builder-fp32"]["perplexity"]
    for row in results["runs"].values():
        row["x_dense"] = {t: round(p / dense[t], 4) for t, p in row["perplexity"].items()}
    results["beaten_by"] = beaten_by(results["runs"])
    results["plans"] = plan_verdicts(results["runs"])
    timed = [name for name in args.timed.split(",") if name]
    if args.keep_speed and args.out.is_file():
        results["speed"] = json.loads(args.out.read_text()).get("speed", {})
    if timed and args.repeats:
        speed = run_benchmark([root / v for v in timed], baseline=root / "builder-int4", repeats=args.repeats,
                              quality_tokens=0, progress=False)
        results["speed"] = {**results.get("speed", {}), **speed.get("ratios", speed)}
    results["peak_rss_mb"] = {who: resource.getrusage(flag).ru_maxrss / 1024 for who, flag in
                              (("this process", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
