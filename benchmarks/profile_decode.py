"""Where does a decode step spend its time? ONNX Runtime profiling of exported models, by op type.

Runs a prompt, then ``--steps`` cached decode steps with ORT's profiler on (same session options as
the benchmark harness), and aggregates the decode steps' kernel time by op type and by node count.
Writes one JSON document with one entry per model directory.

Usage: python benchmarks/profile_decode.py DIR [DIR ...] [--threads 2] [--steps 32] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np


def profile(export_dir: Path, threads: int, prompt_len: int, steps: int) -> dict:
    import onnxruntime as ort

    from lestd_export.runtime import OrtCausalLM, session_options

    options = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(export_dir / "model.onnx"), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        runtime = OrtCausalLM(export_dir, session=session)
        ids = np.random.default_rng(0).integers(0, 1000, size=(1, prompt_len))
        runtime.generate(ids, max_new_tokens=steps + 1)  # one prefill run, then `steps` cached decode runs
        events = json.loads(Path(session.end_profiling()).read_text())

    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prefill
    start = min(e["ts"] for e in decode_runs)
    by_op_us, by_op_nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"]["op_name"]
            by_op_us[op] += e["dur"]
            by_op_nodes[op] += 1
    step_ms = [e["dur"] / 1000 for e in decode_runs]
    kernel_ms = sum(by_op_us.values()) / 1000 / steps
    return {
        "model": str(export_dir),
        "decode_step_ms_median": float(np.median(step_ms)),
        "kernel_ms_per_step": kernel_ms,
        "nodes_per_step": sum(by_op_nodes.values()) / steps,
        "by_op": {op: {"ms_per_step": us / 1000 / steps, "nodes_per_step": by_op_nodes[op] / steps}
                  for op, us in by_op_us.most_common()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "onnxruntime": ort.__version__},
              "models": [profile(d, args.threads, args.prompt_len, args.steps) for d in args.dirs]}
    for entry in result["models"]:
        top = ", ".join(f"{op} {v['ms_per_step']:.2f}ms/{v['nodes_per_step']:.0f}"
                        for op, v in list(entry["by_op"].items())[:8])
        print(f"{entry['model']}: step {entry['decode_step_ms_median']:.2f} ms, kernels {entry['kernel_ms_per_step']:.2f} ms,"
              f" {entry['nodes_per_step']:.0f} nodes | {top}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
