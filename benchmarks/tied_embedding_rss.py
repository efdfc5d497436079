"""Initializer bytes and RSS of exports under ONNX Runtime ORT_ENABLE_ALL: does the session hold more
weight bytes than the file (a tied embedding read as ``MatMul(h, Transpose(E))`` is folded into a second,
transposed copy)? Written to benchmarks/results/tied_embedding_rss.json.

Usage: python benchmarks/tied_embedding_rss.py LABEL=EXPORT_DIR [LABEL=EXPORT_DIR ...] [--repeats 5]

RSS comes from ``python -m lestd_export.bench_worker`` (one fresh process per run, labels interleaved,
batch 1, prompt 128, 64 generated tokens, 2 threads: the README's Performance settings); medians.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from lestd_export.bench import machine_info
from lestd_export.export import ONNX_FILE, constant_bytes, model_files_bytes, ort_optimized_sizes
from lestd_export.io import write_json

THREADS = 2


def graph_facts(export_dir: Path) -> dict:
    """File bytes, weight bytes in the file and in the ORT_ENABLE_ALL-optimised graph, and the logits op."""
    path = export_dir / ONNX_FILE
    graph = onnx.load(str(path))
    with tempfile.TemporaryDirectory() as work:
        optimized = ort_optimized_sizes(export_dir, Path(work))
    head = next(n for n in graph.graph.node if "logits" in n.output)
    return {"model_bytes": model_files_bytes(path), "file_constant_bytes": constant_bytes(graph),
            "optimized_initializer_bytes": sum(optimized.values()),
            "logits_node": {"op": head.op_type, "inputs": list(head.input)}}


def rss_run(export_dir: Path) -> dict:
    command = [sys.executable, "-m", "lestd_export.bench_worker", str(export_dir), "--threads", str(THREADS),
               "--prompt-len", "128", "--gen-len", "64"]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {key: result[key] for key in ("rss_after_load_mb", "peak_rss_mb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", metavar="LABEL=EXPORT_DIR")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--note", default=None, help="recorded as is (e.g. which code exported each directory)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tied_embedding_rss.json")
    args = parser.parse_args()

    exports = dict(item.split("=", 1) for item in args.exports)
    variants = {label: graph_facts(Path(path)) for label, path in exports.items()}
    runs = {label: [] for label in exports}
    for _ in range(args.repeats):  # interleaved: A, B, A, B, ...
        for label, path in exports.items():
            runs[label].append(rss_run(Path(path)))
    for label, facts in variants.items():
        facts["extra_initializer_bytes"] = facts["optimized_initializer_bytes"] - facts["file_constant_bytes"]
        for key in ("rss_after_load_mb", "peak_rss_mb"):
            values = [run[key] for run in runs[label]]
            facts[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                          "runs": values}
    result = {"machine": machine_info("cpu", THREADS), "batch": 1, "prompt_len": 128, "gen_len": 64,
              "repeats": args.repeats, "note": args.note, "exports": exports, "variants": variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({label: {k: v for k, v in facts.items() if k != "logits_node"}
                      for label, facts in variants.items()}, indent=2))


if __name__ == "__main__":
    main()
