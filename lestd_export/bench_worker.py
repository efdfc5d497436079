"""One benchmark run in a fresh process: ``python -m lestd_export.bench_worker DIR --model-file F ...``.

Loads the session, records RSS after load, warms up, measures prefill (one step over B x P random
prompt tokens) and G cached decode steps, and prints one JSON line on stdout. numpy + onnxruntime +
psutil only (no torch import), so memory numbers are those of the runtime alone. ``--runtime genai``
runs an onnxruntime-genai directory through genai's C++ generation loop instead (same protocol: prefill
is ``append_tokens`` of the prompt plus the first token, then G timed ``generate_next_token`` steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (reset at exec). ``ru_maxrss`` is not used on Linux because
    it keeps the high-water mark of the parent that forked us (a torch-loaded parent would dominate)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return max(int(line.split()[1]) / 1024, _rss_mb())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return max(peak / (2**20 if sys.platform == "darwin" else 1024), _rss_mb())


def _vocab_size(runtime) -> int:
    vocab = runtime.config.get("vocab_size")
    if vocab:
        return int(vocab)
    shape = runtime.session.get_outputs()[0].shape[-1]
    return int(shape) if isinstance(shape, int) else 100


def measure(export_dir: Path, model_file: Path, provider: str, threads: int | None, batch: int, prompt_len: int,
            gen_len: int, warmup: int, seed: int = 0) -> dict:
    from .runtime import OrtCausalLM, open_session

    rss_before = _rss_mb()
    started = time.perf_counter()
    session = open_session(model_file, provider, threads, "all")
    runtime = OrtCausalLM(export_dir, session=session)
    load_seconds = time.perf_counter() - started
    rss_after_load = _rss_mb()

    rng = np.random.default_rng(seed)
    vocab = _vocab_size(runtime)
    prompt = rng.integers(0, vocab, size=(batch, prompt_len)).astype(np.int64)
    mask = np.ones_like(prompt)
    for _ in range(warmup):
        runtime.generate(prompt, mask, max_new_tokens=min(gen_len, 8) or 1)

    started = time.perf_counter()
    out = runtime.step(prompt, mask)
    token = out.logits[:, -1].argmax(-1)
    prefill_seconds = time.perf_counter() - started
    finite = bool(np.isfinite(out.logits).all())

    latencies, past = [], out.past
    for _ in range(gen_len):
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        started = time.perf_counter()
        out = runtime.step(token[:, None].astype(np.int64), mask, past)
        token = out.logits[:, -1].argmax(-1)
        latencies.append(time.perf_counter() - started)
        past = out.past
        finite &= bool(np.isfinite(out.logits[:, -1]).all())

    return _record({"model_file": str(model_file), "provider": provider}, threads, batch, prompt_len, gen_len,
                   load_seconds, rss_before, rss_after_load, prefill_seconds, latencies, finite)


def _record(runtime: dict, threads, batch: int, prompt_len: int, gen_len: int, load_seconds: float,
            rss_before: float, rss_after_load: float, prefill_seconds: float, latencies: list[float],
            finite: bool) -> dict:
    """One run's measurements (both runtimes report the same fields)."""
    decode_seconds = sum(latencies)
    return {
        "pid": os.getpid(), **runtime,
        "threads": threads, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
        "load_seconds": load_seconds,
        "rss_before_load_mb": rss_before,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_mb": _peak_rss_mb(),
        "prefill_seconds": prefill_seconds,
        "ttft_ms": prefill_seconds * 1e3,
        "prefill_tokens_per_s": batch * prompt_len / prefill_seconds,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_s": batch * gen_len / decode_seconds if gen_len else None,
        "latencies_ms": [t * 1e3 for t in latencies],
        "finite_logits": finite,
    }


def measure_genai(genai_dir: Path, threads: int | None, batch: int, prompt_len: int, gen_len: int, warmup: int,
                  seed: int = 0) -> dict:
    """:func:`measure` through onnxruntime-genai's generation loop (greedy; logits checked outside the timings)."""
    from .genai import GenaiRuntime, decoder_file, genai_version

    rss_before = _rss_mb()
    started = time.perf_counter()
    runtime = GenaiRuntime(genai_dir, threads)
    load_seconds = time.perf_counter() - started
    rss_after_load = _rss_mb()

    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, runtime.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    for _ in range(warmup):
        runtime.generate(prompt, min(gen_len, 8) or 1)

    # get_logits runs the forward that the next generate_next_token would run, so it is read only where that
    # forward is already done (after append_tokens) and once after the timed steps (one extra, untimed step)
    generator = runtime.generator(batch, prompt_len + 2 + gen_len)
    started = time.perf_counter()
    generator.append_tokens(prompt)
    appended = time.perf_counter()
    finite = bool(np.isfinite(generator.get_logits()).all())
    restarted = time.perf_counter()
    generator.generate_next_token()
    prefill_seconds = appended - started + time.perf_counter() - restarted

    latencies = []
    for _ in range(gen_len):
        started = time.perf_counter()
        generator.generate_next_token()
        latencies.append(time.perf_counter() - started)
    finite &= bool(np.isfinite(generator.get_logits()).all())

    runtime = {"model_file": str(decoder_file(genai_dir)), "runtime": "onnxruntime-genai",
               "onnxruntime_genai": genai_version(), "provider": "cpu"}
    return _record(runtime, threads, batch, prompt_len, gen_len, load_seconds, rss_before, rss_after_load,
                   prefill_seconds, latencies, finite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lestd_export.bench_worker", description=__doc__)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--model-file", type=Path, default=None, help="default: EXPORT_DIR/model.onnx")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", choices=("onnxruntime", "genai"), default="onnxruntime",
                        help="genai: EXPORT_DIR is an onnxruntime-genai directory, run by genai's loop (cpu)")
    args = parser.parse_args(argv)
    from .errors import LestdError

    try:
        if args.runtime == "genai":
            result = measure_genai(args.export_dir, args.threads, args.batch, args.prompt_len, args.gen_len,
                                   args.warmup, args.seed)
        else:
            result = measure(args.export_dir, args.model_file or args.export_dir / "model.onnx", args.provider,
                             args.threads, args.batch, args.prompt_len, args.gen_len, args.warmup, args.seed)
    except LestdError as error:
        print(f"bench_worker: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
