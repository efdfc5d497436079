"""Our int4 against the onnxruntime-genai builder's, in the real file and runtime (issue 18).

Builds the default model with the builder (fp32 and int4, block 32), quantises the fp32 build with
`lestd-export quantize` (rtn and awq, and whatever --variants adds), and measures for every file: the weight
bytes on disk, perplexity through ONNX Runtime on three held-out texts (technical: Python's language
reference; legal: GPL-3; narrative: Debian's project history; calibration: the default Python docstrings), and
decode speed in onnxruntime-genai's own loop (bench: interleaved, --repeats runs, paired ratios).

    python benchmarks/int4_genai.py --out benchmarks/results/int4_genai.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from lestd_export.bench import run_benchmark
from lestd_export.evaluate import evaluate
from lestd_export.export import model_files_bytes
from lestd_export.genai import run_builder
from lestd_export.loading import load_model
from lestd_export.onnx_input import resolve_input
from lestd_export.onnx_input.quantize import quantize_onnx
from lestd_export.quantize_graph import QuantizeConfig

from int4_rounding import TEXTS  # the three held-out texts (benchmarks/int4_rounding.py)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("artifacts/int4-genai"))
    parser.add_argument("--variants", default="rtn:32,awq:32,awq:64,awq:16", help="rounding:block,... of ours")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_genai.json"))
    args = parser.parse_args()

    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    loaded = load_model(None)
    hf = root / "hf"
    if not hf.exists():
        loaded.model.save_pretrained(hf)
        loaded.tokenizer.save_pretrained(hf)
    builds = {"builder-fp32": ("fp32", {}), "builder-int4": ("int4", {}),
              "builder-int4-block64": ("int4", {"int4_block_size": "64"})}
    for name, (precision, options) in builds.items():
        if not (root / name).exists():
            run_builder(hf, root / name, precision, extra_options=options)
    variants = ["builder-int4", "builder-int4-block64"]
    for item in args.variants.split(","):
        rounding, block = item.split(":")
        name = f"ours-{rounding}-{block}"
        if not (root / name).exists():
            quantize_onnx(root / "builder-fp32", root / name, QuantizeConfig(block_size=int(block), rounding=rounding),
                          validate=False)
        variants.append(name)
    results = {"machine": platform.processor() or platform.machine(), "eval_tokens": args.eval_tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        texts = {}
        for name, read in TEXTS.items():
            texts[name] = Path(tmp) / f"{name}.txt"
            texts[name].write_text(read())
        for name in ["builder-fp32", *variants]:
            directory = root / name
            row = {"bytes": model_files_bytes(resolve_input(directory)[1]), "perplexity": {}}
            for text, path in texts.items():
                row["perplexity"][text] = evaluate(directory, text_file=path, max_tokens=args.eval_tokens,
                                                   progress=False)["perplexity"]
            results["runs"][name] = row
            print(name, row, flush=True)
    dense = results["runs"]["builder-fp32"]["perplexity"]
    for row in results["runs"].values():
        row["x_dense"] = {t: round(p / dense[t], 4) for t, p in row["perplexity"].items()}
    timed = [v for v in variants if v != "builder-int4" and "-rtn-" not in v]  # rtn: the builder's graph and speed
    speed = run_benchmark([root / v for v in timed], baseline=root / "builder-int4", repeats=args.repeats,
                          quality_tokens=0, progress=False)
    results["speed"] = speed.get("ratios", speed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
