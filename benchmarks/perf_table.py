"""Reproduce the README's performance table on the default model (smollm2-135m).

Exports dense fp32 and LeSTD at size fractions 0.8 / 0.6 / 0.5 (cached in artifacts/bench/, reused
when present), then runs the benchmark harness (one fresh process per run, A/B interleaved) with
``--quantize none,int8``, batch 1, prompt 128, gen 64, 2 threads, 10 repeats, and writes
benchmarks/results/perf_smollm2.{json,md,png}.

Usage: python benchmarks/perf_table.py [--export-only] [--reexport] [--repeats 10] [--quantize none,int8]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "bench"
RESULTS = ROOT / "benchmarks" / "results"
FRACTIONS = (0.8, 0.6, 0.5)


def export_all(model_arg: str | None = None, reexport: bool = False) -> list[Path]:
    """Dense first (the baseline), then each size fraction; an existing export is reused unless ``reexport``."""
    from lestd_export.compress import compress_model
    from lestd_export.config import CompressionConfig
    from lestd_export.export import export_model
    from lestd_export.loading import LoadedModel, load_model

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wanted = [("dense", None)] + [(f"lestd-{f}", f) for f in FRACTIONS]
    dirs, loaded = [], None
    for name, fraction in wanted:
        out = ARTIFACTS / name
        dirs.append(out)
        if (out / "model.onnx").is_file() and not reexport:
            print(f"reusing {out}", file=sys.stderr)
            continue
        loaded = loaded or load_model(model_arg)
        started = time.perf_counter()
        if fraction is None:
            export_model(loaded, out, overwrite=True)
        else:
            model = copy.deepcopy(loaded.model)  # compression works in place: keep the original dense
            compress_model(model, CompressionConfig(size_fraction=fraction), progress=False, source=loaded.source)
            export_model(LoadedModel(model, loaded.tokenizer, loaded.source), out, overwrite=True)
        print(f"exported {out} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--reexport", action="store_true",
                        help="export again even where artifacts/bench/<variant> exists (after a layout change)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quantize", default="none,int8")
    parser.add_argument("--out", type=Path, default=RESULTS / "perf_smollm2")
    args = parser.parse_args(argv)

    dirs = export_all(args.model, args.reexport)
    if args.export_only:
        return 0
    from lestd_export.cli import main as cli_main

    args.out.parent.mkdir(parents=True, exist_ok=True)
    return cli_main(["bench", *map(str, dirs), "--baseline", str(dirs[0]), "--provider", "cpu", "--threads", "2",
                     "--batch", "1", "--prompt-len", "128", "--gen-len", "64", "--repeats", str(args.repeats),
                     "--warmup", "1", "--quantize", args.quantize,
                     "--json", str(args.out.with_suffix(".json")), "--markdown", str(args.out.with_suffix(".md")),
                     "--plot", str(args.out.with_suffix(".png"))])


if __name__ == "__main__":
    sys.exit(main())
