"""Wall time of compressing the default model (loading excluded), written to benchmarks/results/compress_speed.json.

Usage: python benchmarks/compress_speed.py [--size-fraction 0.5] [--repeats 3] [--model smollm2-135m]
"""

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lestd_export.bench import machine_info
from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.io import write_json
from lestd_export.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--size-fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compress_speed.json")
    args = parser.parse_args()

    started = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - started
    seconds, report = [], None
    for _ in range(args.repeats):
        model = copy.deepcopy(loaded.model)
        started = time.perf_counter()
        report = compress_model(model, CompressionConfig(size_fraction=args.size_fraction), progress=False)
        seconds.append(time.perf_counter() - started)
    result = {
        "machine": machine_info("cpu", torch.get_num_threads()),
        "model": loaded.source, "size_fraction": report["size_fraction"],
        "load_seconds": load_seconds, "compress_seconds": seconds,
        "compress_seconds_median": statistics.median(seconds),
        "relative_weight_error": report["relative_weight_error"]["overall"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
