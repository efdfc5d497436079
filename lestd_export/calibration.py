"""Calibration data and the activation statistics that data-aware LeSTD needs (DESIGN.md 2.5).

Sources (``--calibration``): ``default`` (offline: the docstrings of a fixed list of standard-library
modules, English technical prose that shares no window with the default evaluation text, the
language reference in ``pydoc_data.topics``; for a model without a tokenizer, its own samples), a UTF-8 text file, ``wikitext2`` (train split, where
``datasets`` and the network are available), ``self`` (sequences sampled from the model itself), or
``none`` (the papers' data-free method).

Statistics are accumulated in float64 with bounded memory (no activation dump): per layer the Gram
matrix of the attention input ``X^T X / N`` ``[d, d]``, of the heads entering the output projection
``H^T H / N`` ``[h d_h, h d_h]``, and the mean squared gradient of the loss with respect to each
projection's output (the measured sensitivity of the q, k, v and o groups). The layer-by-layer refit
replays single decoder layers on cached hidden states (:class:`LayerReplay`).
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DEFAULT_CALIBRATION_TOKENS as DEFAULT_TOKENS
from .errors import LestdError
from .text import tokenize, tokens_sha256

SOURCES = ("default", "wikitext2", "self", "none")
MIN_TOKENS = 128  # fewer tokens than this cannot estimate a d x d Gram matrix usefully
SEQ_LEN = 512  # calibration sequence length (the evaluation windows' length)
BATCH_SEQUENCES = 4  # sequences per forward pass
GROUPS = ("q", "k", "v", "o")

# the default calibration text: docstrings of these standard-library modules and their public members,
# in this order (never the language reference, which is the default evaluation text)
DEFAULT_MODULES = (
    "heapq", "argparse", "doctest", "decimal", "difflib", "textwrap", "logging", "unittest", "pickle",
    "dataclasses", "typing", "email.message", "json", "csv", "collections", "functools", "itertools",
    "contextlib", "shutil", "subprocess", "threading", "http.client", "urllib.parse", "zipfile", "tarfile",
    "string", "random", "statistics", "fractions", "datetime", "calendar", "pathlib", "tempfile", "inspect",
    "enum", "copy", "pprint", "queue", "sched", "socket", "optparse", "configparser", "gettext", "codecs",
)


class CalibrationError(LestdError):
    """The calibration source cannot be used (missing, empty, too short, not text, unavailable)."""


@dataclass
class CalibrationData:
    """Calibration token sequences ``[n, T]`` and where they came from."""

    sequences: np.ndarray  # [n, T] int64
    source: str
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.sequences.size)

    @property
    def sha256(self) -> str:
        """Digest of the token ids (comma-separated decimal), as ``eval --json`` records its tokens."""
        return tokens_sha256(self.sequences.ravel().tolist())

    def batches(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.sequences), BATCH_SEQUENCES):
            yield self.sequences[start:start + BATCH_SEQUENCES]

    def record(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "tokens_sha256": self.sha256,
                "sequences": int(len(self.sequences)), "seq_len": int(self.sequences.shape[1]),
                "seconds": round(self.seconds, 2)}


def default_text() -> str:
    """Docstrings of :data:`DEFAULT_MODULES` and their public members (deterministic order)."""
    parts = []
    for name in DEFAULT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member_name, member in sorted(vars(module).items()):
            if not member_name.startswith("_") and getattr(member, "__module__", None) == module.__name__:
                parts.append(inspect.getdoc(member) or "")
    return "\n\n".join(p for p in parts if len(p) >= 200)


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's contents, or a :class:`CalibrationError` saying what is wrong with it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist: pass an existing UTF-8 text file, "
                               f"or one of {', '.join(SOURCES)}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text: pass a plain text file")
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty: pass a file with text in it")
    return text


def _wikitext2_train() -> str:
    offline = ("WikiText-2 cannot be loaded here ({why}). Offline, calibrate on --calibration default "
               "(text that ships with Python), self (samples of the model) or a text file path.")
    try:
        import datasets
    except ImportError:
        raise CalibrationError(offline.format(why="the 'datasets' package is not installed")) from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception as error:  # network, hub and cache failures come in many exception types
        raise CalibrationError(offline.format(why=type(error).__name__)) from None
    return "\n\n".join(split["text"])


def _sample_from_model(model, tokenizer, tokens: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``[n, seq_len]`` sequences sampled from the model (temperature 1), each started by its BOS token."""
    import torch

    n = max(1, -(-tokens // seq_len))
    start = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else 0
    from transformers.utils import logging as hf_logging

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "right-padding detected" notice misreads a BOS start as padding
    try:
        with torch.no_grad():
            ids = torch.full((n, 1), start, dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len,
                                 pad_token_id=start)
    finally:
        torch.random.set_rng_state(generator_state)
        hf_logging.set_verbosity(verbosity)
    return out[:, 1:seq_len + 1].numpy().astype(np.int64)


def load_calibration(source: str, model, tokenizer, tokens: int = DEFAULT_TOKENS,
                     seq_len: int = SEQ_LEN) -> CalibrationData | None:
    """Calibration sequences from ``source`` (see module doc); ``None`` for ``none``."""
    if tokens < MIN_TOKENS:
        raise CalibrationError(f"--calibration-tokens {tokens} is too few: use at least {MIN_TOKENS}")
    if source == "none":
        return None
    started = time.perf_counter()
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(seq_len, tokens, positions or seq_len)
    if source == "default" and tokenizer is None:  # nothing to tokenise text with: the model's own samples
        source = "self"
    if source == "self":
        seq_len = min(seq_len, positions - 1) if positions else seq_len  # sampling adds a start token
        sequences = _sample_from_model(model, tokenizer, tokens, seq_len)
        return CalibrationData(sequences[:, :seq_len], "self (sampled from the model)", time.perf_counter() - started)
    if source == "default":
        text, name = default_text(), "default (Python standard-library docstrings)"
    elif source == "wikitext2":
        text, name = _wikitext2_train(), "wikitext2 (wikitext-2-raw-v1, train split)"
    else:
        path = Path(source).expanduser()
        if not path.exists() and source not in SOURCES and "/" not in source and "." not in source:
            raise CalibrationError(f"unknown calibration source {source!r}: use {', '.join(SOURCES)} or a text file")
        text, name = read_text_file(path), str(path)
    if tokenizer is None:
        raise CalibrationError("the model has no tokenizer: calibrate with --calibration self or none")
    ids = tokenize(tokenizer, text, max_tokens=tokens)
    if len(ids) < MIN_TOKENS:
        raise CalibrationError(f"calibration text {name} has only {len(ids)} tokens: give at least {MIN_TOKENS} "
                               "(a longer text file, or --calibration default)")
    usable = len(ids) // seq_len * seq_len if len(ids) >= seq_len else len(ids)
    seq_len = min(seq_len, usable)
    sequences = np.asarray(ids[:usable], dtype=np.int64).reshape(-1, seq_len)
    return CalibrationData(sequences, name, time.perf_counter() - started)


# --------------------------------------------------------------------------------------- statistics


@dataclass
class LayerStatistics:
    """Float64 second moments of one attention layer over ``tokens`` calibration tokens."""

    x_gram: np.ndarray  # [d, d]  X^T X / N, attention input (after the norm)
    h_gram: np.ndarray  # [h d_h, h d_h]  H^T H / N, heads entering the output projection
    grad_sq: dict[str, float] = field(default_factory=dict)  # group -> mean squared dLoss/d(output)
    tokens: int = 0


class _Accumulator:
    """Running float64 ``sum x^T x`` of row batches (or ``sum x^T y`` of two aligned streams)."""

    def __init__(self):
        self.total = None
        self.count = 0

    def add(self, x, y=None) -> None:
        import torch

        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        y = x if y is None else y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
        product = (x.T @ y).numpy()
        self.total = product if self.total is None else self.total + product
        self.count += x.shape[0]

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def projection_modules(attention, spec) -> tuple[object, object]:
    """The module whose input is the attention input (``q`` or a fused ``qkv``) and the output projection."""
    return getattr(attention, spec.fused_qkv or spec.q), getattr(attention, spec.o)


def _split_qkv(output, shape) -> dict:
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    return {"q": output[..., :q], "k": output[..., q:q + kv], "v": output[..., q + kv:q + 2 * kv]}


def collect_statistics(model, spec, shape, data: CalibrationData, *, gradients: bool = True,
                       progress: bool = True) -> list[LayerStatistics]:
    """One pass over the calibration data (forward, and backward for the sensitivities) through the dense model."""
    import torch
    from tqdm.auto import tqdm

    from .registry import decoder_layers

    layers = decoder_layers(model, spec)
    x_acc = [_Accumulator() for _ in layers]
    h_acc = [_Accumulator() for _ in layers]
    grad_sum = [dict.fromkeys(GROUPS, 0.0) for _ in layers]
    grad_count = [dict.fromkeys(GROUPS, 0) for _ in layers]
    handles = []

    def grad_hook(i, name):
        def hook(grad):
            grad_sum[i][name] += float(grad.detach().to(torch.float64).pow(2).sum())
            grad_count[i][name] += grad.numel()
        return hook

    for i, layer in enumerate(layers):
        attention = getattr(layer, spec.attention)
        first, out = projection_modules(attention, spec)

        def input_hook(module, args, kwargs, i=i):
            x_acc[i].add(args[0] if args else kwargs["input"])

        def qkv_out(module, args, output, i=i):
            if output.requires_grad:
                parts = _split_qkv(output, shape) if spec.fused_qkv else {"q": output}
                for name, part in parts.items():
                    part.register_hook(grad_hook(i, name))

        def kv_out(name, i=i):
            def hook(module, args, output):
                if output.requires_grad:
                    output.register_hook(grad_hook(i, name))
            return hook

        def o_in(module, args, kwargs, i=i):
            h_acc[i].add(args[0] if args else kwargs["input"])

        handles.append(first.register_forward_pre_hook(input_hook, with_kwargs=True))
        handles.append(out.register_forward_pre_hook(o_in, with_kwargs=True))
        if gradients:
            handles.append(first.register_forward_hook(qkv_out))
            if not spec.fused_qkv:
                handles.append(getattr(attention, spec.k).register_forward_hook(kv_out("k")))
                handles.append(getattr(attention, spec.v).register_forward_hook(kv_out("v")))
            handles.append(out.register_forward_hook(kv_out("o")))

    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with tqdm(total=data.tokens, desc="calibration statistics", unit="tok", disable=not progress) as bar:
            for batch in data.batches():
                ids = torch.from_numpy(batch)
                if gradients:
                    with torch.enable_grad():
                        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                        logits = model(inputs_embeds=embeddings, use_cache=False).logits[:, :-1]
                        loss = torch.nn.functional.cross_entropy(  # summed per-token NLL: batch-size free
                            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
                        loss.backward()
                else:
                    with torch.no_grad():
                        model(ids, use_cache=False)
                bar.update(batch.size)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return [LayerStatistics(x.mean(), h.mean(),
                            {n: grad_sum[i][n] / max(grad_count[i][n], 1) for n in GROUPS} if gradients else {},
                            x.count)
            for i, (x, h) in enumerate(zip(x_acc, h_acc))]


def collect_input_grams(model, modules: list, data: CalibrationData, *, desc: str, progress: bool = True
                        ) -> list[np.ndarray]:
    """The float64 Gram ``sum x^T x`` / tokens of each of ``modules``' inputs over the calibration data (one
    forward pass of the model)."""
    import torch
    from tqdm.auto import tqdm

    accumulators = [_Accumulator() for _ in modules]
    handles = []
    for module, accumulator in zip(modules, accumulators):
        def hook(module, args, kwargs, accumulator=accumulator):
            accumulator.add(args[0] if args else next(iter(kwargs.values())))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), tqdm(total=data.tokens, desc=desc, unit="tok", disable=not progress) as bar:
            for batch in data.batches():
                model(torch.from_numpy(batch), use_cache=False)
                bar.update(batch.size)
    finally:
        for handle in handles:
            handle.remove()
    return [accumulator.mean() for accumulator in accumulators]


def collect_mlp_statistics(model, spec, data: CalibrationData, *, progress: bool = True
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per decoder layer the float64 input Grams of the MLP over the calibration data (one forward pass of the
    dense model): of the weights that read the MLP input (``[d, d]``) and of its output weight (``[f, f]``)."""
    from .registry import decoder_layers

    modules = [layer.get_submodule(path) for layer in decoder_layers(model, spec)
               for path in (spec.mlp_in[0], spec.mlp_out)]
    grams = collect_input_grams(model, modules, data, desc="MLP statistics", progress=progress)
    return list(zip(grams[::2], grams[1::2]))


# ------------------------------------------------------------------------------------ layer replay


class _Stop(Exception):
    """Raised by a capture hook to end a layer's forward once the wanted activation is seen."""


class LayerReplay:
    """Run single decoder layers on cached hidden states (the GPTQ-style sequential pass).

    The inputs of layer 0 and every layer's keyword arguments (masks, rotary tables) are captured
    from one forward per batch of the dense model; afterwards ``run(i, hidden)`` replays layer ``i``.
    """

    def __init__(self, model, spec, data: CalibrationData):
        import torch

        from .registry import decoder_layers

        self.layers = decoder_layers(model, spec)
        self.spec = spec
        self.inputs: list = []  # per batch: layer-0 hidden states
        self.kwargs: list[list[dict]] = []  # per batch, per layer
        captured: dict[int, dict] = {}
        first_input: list = []

        def pre_hook(i):
            def hook(module, args, kwargs):
                if i == 0:
                    first_input.append(args[0] if args else kwargs["hidden_states"])
                captured[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i == len(self.layers) - 1:
                    raise _Stop
            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                for batch in data.batches():
                    captured.clear()
                    first_input.clear()
                    try:
                        model(torch.from_numpy(batch), use_cache=False)
                    except _Stop:
                        pass
                    self.inputs.append(first_input[0].detach())
                    self.kwargs.append([captured[i] for i in range(len(self.layers))])
        finally:
            for handle in handles:
                handle.remove()

    def run(self, i: int, hidden: list, watch: tuple = (), stop_at=None) -> tuple[list | None, list[list]]:
        """Layer ``i`` on each batch's hidden states: its outputs (``None`` when stopped early) and, per
        module in ``watch``, that module's input per batch. ``stop_at`` ends the layer at that module's input."""
        import torch

        seen: list[list] = [[] for _ in watch]

        def hook(j):
            def capture(module, args, kwargs):
                seen[j].append((args[0] if args else kwargs["input"]).detach())
                if module is stop_at:
                    raise _Stop
            return capture

        handles = [module.register_forward_pre_hook(hook(j), with_kwargs=True) for j, module in enumerate(watch)]
        outputs = []
        try:
            with torch.no_grad():
                for h, kwargs in zip(hidden, self.kwargs):
                    try:
                        y = self.layers[i](h, **kwargs[i])
                        outputs.append(y[0] if isinstance(y, tuple) else y)
                    except _Stop:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        return (None if stop_at is not None else outputs), seen


def gram(xs: list, ys: list | None = None) -> np.ndarray:
    """``sum_b x_b^T y_b / N`` (float64) over aligned lists of ``[..., a]`` and ``[..., b]`` tensors."""
    acc = _Accumulator()
    for j, x in enumerate(xs):
        acc.add(x, None if ys is None else ys[j])
    return acc.mean()
