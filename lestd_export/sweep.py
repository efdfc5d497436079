"""Quality sweep: perplexity versus achieved size fraction for LeSTD and the baselines (DESIGN.md 4).

The model is loaded once; every run compresses a fresh deep copy of the pristine model and scores
it on the same tokens as the dense model. Each method runs data-free and/or calibrated (SVD then
is SVD-LLM whitening; TensorLLM and LeSTD minimise the output error and refit), LeSTD and TensorLLM
optionally healed; with ``ort_baselines`` the dense model is also exported and scored through ONNX
Runtime in fp32, dynamic int8 and int4 (MatMulNBits), the quantisations users already pick.

Each finished run is cached as its own JSON file, keyed by a hash of the model (source and weight
fingerprint), the tokens (text source, max_tokens and a hash of the ids), the window length, the
run's settings and the source of the modules that compute it (:data:`CODE_MODULES`), so an
interrupted sweep resumes where it stopped, a wider sweep only computes the new rows, and rows
computed by older code are never reused.

Sizes: ``size_fraction`` counts the attention weights (see compress.py); ``model_bytes`` the whole
model, fp32 for PyTorch rows (every parameter once, tied embeddings once), file bytes for ONNX rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from .compress import compress_model
from .config import BUDGETS, DEFAULT_CALIBRATION_TOKENS, GRANULARITIES, METHODS, CompressionConfig, parse_choices
from .errors import InvalidConfigError
from .evaluate import DEFAULT_SEQ_LEN, check_lengths, load_text, ort_perplexity, torch_perplexity
from .io import check_output_files, write_json
from .text import tokenize, tokens_digest

CACHE_VERSION = 2  # 2: calibration / heal axes, model_bytes, ONNX Runtime rows
ROW_KEYS = ("method", "granularity", "budget", "calibration", "heal", "size_fraction", "requested_fraction",
            "model_bytes", "perplexity", "relative_weight_error", "seconds")
CALIBRATION_SOURCES = ("none", "default", "wikitext2", "self")  # or a text file path
MIN_CALIBRATION_TOKENS = 128
HEAL_CHOICES = {"no": False, "yes": True}
ORT_VARIANTS = ("fp32", "int8", "int4")
ORT_EXPORT_DIR = "onnx-dense-{key}"


# ------------------------------------------------------------------------------------ validation


def parse_fractions(value: str | Sequence[float]) -> list[float]:
    """``"0.9,0.8"`` or a sequence -> unique size fractions, each in (0, 1]."""
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if not items:
        raise InvalidConfigError("no size fractions given, e.g. --fractions 0.9,0.7,0.5")
    fractions = []
    for item in items:
        try:
            f = float(item)
        except (TypeError, ValueError):
            raise InvalidConfigError(f"size fractions must be numbers in (0, 1], got {item!r}") from None
        if not (math.isfinite(f) and 0 < f <= 1):
            raise InvalidConfigError(f"size fractions must lie in (0, 1], got {item!r}")
        fractions.append(f)
    return list(dict.fromkeys(fractions))


def parse_calibrations(value: str | Sequence[str]) -> list[str]:
    """``"none,default"`` or a sequence -> unique calibration sources (:data:`CALIBRATION_SOURCES` or
    existing text files)."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise InvalidConfigError(f"no calibration given; choose from {', '.join(CALIBRATION_SOURCES)} "
                                 "or text file paths, e.g. --calibration none,default")
    for item in items:
        if item not in CALIBRATION_SOURCES and not Path(item).expanduser().is_file():
            raise InvalidConfigError(f"unknown calibration {item!r}: choose from {', '.join(CALIBRATION_SOURCES)} "
                                     "or give an existing text file")
    return list(dict.fromkeys(items))


def parse_heal(value: str | Sequence[bool | str]) -> list[bool]:
    """``"no,yes"`` or a sequence of booleans / ``"no"``/``"yes"`` -> unique heal settings."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [v.strip() if isinstance(v, str) else v for v in items]
    items = [v for v in items if v != ""]
    if not items:
        raise InvalidConfigError("no heal setting given; choose from no, yes")
    parsed = []
    for item in items:
        if isinstance(item, bool):
            parsed.append(item)
        elif item in HEAL_CHOICES:
            parsed.append(HEAL_CHOICES[item])
        else:
            raise InvalidConfigError(f"unknown heal setting {item!r}; choose from no, yes")
    return list(dict.fromkeys(parsed))


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def run_settings(fractions, methods, granularities, budgets, calibrations=("none",), heal=(False,),
                 calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> list[dict]:
    """One entry per run: method x setting x calibration x heal x fraction. LeSTD runs over every
    granularity x budget, TensorLLM and SVD with their defaults. Healing needs calibration and updates
    only Tucker-compressed modules, so data-free and SVD runs are never healed (one unhealed run
    stands for the heal axis there). A calibrated run records its token count and, for a text file,
    a digest of the file (so an edited file is not served from the cache)."""
    runs = []
    for method in methods:
        if method == "lestd":
            settings = [(g, b) for g in granularities for b in budgets]
        else:
            settings = [(None, None)]
        for granularity, budget in settings:
            for calibration in calibrations:
                healable = calibration != "none" and method != "svd"
                for healed in dict.fromkeys(h and healable for h in heal):
                    for f in fractions:
                        run = {"method": method, "granularity": granularity, "budget": budget,
                               "calibration": calibration, "heal": healed, "requested_fraction": f}
                        if calibration != "none":
                            run["calibration_tokens"] = calibration_tokens
                        if calibration not in CALIBRATION_SOURCES:
                            run["calibration_sha256"] = _file_digest(calibration)
                        runs.append(run)
    return runs


def _config(run: dict) -> CompressionConfig:
    extra = {}
    if run["granularity"] is not None:
        extra["granularity"] = run["granularity"]
    if run["budget"] is not None:
        extra["budget"] = run["budget"]
    if run["calibration"] != "none":
        extra["calibration_tokens"] = run["calibration_tokens"]
    return CompressionConfig(method=run["method"], size_fraction=run["requested_fraction"],
                             calibration=run["calibration"], heal=run["heal"], **extra)


# ------------------------------------------------------------------------------------------- cache


def model_fingerprint(model) -> str:
    """A cheap hash of the weights: names, shapes, a prefix of the values and each tensor's sum."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if flat.is_floating_point():
                digest.update(flat[:256].to(torch.float64).numpy().tobytes())
                digest.update(repr(float(flat.to(torch.float64).sum())).encode())
            else:
                digest.update(flat[:256].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


# modules whose code decides a row's numbers: a change to any of them invalidates the cache
CODE_MODULES = ("calibration.py", "compress.py", "config.py", "evaluate.py", "healing.py", "modules.py", "refit.py",
                "registry.py", "surgery.py", "text.py", "numerics/lowrank.py", "numerics/metric.py",
                "numerics/planner.py", "numerics/pruning.py", "numerics/refit.py", "numerics/tucker.py")
# ... and those that decide the ONNX Runtime rows (with the versions of the packages that export and quantise)
ORT_CODE_MODULES = ("bench.py", "export.py", "runtime.py")
ORT_PACKAGES = ("onnx", "onnxruntime", "optimum-onnx", "torch", "transformers")


def code_fingerprint(modules: Sequence[str] = CODE_MODULES) -> str:
    """A hash of the source of ``modules``, so rows computed by older code are not reused."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in modules:
        file = root / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"") + b"\0")
    return digest.hexdigest()[:16]


def _export_fingerprint() -> str:
    """What decides the dense ONNX export and its quantised copies: code and package versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return code_fingerprint(ORT_CODE_MODULES) + ":" + ",".join(f"{p}={installed(p)}" for p in ORT_PACKAGES)


def _key(context: dict, run: dict) -> str:
    payload = json.dumps({"version": CACHE_VERSION, **context, **run}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    from .loading import cache_dir

    return cache_dir() / "sweep"


def _read_cached(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or damaged: recompute
    return data.get("row") if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------- sweep


def parameter_count(model) -> int:
    """Parameters of ``model``, each shared tensor (a tied embedding) counted once."""
    return sum(p.numel() for p in model.parameters())


def compressed_model_bytes(dense_parameters: int, report: dict) -> int:
    """fp32 bytes of the whole compressed model: the dense model with its attention weights replaced
    by what is stored (factors, core values, int32 indices at 4 bytes each)."""
    params = report["params"]
    return 4 * (dense_parameters - params["dense_attention"] + params["stored"])


def sweep(model_arg: str | None = None, fractions: Sequence[float] | str = (0.9, 0.8, 0.7, 0.6, 0.5),
          methods: Sequence[str] | str = METHODS, granularities: Sequence[str] | str = ("row",),
          budgets: Sequence[str] | str = ("layer",), max_tokens: int | None = 8192, seq_len: int = DEFAULT_SEQ_LEN,
          cache_dir: str | Path | None = None, progress: bool = True, text_file: str | Path | None = None,
          dataset: str | None = None, calibrations: Sequence[str] | str = ("none",),
          heal: Sequence[bool | str] | str = (False,), calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
          ort_baselines: bool = False) -> dict:
    """Perplexity of the dense model and of every (method, setting, calibration, heal, fraction) run
    on the same tokens (see :func:`run_settings`); with ``ort_baselines``, also of the dense model
    exported to ONNX and scored by ONNX Runtime in fp32, dynamic int8 and int4 (MatMulNBits).

    Returns ``{"model", "dense_perplexity", "dense_model_bytes", "tokens", "seq_len", "max_tokens",
    "text_source", "code_fingerprint", "rows"}``; each compression row has :data:`ROW_KEYS` (plus
    ``error`` when a run could not meet its request, ``calibration_seconds`` and ``healing`` where
    the run calibrated / healed); the ONNX Runtime rows come last, with method ``onnxruntime``, a
    ``variant`` among :data:`ORT_VARIANTS`, ``perplexity``, ``model_bytes`` (file bytes) and ``seconds``.
    """
    from tqdm.auto import tqdm

    from .loading import load_model

    fractions = parse_fractions(fractions)
    methods = parse_choices(methods, METHODS, "method(s)")
    granularities = parse_choices(granularities, GRANULARITIES, "granularity(ies)")
    budgets = parse_choices(budgets, BUDGETS, "budget scope(s)")
    calibrations = parse_calibrations(calibrations)
    heal = parse_heal(heal)
    if not (isinstance(calibration_tokens, int) and calibration_tokens >= MIN_CALIBRATION_TOKENS):
        raise InvalidConfigError(f"calibration tokens must be an integer >= {MIN_CALIBRATION_TOKENS}, "
                                 f"got {calibration_tokens!r}")
    runs = run_settings(fractions, methods, granularities, budgets, calibrations, heal, calibration_tokens)
    for run in runs:
        _config(run)  # validate every run before loading anything
    text, text_source = load_text(text_file, dataset)
    check_lengths(seq_len, max_tokens)

    loaded = load_model(model_arg)
    ids = tokenize(loaded.tokenizer, text, max_tokens)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    weights = model_fingerprint(loaded.model)
    context = {"model": loaded.source, "weights": weights, "text_source": text_source,
               "max_tokens": max_tokens, "tokens": tokens_digest(ids), "seq_len": seq_len,
               "code": code_fingerprint()}

    def cached_or_run(run: dict, compute) -> dict:
        path = cache / f"{_key(context, run)}.json"
        row = _read_cached(path)
        if row is None:
            row = compute()
            if not row.get("transient"):
                write_json(path, {"context": context, "run": run, "row": row})
        return row

    base = loaded.model
    dense_parameters = parameter_count(base)

    def dense() -> dict:
        started = time.perf_counter()
        result = torch_perplexity(base, ids, seq_len, progress=progress)
        return {"perplexity": result["perplexity"], "tokens": result["tokens"], "model_bytes": 4 * dense_parameters,
                "seconds": time.perf_counter() - started}

    dense_row = cached_or_run({"method": "dense"}, dense)

    def compressed(run: dict):
        def compute() -> dict:
            started = time.perf_counter()
            model = copy.deepcopy(base)
            row = {"method": run["method"], "granularity": run["granularity"], "budget": run["budget"],
                   "calibration": run["calibration"], "heal": run["heal"],
                   "requested_fraction": run["requested_fraction"]}
            failed = {**row, "size_fraction": None, "model_bytes": None, "perplexity": None,
                      "relative_weight_error": None}
            try:
                report = compress_model(model, _config(run), tokenizer=loaded.tokenizer, progress=False,
                                        source=loaded.source)
            except InvalidConfigError as error:  # e.g. a fraction too small for any rank: record (and cache)
                return {**failed, "seconds": time.perf_counter() - started, "error": str(error)}
            try:
                result = torch_perplexity(model, ids, seq_len, progress=progress)
            except Exception as error:  # a bug in a compressed module must not cost the whole sweep:
                # record it, do not cache it (a rerun after the fix recomputes the row), go on
                warnings.warn(f"sweep run {run} failed: {type(error).__name__}: {error}", stacklevel=1)
                return {**failed, "seconds": time.perf_counter() - started, "transient": True,
                        "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            del model
            row.update(size_fraction=report["size_fraction"]["with_indices"],
                       model_bytes=compressed_model_bytes(dense_parameters, report),
                       perplexity=result["perplexity"],
                       relative_weight_error=report["relative_weight_error"]["overall"])
            if "calibration" in report:
                row["calibration_seconds"] = report["calibration"]["seconds"]
            if "healing" in report:
                row["healing"] = report["healing"]
            return {**row, "seconds": time.perf_counter() - started}
        return compute

    rows = []
    with tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress) as bar:
        for run in runs:
            bar.set_postfix_str(f"{setting_name(run)} f={run['requested_fraction']:g}")
            rows.append(cached_or_run(run, compressed(run)))
            bar.update(1)
    if ort_baselines:
        rows += _ort_rows(loaded, weights, ids, seq_len, cache, cached_or_run, progress)
    return {"model": loaded.source, "dense_perplexity": dense_row["perplexity"],
            "dense_model_bytes": dense_row["model_bytes"], "tokens": dense_row["tokens"], "seq_len": seq_len,
            "max_tokens": max_tokens, "text_source": text_source, "code_fingerprint": context["code"], "rows": rows}


def _ort_rows(loaded, weights: str, ids: list[int], seq_len: int, cache: Path, cached_or_run, progress: bool) -> list:
    """The dense model through ONNX Runtime: fp32, dynamic int8 and int4, each a cached row.

    The export (``validate=False``: the fp32 row itself checks it end to end, on the sweep's windows
    against the torch dense row) and its quantised copies live in a cache directory keyed by the
    model's weights and what decides the export; it is built once, on the first missing row.
    """
    from .bench import quantize_int4, quantize_int8
    from .export import ONNX_FILE, export_model, model_files_bytes

    export_key = _key({"model": loaded.source, "weights": weights, "export": _export_fingerprint()},
                      {"method": "onnxruntime-export"})
    export_dir = cache / ORT_EXPORT_DIR.format(key=export_key)
    builders = {"fp32": None, "int8": quantize_int8, "int4": quantize_int4}

    def model_file(variant: str) -> Path:
        if not (export_dir / ONNX_FILE).is_file():  # the staging rename makes a present file a complete export
            export_model(loaded, export_dir, validate=False, overwrite=True)
        builder = builders[variant]
        return export_dir / ONNX_FILE if builder is None else builder(export_dir)[0]

    def scored(variant: str):
        def compute() -> dict:
            started = time.perf_counter()
            file = model_file(variant)
            result = ort_perplexity(export_dir, ids, seq_len, progress=progress, model_file=file)
            return {"method": "onnxruntime", "variant": variant, "granularity": None, "budget": None,
                    "calibration": None, "heal": None, "requested_fraction": None, "size_fraction": None,
                    "model_bytes": model_files_bytes(file), "perplexity": result["perplexity"],
                    "relative_weight_error": None, "seconds": time.perf_counter() - started}
        return compute

    return [cached_or_run({"method": "onnxruntime", "variant": v, "export": export_key}, scored(v))
            for v in ORT_VARIANTS]


# ----------------------------------------------------------------------------------------- outputs


def setting_name(row: dict) -> str:
    """A run's label: method, then its LeSTD setting, calibration and healing where they apply."""
    if row["method"] == "onnxruntime":
        return f"ONNX Runtime {row['variant']} (dense)"
    parts = []
    if row.get("granularity") is not None or row.get("budget") is not None:
        parts.append(f"{row['granularity']}, {row['budget']} budget")
    calibration = row.get("calibration") or "none"
    if calibration != "none":
        name = calibration if calibration in CALIBRATION_SOURCES else Path(calibration).name
        parts.append(f"calibrated: {name}" + (", healed" if row.get("heal") else ""))
    return row["method"] + (f" ({'; '.join(parts)})" if parts else "")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(value) -> float | None:
    return None if value is None else value / 2**20


def to_markdown(result: dict) -> str:
    """The sweep as a markdown table (one line per run, ONNX Runtime rows last), dense baseline on top."""
    dense = result["dense_perplexity"]
    lines = [
        f"Perplexity sweep: model `{result['model']}`, text {result['text_source']}, "
        f"{result['tokens']} predicted tokens, windows of {result['seq_len']} tokens.",
        "",
        f"Dense perplexity: **{dense:.3f}** (size fraction 1.0, {_fmt(_mb(result.get('dense_model_bytes')), '.1f')} "
        "MB in fp32). Model MB: the whole model, fp32 for PyTorch rows, the ONNX file(s) for ONNX Runtime rows.",
        "",
        "| method | granularity | budget | calibration | heal | requested | size fraction (with indices) | model MB "
        "| perplexity | x dense | rel. weight error | seconds |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ppl = row.get("perplexity")
        ratio = None if ppl is None else ppl / dense
        note = f" ({row['error']})" if row.get("error") else ""
        method = f"{row['method']} {row['variant']}" if row.get("variant") else row["method"]
        heal = None if row.get("heal") is None else ("yes" if row["heal"] else "no")
        lines.append(
            f"| {method} | {row.get('granularity') or '-'} | {row.get('budget') or '-'} "
            f"| {row.get('calibration') or '-'} | {heal or '-'} "
            f"| {_fmt(row.get('requested_fraction'), '.2f')} | {_fmt(row.get('size_fraction'), '.4f')} "
            f"| {_fmt(_mb(row.get('model_bytes')), '.1f')} "
            f"| {_fmt(ppl, '.3f')}{note} | {_fmt(ratio, '.3f')} | {_fmt(row.get('relative_weight_error'), '.4f')} "
            f"| {_fmt(row.get('seconds'), '.1f')} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


ORT_MARKERS = {"fp32": "X", "int8": "P", "int4": "*"}


def plot_pareto(result: dict, path: str | Path) -> None:
    """Two panels, one line per method/setting/calibration/heal, dense as a horizontal line.

    Left: perplexity versus the achieved size fraction of the attention weights. Right: perplexity
    versus whole-model MB, with the dense model's ONNX Runtime fp32, int8 and int4 as single points.
    Data-free runs are dotted, calibrated ones solid; a panel turns log-scale beyond a 10x spread.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_fraction: dict[str, list[tuple[float, float]]] = {}
    by_bytes: dict[str, list[tuple[float, float]]] = {}
    ort: dict[str, tuple[float, float]] = {}
    calibrated: dict[str, bool] = {}
    for row in result["rows"]:
        if row.get("perplexity") is None:
            continue
        name = setting_name(row)
        if row["method"] == "onnxruntime":
            ort[row["variant"]] = (_mb(row["model_bytes"]), row["perplexity"])
            continue
        calibrated[name] = (row.get("calibration") or "none") != "none"
        if row.get("size_fraction") is not None:
            by_fraction.setdefault(name, []).append((row["size_fraction"], row["perplexity"]))
        if row.get("model_bytes") is not None:
            by_bytes.setdefault(name, []).append((_mb(row["model_bytes"]), row["perplexity"]))
    dense = result["dense_perplexity"]
    names = list(dict.fromkeys([*by_fraction, *by_bytes]))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    markers = "osD^v<>ph8"
    style = {name: dict(color=colors[i % len(colors)], marker=markers[i % len(markers)],
                        linestyle="-" if calibrated[name] else ":", label=name) for i, name in enumerate(names)}

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6.2), dpi=110)
    for ax, series in ((left, by_fraction), (right, by_bytes)):
        for name, points in series.items():
            points.sort()
            ax.plot([x for x, _ in points], [y for _, y in points], markersize=5, **style[name])
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    if result.get("dense_model_bytes"):
        right.plot([_mb(result["dense_model_bytes"])], [dense], "o", color="black", markersize=6)
        right.annotate("dense", (_mb(result["dense_model_bytes"]), dense), textcoords="offset points",
                       xytext=(6, -12), fontsize=8)
    for variant, (x, y) in ort.items():
        right.scatter([x], [y], marker=ORT_MARKERS.get(variant, "X"), s=150, color="black", edgecolor="white",
                      zorder=5, label=f"ONNX Runtime {variant} (dense model)")
        right.annotate(variant, (x, y), textcoords="offset points", xytext=(8, 4), fontsize=8)
    for ax, series, extra in ((left, by_fraction, []), (right, by_bytes, [y for _, y in ort.values()])):
        values = [p for points in series.values() for _, p in points] + extra + [dense]
        if max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_xlabel("achieved size fraction of the attention weights (with int32 indices)")
    left.set_title("attention compression at a matched size", fontsize=10)
    right.set_xlabel("whole-model size, MB (PyTorch rows: fp32 parameters; ONNX Runtime: file bytes)")
    right.set_title("whole model: compression vs ONNX Runtime quantisation", fontsize=10)
    fig.suptitle(f"{result['model']}: perplexity vs size ({result['tokens']} tokens, seq {result['seq_len']})")
    handles = {}  # one legend for both panels: label -> first handle
    for ax in (left, right):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.028 * math.ceil(len(handles) / 3), 1, 1))
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_outputs(result: dict, json_path=None, markdown_path=None, plot_path=None) -> None:
    """Write whichever of the JSON, markdown and PNG outputs were asked for (each atomically)."""
    check_output_files(json_path, markdown_path, plot_path)
    if json_path is not None:
        write_json(Path(json_path), result)
    if markdown_path is not None:
        text = to_markdown(result)
        _atomic_write(Path(markdown_path), lambda tmp: tmp.write_text(text))
    if plot_path is not None:
        plot_pareto(result, plot_path)
