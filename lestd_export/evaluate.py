"""The ``evaluate`` verb: perplexity of a model (PyTorch) or of an ONNX export (ONNX Runtime).

Perplexity is measured over **non-overlapping windows** of ``seq_len`` tokens (DESIGN.md 4): each
window is scored on its own, predicting tokens ``1 .. L-1`` of the window from its prefix; the last
partial window counts when it has at least two tokens. ``tokens`` is the number of predicted tokens
and ``perplexity = exp(sum NLL / tokens)``. Both backends score exactly the same windows, so their
numbers are directly comparable (torch-dense, torch-compressed, ORT-dense, ORT-compressed).

Text sources: the default text ships with Python (the language reference in ``pydoc_data.topics``)
and works offline; ``wikitext2`` needs the ``datasets`` package and network; any UTF-8 text file.
Text is tokenised without special tokens (no BOS), so every window is plain text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import COMPRESSION_KEY
from .errors import CheckpointError, InvalidConfigError, LestdError
from .files import check_model_dir, read_json
from .text import tokenize, tokens_sha256

BACKENDS = ("torch", "onnxruntime")
DATASETS = ("default", "wikitext2")
DEFAULT_SEQ_LEN = 512
BATCH_WINDOWS = 4  # windows per forward pass
REPORT_FILE = "compression_report.json"  # written next to a compressed checkpoint (see compress.py)
EXPORT_REPORT_FILE = "export_report.json"  # the export's report; a genai export's holds the size fraction
ONNX_FILE = "model.onnx"
FIX_DIR = "re-create the directory (lestd-export export / compress)"
RESULT_KEYS = ("perplexity", "tokens", "seq_len", "backend", "text_source", "model", "size_fraction",
               "tokens_sha256")


class TextSourceError(LestdError):
    """The evaluation text cannot be read (missing or empty text file, too few tokens)."""


class DatasetUnavailableError(TextSourceError):
    """A named dataset cannot be loaded here (``datasets`` missing or no network)."""


# --------------------------------------------------------------------------------------------- text


def default_text() -> str:
    """The Python language reference shipped with Python (``pydoc_data.topics``), keys in sorted order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def _wikitext2() -> str:
    offline = ("WikiText-2 cannot be loaded here ({why}). Offline, evaluate on the text that ships with "
               "Python (--dataset default) or on any text file (--text-file F).")
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(offline.format(why="the 'datasets' package is not installed; "
                                                         "pip install datasets where the network allows")) from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as error:  # network, hub and cache failures come in many exception types
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise DatasetUnavailableError(offline.format(why=f"{type(error).__name__}: {first}")) from None
    return "\n\n".join(split["text"])


def load_text(text_file: str | Path | None = None, dataset: str | None = None) -> tuple[str, str]:
    """The evaluation text and a name for it: a text file, ``wikitext2`` or the default text."""
    if text_file is not None and dataset is not None:
        raise InvalidConfigError("give either a text file or a dataset, not both")
    if text_file is not None:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise TextSourceError(f"text file {path} does not exist (or is not a file): pass an existing UTF-8 "
                                  "text file, or leave --text-file out to use the default text")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise TextSourceError(f"text file {path} is not UTF-8 text (invalid byte at offset {error.start}): "
                                  "pass a plain text file") from None
        if "\x00" in text:
            raise TextSourceError(f"text file {path} holds NUL bytes: it is binary, not text; pass a plain text file")
        if not text.strip():
            raise TextSourceError(f"text file {path} is empty: pass a file with some text in it")
        return text, str(path)
    dataset = dataset or "default"
    if dataset == "default":
        return default_text(), "default (Python language reference, pydoc_data.topics)"
    if dataset == "wikitext2":
        return _wikitext2(), "wikitext2 (wikitext-2-raw-v1, test split)"
    raise InvalidConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)} or pass --text-file")


# ------------------------------------------------------------------------------------------ windows


def check_lengths(seq_len: int, max_tokens: int | None) -> None:
    """Typed error for a window shorter than 2 tokens or a token limit below 2."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InvalidConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise InvalidConfigError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")


def windows(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the non-overlapping windows; a last partial window needs >= 2 tokens."""
    return [(s, min(s + seq_len, num_tokens)) for s in range(0, num_tokens, seq_len)
            if min(s + seq_len, num_tokens) - s >= 2]


def _as_list(token_ids) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    ids = list(token_ids)
    if ids and isinstance(ids[0], list):
        raise InvalidConfigError("token_ids must be one sequence (1-D), not a batch")
    return [int(i) for i in ids]


def _batches(ids: list[int], seq_len: int, max_tokens: int | None) -> tuple[list[list[list[int]]], int]:
    """Equal-length batches of windows (up to ``BATCH_WINDOWS`` each) and the predicted-token count."""
    check_lengths(seq_len, max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    spans = windows(len(ids), seq_len)
    if not spans:
        raise TextSourceError(f"the text has {len(ids)} token(s): at least 2 are needed to measure perplexity")
    full = [ids[a:b] for a, b in spans if b - a == seq_len]
    partial = [ids[a:b] for a, b in spans if b - a != seq_len]
    batches = [full[i:i + BATCH_WINDOWS] for i in range(0, len(full), BATCH_WINDOWS)]
    batches += [[w] for w in partial]
    predicted = sum(b - a - 1 for a, b in spans)
    return batches, predicted


def _result(nll: float, tokens: int, seq_len: int, num_windows: int) -> dict:
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "tokens": tokens, "nll": nll, "mean_nll": mean,
            "windows": num_windows, "seq_len": seq_len}


def _window_nll(logits, targets) -> float:
    """Summed NLL of ``targets [B, L-1]`` under ``logits [B, L-1, V]`` (torch tensors), in float64."""
    import torch.nn.functional as F

    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return float(per_token.double().sum())


# -------------------------------------------------------------------------------------------- torch


def torch_perplexity(model, token_ids, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int | None = None,
                     progress: bool = True) -> dict:
    """Perplexity of a PyTorch causal LM over non-overlapping windows (see module doc).

    Returns ``{"perplexity", "tokens", "nll", "mean_nll", "windows", "seq_len"}``.
    """
    import torch
    from tqdm.auto import tqdm

    batches, predicted = _batches(_as_list(token_ids), seq_len, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, num_windows = 0.0, 0
    try:
        with torch.inference_mode(), tqdm(total=predicted, desc="perplexity (torch)", unit="tok",
                                          disable=not progress, leave=False) as bar:
            for batch in batches:
                ids = torch.tensor(batch, dtype=torch.long, device=device)
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                nll += _window_nll(logits[:, :-1], ids[:, 1:])
                num_windows += len(batch)
                bar.update(ids.shape[0] * (ids.shape[1] - 1))
    finally:
        model.train(was_training)
    return _result(nll, predicted, seq_len, num_windows)


# -------------------------------------------------------------------------------------- onnxruntime


def ort_perplexity(export_dir: str | Path, token_ids, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int | None = None,
                   progress: bool = True, threads: int | None = None, model_file: str | Path | None = None) -> dict:
    """Perplexity of an ONNX export (``DIR/model.onnx``, or ``model_file`` such as a quantised copy in
    it) or of an onnxruntime-genai directory (its decoder graph) through ONNX Runtime, same windows as torch."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .genai import is_genai_dir, open_genai_onnx
    from .runtime import OrtCausalLM, open_session

    batches, predicted = _batches(_as_list(token_ids), seq_len, max_tokens)
    session = None if model_file is None else open_session(Path(model_file), threads=threads)
    if is_genai_dir(Path(export_dir)):
        runner = open_genai_onnx(Path(export_dir), threads=threads, session=session)
    else:
        runner = OrtCausalLM(Path(export_dir), threads=threads, session=session)
    nll, num_windows = 0.0, 0
    with tqdm(total=predicted, desc="perplexity (onnxruntime)", unit="tok", disable=not progress,
              leave=False) as bar:
        for batch in batches:
            ids = np.asarray(batch, dtype=np.int64)
            logits = torch.from_numpy(np.ascontiguousarray(runner.step(ids, np.ones_like(ids)).logits))
            nll += _window_nll(logits[:, :-1], torch.from_numpy(ids[:, 1:]))
            num_windows += len(batch)
            bar.update(ids.shape[0] * (ids.shape[1] - 1))
    return _result(nll, predicted, seq_len, num_windows)


# ---------------------------------------------------------------------------------------- the verb


def _fraction_from(compression: dict | None) -> float | None:
    if not compression:
        return None
    fraction = compression.get("size_fraction")
    if isinstance(fraction, dict):
        fraction = fraction.get("with_indices")
    return None if fraction is None else float(fraction)


def size_fraction_of_dir(path: Path) -> float | None:
    """``with_indices`` from ``config.json``'s compression section, ``compression_report.json`` or (an
    onnxruntime-genai export, which has no config.json) ``export_report.json``."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        fraction = _fraction_from(read_json(config, FIX_DIR).get(COMPRESSION_KEY))
        if fraction is not None:
            return fraction
    for report in (path / REPORT_FILE, path / EXPORT_REPORT_FILE):
        if report.is_file():
            fraction = _fraction_from(read_json(report, FIX_DIR))
            if fraction is not None:
                return fraction
    return None


def size_fraction_of_model(model) -> float:
    """Achieved size fraction (with indices) of a loaded model: 1.0 for a dense one."""
    fraction = _fraction_from(getattr(model.config, COMPRESSION_KEY, None))
    return 1.0 if fraction is None else fraction


def zero_shot(model, tokenizer, tasks: Sequence[str], limit: int | None = None) -> dict:
    """Zero-shot metrics of a PyTorch model on lm-eval-harness ``tasks`` (``{task: {metric: value}}``),
    or ``{"skipped": reason}`` when lm-eval-harness is not installed. Its tasks download their data,
    so they need the network (or a populated Hugging Face datasets cache)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {"skipped": "lm-eval-harness is not installed (pip install lm-eval): --tasks was not run"}
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=list(tasks),
                                      num_fewshot=0, limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}


def evaluate(target: str | Path | None, backend: str | None = None, text_file: str | Path | None = None,
             dataset: str | None = None, seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int | None = None,
             progress: bool = True, tasks: Sequence[str] = ()) -> dict:
    """Perplexity of ``target`` on a text; returns exactly the fields in :data:`RESULT_KEYS`, plus
    ``tasks`` (see :func:`zero_shot`) when lm-eval-harness ``tasks`` are asked for (torch backend).

    ``torch``: ``target`` is any model argument of :func:`lestd_export.loading.load_model` (alias,
    Hugging Face dir, .gguf, compressed checkpoint; None = the default model). ``onnxruntime``:
    ``target`` is an export directory holding ``model.onnx``, ``config.json`` and tokenizer files, or an
    onnxruntime-genai directory (``genai_config.json``, its decoder graph, tokenizer files). ``backend``
    None: onnxruntime for an onnxruntime-genai directory, torch otherwise.
    """
    from .genai import check_genai_dir

    genai = target is not None and check_genai_dir(Path(target).expanduser())
    if backend is None:
        backend = "onnxruntime" if genai else "torch"
    if backend not in BACKENDS:
        raise InvalidConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if tasks and backend != "torch":
        raise InvalidConfigError("--tasks runs lm-eval-harness on the PyTorch model: use --backend torch")
    check_lengths(seq_len, max_tokens)
    text, source = load_text(text_file, dataset)  # fail on a bad text source before loading a model
    if backend == "torch":
        from .loading import load_model

        loaded = load_model(None if target is None else str(target))
        ids = tokenize(loaded.tokenizer, text, max_tokens)
        result = torch_perplexity(loaded.model, ids, seq_len, max_tokens, progress)
        model_name, fraction = loaded.source, size_fraction_of_model(loaded.model)
        if tasks:
            result["tasks"] = zero_shot(loaded.model, loaded.tokenizer, tasks)
    else:
        if target is None:
            raise InvalidConfigError("--backend onnxruntime needs an export directory as TARGET")
        export_dir = Path(target).expanduser()
        if not genai and not (export_dir / ONNX_FILE).is_file():
            raise CheckpointError(f"{export_dir} holds no {ONNX_FILE}: pass an export directory "
                                  "(lestd-export export ...), or use --backend torch for a model")
        from .hf import load_tokenizer

        check_model_dir(export_dir, FIX_DIR)
        ids = tokenize(load_tokenizer(export_dir), text, max_tokens)
        result = ort_perplexity(export_dir, ids, seq_len, max_tokens, progress)
        model_name = str(export_dir)
        fraction = size_fraction_of_dir(export_dir)
        fraction = 1.0 if fraction is None else fraction
    out = {"perplexity": result["perplexity"], "tokens": result["tokens"], "seq_len": seq_len,
           "backend": backend, "text_source": source, "model": model_name, "size_fraction": fraction,
           "tokens_sha256": tokens_sha256(ids if max_tokens is None else ids[:max_tokens])}
    return {**out, "tasks": result["tasks"]} if "tasks" in result else out
