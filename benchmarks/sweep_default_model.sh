#!/usr/bin/env bash
# Quality sweep on the embedded default model (SmolLM2-135M): perplexity vs achieved size fraction for
# LeSTD (row/element granularity x layer/global budget), TensorLLM and per-matrix SVD, on the first
# 8192 tokens of the default text (Python language reference), windows of 512 tokens.
# Finished runs are cached (default: $LESTD_CACHE_DIR/sweep), so rerunning after an interruption resumes.
# Run in the background:  nohup benchmarks/sweep_default_model.sh > /tmp/sweep.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
lestd-export sweep --fractions 0.9,0.8,0.7,0.6,0.5 --methods lestd,tensorllm,svd --granularity row,element --budget layer,global --max-tokens 8192 --json benchmarks/results/sweep_smollm2.json --markdown benchmarks/results/sweep_smollm2.md --plot benchmarks/results/sweep_smollm2.png
