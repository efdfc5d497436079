"""Quality sweep: perplexity versus achieved size fraction for LeSTD and the baselines (DESIGN.md 4).

The model is loaded once; every run compresses a fresh deep copy of the pristine model and scores
it on the same tokens as the dense model. Each finished run is cached as its own JSON file, keyed by
a hash of the model (source and weight fingerprint), the tokens (text source, max_tokens and a hash
of the ids), the window length, the run's settings and the source of the modules that compute it
(:data:`CODE_MODULES`), so an interrupted sweep resumes where it stopped, a wider sweep only computes
the new rows, and rows computed by older code are never reused.
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
from .config import BUDGETS, GRANULARITIES, METHODS, CompressionConfig, parse_choices
from .errors import InvalidConfigError
from .evaluate import DEFAULT_SEQ_LEN, check_lengths, load_text, tokenize, tokens_digest, torch_perplexity
from .io import check_output_files, write_json

CACHE_VERSION = 1
ROW_KEYS = ("method", "granularity", "budget", "size_fraction", "requested_fraction", "perplexity",
            "relative_weight_error", "seconds")


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


def run_settings(fractions, methods, granularities, budgets) -> list[dict]:
    """One entry per run: LeSTD over every granularity x budget; TensorLLM and SVD with their defaults."""
    runs = []
    for method in methods:
        if method == "lestd":
            settings = [(g, b) for g in granularities for b in budgets]
        else:
            settings = [(None, None)]
        for granularity, budget in settings:
            for f in fractions:
                runs.append({"method": method, "granularity": granularity, "budget": budget,
                             "requested_fraction": f})
    return runs


def _config(run: dict) -> CompressionConfig:
    extra = {}
    if run["granularity"] is not None:
        extra["granularity"] = run["granularity"]
    if run["budget"] is not None:
        extra["budget"] = run["budget"]
    return CompressionConfig(method=run["method"], size_fraction=run["requested_fraction"], **extra)


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
CODE_MODULES = ("compress.py", "config.py", "evaluate.py", "modules.py", "registry.py", "surgery.py",
                "numerics/lowrank.py", "numerics/planner.py", "numerics/pruning.py", "numerics/tucker.py")


def code_fingerprint() -> str:
    """A hash of the source of :data:`CODE_MODULES`, so rows computed by older code are not reused."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        file = root / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"") + b"\0")
    return digest.hexdigest()[:16]


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


def sweep(model_arg: str | None = None, fractions: Sequence[float] | str = (0.9, 0.8, 0.7, 0.6, 0.5),
          methods: Sequence[str] | str = METHODS, granularities: Sequence[str] | str = ("row",),
          budgets: Sequence[str] | str = ("layer",), max_tokens: int | None = 8192, seq_len: int = DEFAULT_SEQ_LEN,
          cache_dir: str | Path | None = None, progress: bool = True, text_file: str | Path | None = None,
          dataset: str | None = None) -> dict:
    """Perplexity of the dense model and of every (method, setting, fraction) run on the same tokens.

    Returns ``{"model", "dense_perplexity", "tokens", "seq_len", "max_tokens", "text_source",
    "code_fingerprint", "rows"}``;
    each row has :data:`ROW_KEYS` (plus ``error`` when a run could not meet its request).
    """
    from tqdm.auto import tqdm

    from .loading import load_model

    fractions = parse_fractions(fractions)
    methods = parse_choices(methods, METHODS, "method(s)")
    granularities = parse_choices(granularities, GRANULARITIES, "granularity(ies)")
    budgets = parse_choices(budgets, BUDGETS, "budget scope(s)")
    runs = run_settings(fractions, methods, granularities, budgets)
    for run in runs:
        _config(run)  # validate every run before loading anything
    text, text_source = load_text(text_file, dataset)
    check_lengths(seq_len, max_tokens)

    loaded = load_model(model_arg)
    ids = tokenize(loaded.tokenizer, text, max_tokens)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    context = {"model": loaded.source, "weights": model_fingerprint(loaded.model), "text_source": text_source,
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

    def dense() -> dict:
        started = time.perf_counter()
        result = torch_perplexity(loaded.model, ids, seq_len, progress=progress)
        return {"perplexity": result["perplexity"], "tokens": result["tokens"],
                "seconds": time.perf_counter() - started}

    base = loaded.model
    dense_row = cached_or_run({"method": "dense"}, dense)

    def compressed(run: dict):
        def compute() -> dict:
            started = time.perf_counter()
            model = copy.deepcopy(base)
            row = {"method": run["method"], "granularity": run["granularity"], "budget": run["budget"],
                   "requested_fraction": run["requested_fraction"]}
            failed = {**row, "size_fraction": None, "perplexity": None, "relative_weight_error": None}
            try:
                report = compress_model(model, _config(run), progress=False, source=loaded.source)
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
            return {**row, "size_fraction": report["size_fraction"]["with_indices"],
                    "perplexity": result["perplexity"],
                    "relative_weight_error": report["relative_weight_error"]["overall"],
                    "seconds": time.perf_counter() - started}
        return compute

    rows = []
    with tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress) as bar:
        for run in runs:
            name = run["method"] if run["granularity"] is None else f"lestd/{run['granularity']}/{run['budget']}"
            bar.set_postfix_str(f"{name} f={run['requested_fraction']:g}")
            rows.append(cached_or_run(run, compressed(run)))
            bar.update(1)
    return {"model": loaded.source, "dense_perplexity": dense_row["perplexity"], "tokens": dense_row["tokens"],
            "seq_len": seq_len, "max_tokens": max_tokens, "text_source": text_source,
            "code_fingerprint": context["code"], "rows": rows}


# ----------------------------------------------------------------------------------------- outputs


def setting_name(row: dict) -> str:
    if row.get("granularity") is None and row.get("budget") is None:
        return row["method"]
    return f"{row['method']} ({row['granularity']}, {row['budget']} budget)"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(result: dict) -> str:
    """The sweep as a markdown table (one line per run), with the dense baseline on top."""
    dense = result["dense_perplexity"]
    lines = [
        f"Perplexity sweep: model `{result['model']}`, text {result['text_source']}, "
        f"{result['tokens']} predicted tokens, windows of {result['seq_len']} tokens.",
        "",
        f"Dense perplexity: **{dense:.3f}** (size fraction 1.0).",
        "",
        "| method | granularity | budget | requested | size fraction (with indices) | perplexity | x dense "
        "| rel. weight error | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ppl = row.get("perplexity")
        ratio = None if ppl is None else ppl / dense
        note = f" ({row['error']})" if row.get("error") else ""
        lines.append(
            f"| {row['method']} | {row.get('granularity') or '-'} | {row.get('budget') or '-'} "
            f"| {row['requested_fraction']:.2f} | {_fmt(row.get('size_fraction'), '.4f')} "
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


def plot_pareto(result: dict, path: str | Path) -> None:
    """Perplexity versus achieved size fraction, one line per method/setting, dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        if row.get("perplexity") is not None and row.get("size_fraction") is not None:
            series.setdefault(setting_name(row), []).append((row["size_fraction"], row["perplexity"]))
    dense = result["dense_perplexity"]
    values = [p for points in series.values() for _, p in points] + [dense]

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    markers = "osD^v<>ph*"
    for i, (name, points) in enumerate(series.items()):
        points.sort()
        ax.plot([x for x, _ in points], [y for _, y in points], marker=markers[i % len(markers)], label=name)
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    if max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("achieved size fraction of the attention weights (with int32 indices)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{result['model']}: perplexity vs size ({result['tokens']} tokens, seq {result['seq_len']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
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
