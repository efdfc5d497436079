"""Speed / memory benchmark harness over exported model directories (DESIGN.md section 4).

Every (variant, repeat) runs in its own fresh process (:mod:`lestd_export.bench_worker`), repeats are
interleaved A/B/A/B across variants, every variant gets the same provider, threads and ORT_ENABLE_ALL.
Quantised variants are made with ONNX Runtime's own tools and cached beside the model:
``DIR/model.int8.onnx`` (``quantize_dynamic``) and ``DIR/model.int4.onnx`` (``MatMulNBitsQuantizer``,
block 32, symmetric, accuracy_level 4), each with a ``.json`` sidecar saying which nodes were quantised.
An onnxruntime-genai directory (``genai_config.json``) is a variant run by genai's own C++ generation loop
(CPU, unquantised by us: its builder makes the int4 model); ``genai_baselines`` adds the builder's fp32 and
int4 models of a given model. Every record also gets a short perplexity (the quality column): the same
tokens of the default evaluation text for every variant, through ONNX Runtime, and its ratio to the baseline.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CheckpointError, CorruptFileError, InvalidConfigError, LestdError
from .export import model_files_bytes
from .files import check_model_dir, check_onnx, read_json
from .genai import check_genai_dir, decoder_file, is_genai_dir

QUANT_MODES = ("none", "int8", "int4")
ONNX_FILE = "model.onnx"
FIX_DIR = "re-export the model (lestd-export export)"
QUALITY_TOKENS = 1024  # default-text tokens of the quality column (0: no quality column)


class BenchmarkError(LestdError):
    """A benchmark worker process failed."""


@dataclass
class Variant:
    name: str
    export_dir: Path
    model_file: Path
    quantization: str = "none"
    is_baseline: bool = False
    quantized_nodes: dict = field(default_factory=dict)
    runtime: str = "onnxruntime"  # or "genai": onnxruntime-genai's generation loop over a genai directory


# ----------------------------------------------------------------------------------------- variants

def check_export_dir(path: Path) -> Path:
    """``path`` when it is an export directory (``model.onnx``) or an onnxruntime-genai directory."""
    path = Path(path)
    if not check_genai_dir(path) and not (path / ONNX_FILE).is_file():
        raise CheckpointError(f"{path} has no {ONNX_FILE}: pass a directory produced by `lestd-export export` "
                              "or an onnxruntime-genai directory (genai_config.json)")
    return path


def model_file_of(path: Path) -> Path:
    """The ONNX file a variant directory runs: a genai directory's decoder file, else ``model.onnx``."""
    return decoder_file(path) if is_genai_dir(path) else Path(path) / ONNX_FILE


def _weight_matmuls(model) -> int:
    """MatMul nodes (still fp32) with a constant initializer operand."""
    names = {init.name for init in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and any(i in names for i in n.input))


def _op_counts(model) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _initializer_ranks(model) -> dict[str, int]:
    return {init.name: len(init.dims) for init in model.graph.initializer}


def quantize_int8(export_dir: Path, overwrite: bool = False) -> tuple[Path, dict]:
    """``DIR/model.int8.onnx`` by dynamic int8 quantisation of MatMul (and Gather) weights; cached.

    MatMul nodes whose constant weight is not 2-D (the compressed core's batched MatMul) are offered to
    the quantiser too; if the result does not load, they are excluded and left fp32. In practice
    (onnxruntime 1.32) quantize_dynamic leaves every MatMul whose weight is the *left* operand fp32 (the
    core blocks ``[n, R2, k] @ Z`` and ``U2 @ core_out``); ``weight_matmuls_left_fp32`` counts them.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = check_export_dir(export_dir) / ONNX_FILE
    out = src.with_name("model.int8.onnx")
    sidecar = out.with_suffix(".json")
    cached = _cached_quantization(out, sidecar, overwrite)
    if cached is not None:
        return out, cached
    model = onnx.load(str(src), load_external_data=False)
    ranks = _initializer_ranks(model)
    batched = [n.name for n in model.graph.node if n.op_type == "MatMul"
               and any(i in ranks and ranks[i] != 2 for i in n.input)]
    large = src.stat().st_size > 1.8 * 2**30
    tmp = out.with_name(".model.int8.tmp.onnx")
    excluded: list[str] = []
    for exclude in ([], batched) if batched else ([],):
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=large)
        try:
            import onnxruntime as ort

            ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            excluded = exclude
            break
        except Exception:  # noqa: BLE001 -- onnxruntime's own untyped errors: retry without the batched MatMuls
            if exclude:
                raise
    os.replace(tmp, out)
    quantized = onnx.load(str(out), load_external_data=False)
    info = {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
            "ops_after": _op_counts(quantized), "batched_matmul_nodes": len(batched),
            "excluded_nodes": excluded, "weight_matmuls_left_fp32": _weight_matmuls(quantized),
            "matmul_fp32_left": sum(1 for n in quantized.graph.node if n.op_type == "MatMul")}
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return out, info


def quantize_int4(export_dir: Path, overwrite: bool = False) -> tuple[Path, dict]:
    """``DIR/model.int4.onnx``: MatMulNBits (4 bit, block 32, symmetric, accuracy_level 4) on 2-D MatMul weights."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = check_export_dir(export_dir) / ONNX_FILE
    out = src.with_name("model.int4.onnx")
    sidecar = out.with_suffix(".json")
    cached = _cached_quantization(out, sidecar, overwrite)
    if cached is not None:
        return out, cached
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul",))
    quantizer.process()
    tmp = out.with_name(".model.int4.tmp.onnx")
    large = src.stat().st_size > 1.8 * 2**30
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=large)
    os.replace(tmp, out)
    quantized = onnx.load(str(out), load_external_data=False)
    info = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 4,
            "block_size": 32, "is_symmetric": True, "accuracy_level": 4, "ops_after": _op_counts(quantized),
            "weight_matmuls_left_fp32": _weight_matmuls(quantized),
            "matmul_fp32_left": sum(1 for n in quantized.graph.node if n.op_type == "MatMul")}
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return out, info


def _cached_quantization(out: Path, sidecar: Path, overwrite: bool) -> dict | None:
    """The sidecar of a quantised copy made earlier, or None to (re)make it (absent, damaged, or ``overwrite``)."""
    if overwrite or not out.is_file() or not sidecar.is_file():
        return None
    try:
        return read_json(sidecar)
    except CorruptFileError:
        return None  # an interrupted earlier run: quantise again


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def build_variants(dirs: list[Path], quantize: list[str], baseline: Path | None = None) -> list[Variant]:
    """Unquantised and quantised variants of each dir; the baseline is the unquantised ``baseline`` (or first dir).

    An onnxruntime-genai directory gives one variant, run by genai's loop (``quantize`` does not apply to it)."""
    dirs = [check_export_dir(d) for d in dirs]
    if baseline is not None:
        baseline = check_export_dir(baseline)
        if all(d.resolve() != baseline.resolve() for d in dirs):
            dirs = [baseline, *dirs]
    baseline = baseline or dirs[0]
    names: Counter = Counter()
    variants = []
    for d in dirs:
        is_base = d.resolve() == baseline.resolve()
        genai = is_genai_dir(d)
        modes = ["none"] if genai else quantize if not is_base or "none" in quantize else ["none", *quantize]
        for mode in modes:
            stem = d.name or str(d)
            name = stem if mode == "none" else f"{stem}+{mode}"
            names[name] += 1
            if names[name] > 1:
                name = f"{name}#{names[name]}"
            if genai:
                variants.append(Variant(name, d, decoder_file(d), "none", is_base, runtime="genai"))
            elif mode == "none":
                variants.append(Variant(name, d, d / ONNX_FILE, "none", is_base))
            else:
                path, info = QUANTIZERS[mode](d)
                variants.append(Variant(name, d, path, mode, False, info))
    return variants


# ----------------------------------------------------------------------------------------- running

def run_worker(variant: Variant, provider: str, threads: int | None, batch: int, prompt_len: int, gen_len: int,
               warmup: int, seed: int = 0, timeout: float | None = None) -> dict:
    """One measurement in a fresh ``python -m lestd_export.bench_worker`` process."""
    command = [sys.executable, "-m", "lestd_export.bench_worker", str(variant.export_dir),
               "--model-file", str(variant.model_file), "--provider", provider, "--batch", str(batch),
               "--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--warmup", str(warmup),
               "--seed", str(seed), "--runtime", variant.runtime]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchmarkError(f"benchmark worker for {variant.name} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(variant: Variant, runs: list[dict], size_fraction: float | None, quality: dict | None = None) -> dict:
    latencies = [t for run in runs for t in run["latencies_ms"]]
    first = runs[0]
    return {
        "variant": variant.name, "path": str(variant.model_file), "export_dir": str(variant.export_dir),
        "runtime": "onnxruntime-genai" if variant.runtime == "genai" else "onnxruntime",
        "quantization": variant.quantization, "is_baseline": variant.is_baseline,
        "provider": first["provider"], "threads": first["threads"], "batch": first["batch"],
        "prompt_len": first["prompt_len"], "gen_len": first["gen_len"], "repeats": len(runs),
        "prefill_tokens_per_s": _stats([r["prefill_tokens_per_s"] for r in runs]),
        "decode_tokens_per_s": _stats([r["decode_tokens_per_s"] for r in runs]) if first["gen_len"] else None,
        "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs] if first["gen_len"] else None,
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90))}
        if latencies else None,
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in runs),
        "model_bytes": model_files_bytes(variant.model_file),
        "size_fraction": size_fraction,
        "finite_logits": all(r["finite_logits"] for r in runs),
        "pids": [r["pid"] for r in runs],
        "quantized_nodes": variant.quantized_nodes or None,
        "quality": quality,
    }


def within_repeat_ratios(record: dict, base: dict) -> list[float] | None:
    """Per repeat, ``record``'s decode rate over ``base``'s in the same repeat (None without per-run rates)."""
    runs, base_runs = record.get("decode_tokens_per_s_runs"), base.get("decode_tokens_per_s_runs")
    if not runs or not base_runs or len(runs) != len(base_runs):
        return None
    return [r / b for r, b in zip(runs, base_runs)]


def compute_ratios(records: list[dict]) -> dict:
    """Per variant, vs the record with ``is_baseline``: speedups, bytes ratio, bytes-bound fraction.

    ``decode_speedup_paired`` = the median over repeats of the variant's decode rate over the baseline's in
    the same repeat (robust to drift between repeats on a noisy machine; None without per-run rates);
    ``bytes_ratio`` = baseline bytes / variant bytes (what a purely memory-bound decode would gain);
    ``bytes_bound_fraction`` = decode_speedup / bytes_ratio (1.0: the size saving fully turned into speed);
    ``perplexity_ratio`` = variant perplexity / baseline perplexity (None without the quality column).
    """
    base = next((r for r in records if r["is_baseline"]), None)
    if base is None:
        raise InvalidConfigError("no baseline record to compare against")
    ratios = {}
    for record in records:
        decode = (record["decode_tokens_per_s"]["median"] / base["decode_tokens_per_s"]["median"]
                  if record.get("decode_tokens_per_s") and base.get("decode_tokens_per_s") else None)
        prefill = record["prefill_tokens_per_s"]["median"] / base["prefill_tokens_per_s"]["median"]
        within = within_repeat_ratios(record, base)
        paired = statistics.median(within) if within else None
        bytes_ratio = base["model_bytes"] / record["model_bytes"]
        quality, base_quality = record.get("quality"), base.get("quality")
        ratios[record["variant"]] = {
            "decode_speedup": decode, "decode_speedup_paired": paired, "prefill_speedup": prefill,
            "bytes_ratio": bytes_ratio,
            "bytes_bound_fraction": decode / bytes_ratio if decode is not None else None,
            "perplexity_ratio": quality["perplexity"] / base_quality["perplexity"] if quality and base_quality
            else None}
    return ratios


def _context_length(directory: Path) -> int | None:
    """The longest sequence a variant's model was built for (genai ``context_length`` or config.json)."""
    if is_genai_dir(directory):
        return read_json(directory / "genai_config.json").get("model", {}).get("context_length")
    config = directory / "config.json"
    return read_json(config, FIX_DIR).get("max_position_embeddings") if config.is_file() else None


def measure_quality(variants: list[Variant], tokens: int = QUALITY_TOKENS, threads: int | None = None,
                    progress: bool = True) -> tuple[dict[str, dict], dict]:
    """Perplexity of every variant on the same ``tokens`` tokens of the default evaluation text (tokenised by
    the first variant directory with tokenizer files), through ONNX Runtime on ``eval``'s windows (512 tokens,
    or the shortest context a variant was built for). Returns ``({variant: {"perplexity", "tokens"}}, info)``;
    ``info`` says what was scored (``tokens_sha256``), or ``{"skipped": why}`` with no results."""
    from tqdm.auto import tqdm

    from .evaluate import DEFAULT_SEQ_LEN, default_text, ort_perplexity
    from .hf import load_tokenizer
    from .text import tokenize, tokens_sha256

    source = next((v.export_dir for v in variants if load_tokenizer(v.export_dir) is not None), None)
    if source is None:
        return {}, {"skipped": "no variant directory holds tokenizer files"}
    ids = tokenize(load_tokenizer(source), default_text(), tokens)
    contexts = [c for c in (_context_length(v.export_dir) for v in variants) if isinstance(c, int)]
    seq_len = min([DEFAULT_SEQ_LEN, len(ids), *contexts])
    results = {}
    for variant in tqdm(variants, desc="quality", unit="variant", file=sys.stderr, disable=not progress):
        scored = ort_perplexity(variant.export_dir, ids, seq_len, progress=False, threads=threads,
                                model_file=variant.model_file)
        results[variant.name] = {"perplexity": scored["perplexity"], "tokens": scored["tokens"]}
    info = {"text_source": "default (Python language reference, pydoc_data.topics)", "tokenizer": str(source),
            "text_tokens": len(ids), "seq_len": seq_len, "tokens_sha256": tokens_sha256(ids)}
    return results, info


def _size_fraction(export_dir: Path) -> float | None:
    report = export_dir / "export_report.json"
    if not report.is_file():
        return None
    fraction = read_json(report, FIX_DIR).get("size_fraction")
    return fraction.get("with_indices") if isinstance(fraction, dict) else fraction


def machine_info(provider: str, threads: int | None) -> dict:
    import onnxruntime as ort

    from .genai import genai_version

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 -- torch is optional for the runtime
        torch_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "torch": torch_version,
            "onnxruntime_genai": genai_version(), "python": platform.python_version(), "provider": provider,
            "threads": threads}


def check_provider(provider: str, model_file: Path, threads: int | None) -> None:
    """Fail fast (before any quantisation or worker) through runtime.open_session's own provider check."""
    import onnxruntime as ort

    from .runtime import PROVIDERS, open_session

    if provider not in PROVIDERS or PROVIDERS[provider] not in ort.get_available_providers():
        open_session(model_file, provider, threads)  # raises the typed InvalidConfigError


def run_benchmark(dirs: list[Path], baseline: Path | None = None, provider: str = "cpu", threads: int | None = None,
                  batch: int = 1, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3, warmup: int = 1,
                  quantize: list[str] | None = None, progress: bool = True, genai_baselines: str | None = None,
                  quality_tokens: int = QUALITY_TOKENS) -> dict:
    """Time every variant of ``dirs`` (see module doc) and score its quality; ``genai_baselines``: a model
    argument whose onnxruntime-genai fp32 and int4 builds are added as variants (built once, cached)."""
    if not dirs and not genai_baselines:
        raise InvalidConfigError("give at least one export directory (or --genai-baselines MODEL)")
    for name, value, low in (("batch", batch, 1), ("prompt-len", prompt_len, 1), ("gen-len", gen_len, 0),
                             ("repeats", repeats, 1), ("warmup", warmup, 0), ("quality-tokens", quality_tokens, 0)):
        if value < low:
            raise InvalidConfigError(f"--{name} must be >= {low} (got {value})")
    if quality_tokens == 1:
        raise InvalidConfigError("--quality-tokens must be 0 (no quality column) or >= 2 (got 1)")
    dirs = [Path(d) for d in dirs]
    for d in [*dirs, *([baseline] if baseline else [])]:
        check_export_dir(d)
        check_model_dir(d, FIX_DIR)
        check_onnx(model_file_of(Path(d)), FIX_DIR)
    if genai_baselines is not None:
        if provider != "cpu":
            raise InvalidConfigError("--genai-baselines builds onnxruntime-genai models for the CPU: "
                                     "use --provider cpu")
        from .genai import genai_baselines as build_genai_baselines

        dirs += build_genai_baselines(genai_baselines, progress=progress)
    first = Path(baseline or dirs[0])
    if provider != "cpu" and any(is_genai_dir(d) for d in [*dirs, first]):
        raise InvalidConfigError("onnxruntime-genai directories run on the CPU here (built with -e cpu): "
                                 "use --provider cpu")
    check_provider(provider, model_file_of(first), threads)
    variants = build_variants(dirs, quantize or ["none"], Path(baseline) if baseline else None)
    quality, quality_info = (measure_quality(variants, quality_tokens, threads, progress) if quality_tokens
                             else ({}, {"skipped": "--quality-tokens 0"}))

    from tqdm.auto import tqdm

    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    with tqdm(total=repeats * len(variants), desc="bench", unit="run", file=sys.stderr, disable=not progress) as bar:
        for repeat in range(repeats):  # interleaved, in a fresh order each repeat: drift hits every variant alike
            for variant in random.Random(repeat).sample(variants, len(variants)):
                bar.set_postfix_str(f"{variant.name} r{repeat + 1}")
                runs[variant.name].append(run_worker(variant, provider, threads, batch, prompt_len, gen_len,
                                                     warmup, seed=repeat))
                bar.update()
    records = [summarise(v, runs[v.name], _size_fraction(v.export_dir), quality.get(v.name)) for v in variants]
    return {"machine": machine_info(provider, threads), "quality": quality_info, "records": records,
            "ratios": compute_ratios(records)}


# ----------------------------------------------------------------------------------------- reporting

def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(result: dict) -> str:
    machine = result["machine"]
    first = result["records"][0]
    genai = any(r.get("runtime") == "onnxruntime-genai" for r in result["records"])
    lines = [f"Machine: {machine['cpu']} ({machine['cores']} cores), onnxruntime {machine['onnxruntime']}"
             f"{', onnxruntime-genai ' + str(machine.get('onnxruntime_genai')) if genai else ''}, "
             f"provider {machine['provider']}, threads {machine['threads']}; batch {first['batch']}, "
             f"prompt {first['prompt_len']}, gen {first['gen_len']}, {first['repeats']} repeats (medians, "
             "one fresh process per run, interleaved in a fresh order each repeat; paired x = median over repeats "
             "of the ratio within a repeat)."]
    quality = result.get("quality") or {}
    if "tokens_sha256" in quality:
        lines.append(f"Quality: perplexity through ONNX Runtime on the same {quality['text_tokens']} tokens of the "
                     f"default text for every variant ({quality['seq_len']}-token windows, tokens sha256 "
                     f"{quality['tokens_sha256'][:12]}); ppl x = perplexity / the baseline's.")
    lines += ["", "| variant | runtime | size fraction | MB on disk | prefill tok/s | decode tok/s | p50 ms | p90 ms "
                  "| TTFT ms | peak RSS MB | decode x | paired x | prefill x | bytes x | bytes-bound | ppl | ppl x |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["records"]:
        q = result["ratios"][r["variant"]]
        lat = r["latency_ms"] or {}
        decode = r["decode_tokens_per_s"] or {}
        ppl = (r.get("quality") or {}).get("perplexity")
        lines.append(
            f"| {r['variant']}{' (baseline)' if r['is_baseline'] else ''} "
            f"| {'genai' if r.get('runtime') == 'onnxruntime-genai' else 'ort'} | {_fmt(r['size_fraction'], '.3f')} "
            f"| {r['model_bytes'] / 2**20:.1f} | {r['prefill_tokens_per_s']['median']:.0f} "
            f"| {_fmt(decode.get('median'))} | {_fmt(lat.get('p50'), '.2f')} | {_fmt(lat.get('p90'), '.2f')} "
            f"| {r['ttft_ms']:.1f} | {r['peak_rss_mb']:.0f} | {_fmt(q['decode_speedup'], '.2f')} "
            f"| {_fmt(q.get('decode_speedup_paired'), '.2f')} | {q['prefill_speedup']:.2f} | {q['bytes_ratio']:.2f} "
            f"| {_fmt(q['bytes_bound_fraction'], '.2f')} "
            f"| {_fmt(ppl, '.3f')} | {_fmt(q.get('perplexity_ratio'), '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    names = [r["variant"] for r in records]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(6 + 1.6 * len(names), 4.8))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        med = [(r[key] or {}).get("median", 0) for r in records]
        lo = [m - (r[key] or {}).get("min", m) for m, r in zip(med, records)]
        hi = [(r[key] or {}).get("max", m) - m for m, r in zip(med, records)]
        ax.bar(x, med, yerr=[lo, hi], capsize=3,
               color=["tab:gray" if r["is_baseline"] else "tab:blue" for r in records])
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{title} (median, min-max)")
    ax = axes[2]
    for r in records:
        mb = r["model_bytes"] / 2**20
        speed = (r["decode_tokens_per_s"] or {}).get("median", 0)
        ax.scatter(mb, speed, color="tab:gray" if r["is_baseline"] else "tab:blue")
        ax.annotate(r["variant"], (mb, speed), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("model MB on disk")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode speed vs model bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
