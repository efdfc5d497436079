"""The ``compress`` verb: ``compress_model(model, config)`` rewrites a model in place, like torchao's
``quantize_``; ``save_compressed``/``load_compressed`` (:mod:`.checkpoint`, importable from here too)
write and reload a checkpoint without recomputing anything.

The planning requests, the per-layer report entries (:func:`core_entry`, :func:`low_rank_entry`) and
the report (:func:`build_report`) are built here for the ONNX input (:mod:`.onnx_input`) as well, so
both count the same sizes and errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .checkpoint import COMPRESSION_KEY, FORMAT_VERSION
from .checkpoint import REPORT_FILE, WEIGHTS_FILE, load_compressed, save_compressed  # noqa: F401 -- the verb's API
from .config import CompressionConfig
from .errors import InvalidConfigError
from .registry import attention_shape, decoder_layers, spec_for


def check_ranks(config: CompressionConfig, hidden: int, head_dim: int) -> None:
    """Refuse explicit ranks (``config.ranks``) above the hidden size (R1, an svd rank) or the head dim (R2)."""
    if config.ranks is None:
        return
    r1, r2 = config.ranks
    if config.method == "svd":
        if r1 is not None and r1 > hidden:
            raise InvalidConfigError(f"svd rank {r1} exceeds the hidden size {hidden}")
        return
    if r1 is not None and r1 > hidden:
        raise InvalidConfigError(f"R1={r1} exceeds the hidden size d={hidden}: use at most {hidden} or 'full'")
    if r2 is not None and r2 > head_dim:
        raise InvalidConfigError(f"R2={r2} exceeds the head dim d_h={head_dim}: use at most {head_dim} or 'full'")


def compress_model(model, config: CompressionConfig, *, tokenizer=None, progress: bool = True,
                   source: str | None = None) -> dict:
    """Compress the ``config.modules`` of ``model`` in place (every decoder layer's attention with
    ``config.method``, its MLP as low-rank factors; the token table and lm_head as low-rank factors); return the
    compression report.

    With ``config.calibration`` other than ``none``, calibration tokens are read (``tokenizer``
    needed for a text source), activation statistics collected from the dense model, Stage I/II run
    in the output-error norm, the kept values refit layer by layer and, with ``config.heal``, the
    compressed model distilled against the dense one. Raises typed errors (unsupported
    architecture, NaN/Inf weights, impossible ranks or budget, unusable calibration source) before
    the model is modified.
    """
    from .surgery import read_attention, read_embedding, read_mlp

    started = time.perf_counter()
    spec = spec_for(model.config)
    shape = attention_shape(model.config)
    check_ranks(config, shape.hidden, shape.head_dim)
    layers = decoder_layers(model, spec)
    weights = [read_attention(getattr(layer, spec.attention), spec, shape, i) for i, layer in enumerate(layers)]
    mlp_weights = [read_mlp(layer, spec, i) for i, layer in enumerate(layers)] if "mlp" in config.modules else None
    embedding_weights = read_embedding(model) if "embedding" in config.modules else None
    calibration = _calibrate(model, config, tokenizer, spec, shape, progress)
    if "attention" in config.modules:
        entries, output_errors = _compress_attention(model, config, spec, shape, weights, calibration, progress)
    else:
        entries, output_errors = [dense_entry(w, shape) for w in weights], None
    mlp = None
    if mlp_weights is not None:
        mlp = compress_mlp(model, config, spec, mlp_weights, calibration.mlp_statistics, progress)
    embedding = None
    if embedding_weights is not None:
        embedding = compress_embedding(model, config, embedding_weights, calibration.head_gram)

    healing = None
    if config.heal:
        from .healing import heal

        healing = heal(model, calibration.teacher, calibration.heal_data.sequences, config.heal_steps,
                       learning_rate=config.heal_lr, batch=config.heal_batch, device=config.heal_device,
                       progress=progress)
        healing["tokens_sha256"] = calibration.heal_data.sha256
    report = build_report(config, entries, spec.model_type, source, time.perf_counter() - started, calibration.data,
                          output_errors)
    if mlp is not None:
        report["mlp"] = mlp
    if embedding is not None:
        report["embedding"] = embedding
    if healing is not None:
        report["healing"] = healing
    setattr(model.config, COMPRESSION_KEY, {
        "format_version": FORMAT_VERSION, "method": config.method, "config": config.to_dict(),
        "index_dtype": "int32", "layers": [_layout(e) for e in entries],
        "size_fraction": report["size_fraction"],
        **({"mlp": {"method": mlp["method"], "ranks": mlp["ranks"],
                    **({"sparse": mlp["sparse"]} if "sparse" in mlp else {})}} if mlp is not None else {}),
        **({"embedding": {"rank": embedding["rank"], "head_rank": embedding["head_rank"]}}
           if embedding is not None else {}),
    })
    return report


def _compress_attention(model, config: CompressionConfig, spec, shape, weights: list, calibration: Calibration,
                        progress: bool) -> tuple[list[dict], list | None]:
    """Compress every layer's attention (``weights``: their :class:`~.surgery.AttentionWeights`) in place; return
    the per-layer report entries and, after a refit, its relative output errors."""
    from tqdm.auto import tqdm

    from .numerics.planner import compress_layers, reconstruct_layer
    from .surgery import install_core_attention, install_low_rank, slice_groups

    layers = decoder_layers(model, spec)
    dtype = next(model.parameters()).dtype
    dense_per_layer = shape.num_slices * shape.hidden * shape.head_dim
    groups = slice_groups(shape, with_output=not config.dense_output)  # a dense output: Q/K/V carry the budget
    output_entries = dense_output_entries(shape, config)
    statistics = calibration.statistics
    with tqdm(total=len(layers), desc=f"{config.method}: decomposing layers", unit="layer",
              disable=not progress) as bar:
        try:
            if config.method == "svd":
                low_rank = svd_factors(weights, statistics, config, shape)
                bar.update(len(layers))
            else:
                tensors = [w.slice_tensor(shape)[:groups.total] for w in weights]  # q, k, v slices first
                metrics = layer_metrics(statistics, groups, shape, config)
                sensitivities = None if statistics is None else [s.grad_sq for s in statistics]
                cores = compress_layers(tensors, groups, tucker_request(config, shape), bar.update, metrics,
                                        sensitivities)
        except ValueError as error:
            raise InvalidConfigError(f"cannot meet the request: {error}") from None

    if config.method == "svd":
        for layer, w, factors in zip(layers, weights, low_rank):
            install_low_rank(layer, spec, dict(zip(("q", "k", "v", "o"), factors)), w.biases, dtype)
        return [low_rank_entry(factors, shape) for factors in low_rank], None

    def summary(core):
        return {"ranks": list(core.ranks), "density": core.density(shape.num_slices),
                "stored": core.value_entries + output_entries + core.index_entries, "dense": dense_per_layer}

    def install(i, core):
        install_core_attention(layers[i], spec, core, weights[i].biases, dtype, summary(core),
                               shared_rows=config.layout == "plain")
        return getattr(getattr(layers[i], spec.attention).attention, spec.o)

    output_errors = None
    if calibration.data is not None and config.refit:
        from .refit import sequential_refit

        output_errors = sequential_refit(model, spec, groups, tensors, cores, calibration.data, install,
                                         target=config.refit_target, bits=config.bits, progress=progress)
        for core, dense in zip(cores, tensors):  # the refit changed the values: recount the plain error
            core.kept_energy = core.energy - float(np.sum((dense - reconstruct_layer(core, groups)) ** 2))
    else:
        for i, core in enumerate(cores):
            install(i, core)
    return [core_entry(core, shape, config, float(np.sum(w.matrices["o"] ** 2))) for core, w in zip(cores, weights)], \
        output_errors


def compress_mlp(model, config: CompressionConfig, spec, weights: list, statistics: list | None,
                 progress: bool = True) -> dict:
    """Replace every layer's MLP (``weights``: their :class:`~.surgery.MlpWeights`) by low-rank factors at
    ``config.mlp_fraction`` of its parameters (SVD-LLM whitening by ``statistics``, the layers' input Grams
    from :func:`~.calibration.collect_mlp_statistics`; the input members share one basis). Returns the
    report's ``mlp`` section."""
    from tqdm.auto import tqdm

    from .numerics.lowrank import svd_layers
    from .numerics.metric import cholesky_factor
    from .surgery import install_mlp

    if config.mlp_method != "svd":
        return _compress_mlp_tt(model, config, spec, weights, progress)
    lefts = None if statistics is None else [[cholesky_factor(g, config.damping).T for g in pair]
                                              for pair in statistics]
    try:
        factors = svd_layers([[w.inputs, w.output] for w in weights], config.mlp_fraction, config.budget, lefts=lefts)
    except ValueError as error:
        raise InvalidConfigError(f"cannot meet the MLP request: {error}") from None
    dtype = next(model.parameters()).dtype
    for layer, w, (inputs, output) in tqdm(list(zip(decoder_layers(model, spec), weights, factors)),
                                           desc="mlp: installing factors", unit="layer", disable=not progress):
        install_mlp(layer, spec, (inputs.a, inputs.b), (output.a, output.b), w, dtype)
    return _mlp_report("svd-llm" if statistics is not None else "svd", config, weights, factors,
                       "output (whitened)" if statistics is not None else "Frobenius", shared_input_basis=True)


def _mlp_report(method: str, config: CompressionConfig, weights: list, layers: list[list], norm: str,
                **extra) -> dict:
    """The report's ``mlp`` section from each layer's stored weights (``layers``: per layer, objects with ``rank``,
    ``entries``, ``energy`` and ``kept_energy``) and the dense :class:`~.surgery.MlpWeights`."""
    dense = sum(w.inputs.size + w.output.size for w in weights)
    stored = sum(f.entries for layer in layers for f in layer)

    def relative(group) -> float:
        return float(np.sqrt(max(sum(f.energy - f.kept_energy for f in group), 0.0) / sum(f.energy for f in group)))

    return {"method": method, **extra, "fraction": {"requested": config.mlp_fraction, "stored": stored / dense},
            "params": {"dense": int(dense), "stored": int(stored)},
            "ranks": [[f.rank for f in layer] for layer in layers],
            "relative_error": {"overall": relative([f for layer in layers for f in layer]),
                               "per_layer": [relative(layer) for layer in layers], "norm": norm}}


EMBEDDING_RANK_STEP = 32  # the factored table's rank is a multiple of this: int4 blocks of 32 divide it


def embedding_rank(vocab: int, width: int, fraction: float) -> int:
    """The rank whose factors ``r (V + d)`` hold at most ``fraction`` of a ``[V, d]`` table, a multiple of
    :data:`EMBEDDING_RANK_STEP` (at least one step; at most ``min(V, d)``)."""
    rank = int(fraction * vocab * width / (vocab + width)) // EMBEDDING_RANK_STEP * EMBEDDING_RANK_STEP
    return min(max(rank, EMBEDDING_RANK_STEP), vocab, width)


def compress_embedding(model, config: CompressionConfig, weights, head_gram: np.ndarray | None) -> dict:
    """Replace the token table (and the lm_head, tied or not) by low-rank factors at ``config.embedding_fraction``
    of its entries (``weights``: the :class:`~.surgery.EmbeddingWeights`). The lm_head's factors are SVD-LLM
    (whitened by ``head_gram``, its calibration input Gram, when given): a tied table is truncated in that norm,
    an untied table by plain SVD. Returns the report's ``embedding`` section."""
    from .numerics.lowrank import svd_layers
    from .numerics.metric import cholesky_factor
    from .surgery import install_embedding

    vocab, width = weights.table.shape
    rank = embedding_rank(vocab, width, config.embedding_fraction)
    left = None if head_gram is None else [[cholesky_factor(head_gram, config.damping).T]]
    head = svd_layers([[weights.table.T if weights.tied else weights.head]], 1.0, rank=rank, lefts=left)[0][0]
    if weights.tied:  # E^T ~ a b: E ~ b^T a^T
        table, factors = (head.b.T, head.a.T), [head]
    else:
        lookup = svd_layers([[weights.table]], 1.0, rank=rank)[0][0]
        table, factors = (lookup.a, lookup.b), [lookup, head]
    install_embedding(model, table, None if weights.tied else (head.a, head.b), weights,
                      next(model.parameters()).dtype)
    dense = vocab * width * len(factors)
    stored = sum(f.entries for f in factors)

    def error(f):
        return float(np.sqrt(max(f.energy - f.kept_energy, 0.0) / f.energy))

    return {"method": "svd-llm" if head_gram is not None else "svd", "tied": weights.tied, "rank": rank,
            "head_rank": None if weights.tied else rank,
            "fraction": {"requested": config.embedding_fraction, "stored": stored / dense},
            "params": {"dense": int(dense), "stored": int(stored)},
            "relative_error": {"head": error(head), **({} if weights.tied else {"table": error(lookup)}),
                               "norm": "output (whitened)" if head_gram is not None else "Frobenius"}}


def _compress_mlp_tt(model, config: CompressionConfig, spec, weights: list, progress: bool) -> dict:
    """``compress_mlp`` for ``tt`` and ``saten``: every MLP weight a two-core TT-matrix (and sparse residual) at
    ``config.mlp_fraction`` of its entries."""
    from tqdm.auto import tqdm

    from .numerics.tt import SATEN_SPARSE_SHARE, tt_weight
    from .surgery import install_mlp_tt, mlp_members

    share = SATEN_SPARSE_SHARE if config.mlp_method == "saten" else 0.0
    dtype = next(model.parameters()).dtype
    layers = []
    for layer, w in tqdm(list(zip(decoder_layers(model, spec), weights)), desc=f"mlp: {config.mlp_method} cores",
                         unit="layer", disable=not progress):
        factors = {path: tt_weight(m, config.mlp_fraction, 2, share) for path, m in mlp_members(w, spec).items()}
        install_mlp_tt(layer, spec, factors, w, dtype)
        layers.append(list(factors.values()))
    return _mlp_report(config.mlp_method, config, weights, layers, "Frobenius", shared_input_basis=False,
                       sparse=[[int(f.indices.size) for f in layer] for layer in layers])


@dataclass
class Calibration:
    """What calibration gives ``compress``: the data, the attention, MLP and lm_head statistics of the dense model
    and, for healing, a frozen dense copy and its data (all None without calibration)."""

    data: object = None  # CalibrationData
    statistics: list | None = None
    mlp_statistics: list | None = None
    head_gram: np.ndarray | None = None  # the lm_head's input Gram [d, d]
    teacher: object = None
    heal_data: object = None


def _calibrate(model, config: CompressionConfig, tokenizer, spec, shape, progress: bool) -> Calibration:
    if config.calibration == "none":
        return Calibration()
    import copy

    from .calibration import collect_input_grams, collect_mlp_statistics, collect_statistics, load_calibration

    data = load_calibration(config.calibration, model, tokenizer, config.calibration_tokens)
    started = time.perf_counter()
    result = Calibration(data)
    if "attention" in config.modules:
        result.statistics = collect_statistics(model, spec, shape, data, gradients=config.objective == "fisher",
                                               progress=progress)
    if "mlp" in config.modules and config.mlp_method == "svd":  # a TT has no whitened form
        result.mlp_statistics = collect_mlp_statistics(model, spec, data, progress=progress)
    if "embedding" in config.modules:
        [result.head_gram] = collect_input_grams(model, [model.get_output_embeddings()], data,
                                                 desc="lm_head statistics", progress=progress)
    data.seconds += time.perf_counter() - started
    if config.heal:
        result.heal_data = load_calibration(config.calibration, model, tokenizer, config.heal_tokens)
        result.teacher = copy.deepcopy(model)
    return result


def svd_factors(weights: list, statistics: list | None, config: CompressionConfig, shape) -> list[list]:
    """Per layer the q, k, v, o :class:`~.numerics.lowrank.LowRankMatrix` of ``--method svd`` from the
    layers' :class:`~.surgery.AttentionWeights` (SVD-LLM whitening with calibration ``statistics``);
    ``compress`` and the ONNX input truncate with it. Raises ValueError for a request it cannot meet."""
    from .numerics.lowrank import svd_layers

    r1 = config.ranks[0] if config.ranks else None
    lefts = None if statistics is None else [svd_metrics(s, config.damping) for s in statistics]
    return svd_layers([[w.matrices[n] for n in ("q", "k", "v", "o")] for w in weights],
                      config.size_fraction or 1.0, config.budget,
                      rank=(r1 or shape.hidden) if config.ranks else None, lefts=lefts)


def svd_metrics(statistics, damping: float) -> list[np.ndarray]:
    """SVD-LLM whitening of one layer's :class:`~.calibration.LayerStatistics`: left factors ``L^T`` of the
    input Grams of Q, K, V (``X``, ``[d, d]``) and O (``H``, ``[h d_h, h d_h]``)."""
    from .numerics.metric import cholesky_factor

    x = cholesky_factor(statistics.x_gram, damping).T
    return [x, x, x, cholesky_factor(statistics.h_gram, damping).T]


def _qkv_fraction(size_fraction: float | None, dense: int, output_entries: int) -> float | None:
    """The planner's fraction of the Q/K/V entries once a dense output projection is paid for."""
    if size_fraction is None or not output_entries:
        return size_fraction
    left = size_fraction * dense - output_entries
    if left <= 0:
        raise InvalidConfigError(f"size fraction {size_fraction} does not even hold the dense output projection "
                                 f"({output_entries / dense:.3f} of the attention): raise it or drop --dense-output")
    return left / (dense - output_entries)


def dense_output_entries(shape, config: CompressionConfig) -> int:
    """Entries of the output projection when it stays dense (``--dense-output``), else 0."""
    return shape.heads * shape.head_dim * shape.hidden if config.dense_output else 0


def tucker_request(config: CompressionConfig, shape):
    """The planner request of ``config`` (with ``--dense-output`` the Q/K/V share what the dense output
    projection leaves of the budget); ``compress`` and the ONNX input plan with it."""
    from .numerics.planner import TuckerRequest

    dense = shape.num_slices * shape.hidden * shape.head_dim
    return TuckerRequest(method=config.method,
                         size_fraction=_qkv_fraction(config.size_fraction, dense, dense_output_entries(shape, config)),
                         ranks=config.ranks, core_density=config.core_density, granularity=config.granularity,
                         budget=config.budget, tol=config.hooi_tol, max_iter=config.hooi_max_iter,
                         objective=config.objective, index_cost=config.index_cost,
                         plain_layout=config.layout == "plain")


def layer_metrics(statistics, groups, shape, config: CompressionConfig) -> list | None:
    """Per layer the data-aware metric of Stage I/II from calibration statistics (None without them)."""
    from .numerics.metric import layer_metric

    if statistics is None:
        return None
    return [layer_metric(s.x_gram, s.h_gram, (*groups.sizes, 0)[:4], shape.head_dim, config.damping,
                         config.whitening_power) for s in statistics]


def low_rank_entry(factors: list, shape) -> dict:
    """What the report records of one layer compressed per matrix (``--method svd``): ``factors`` its q,
    k, v, o :class:`~.numerics.lowrank.LowRankMatrix` (see :func:`svd_factors`)."""
    stored = sum(f.entries for f in factors)
    return {"ranks": {n: f.rank for n, f in zip(("q", "k", "v", "o"), factors)}, "density": 1.0, "values": stored,
            "indices": 0, "factors": stored, "dense": shape.num_slices * shape.hidden * shape.head_dim,
            "energy": sum(f.energy for f in factors),
            "squared_error": max(sum(f.energy - f.kept_energy for f in factors), 0.0)}


def dense_entry(weights, shape) -> dict:
    """What the report records of one layer whose attention stays dense (``--modules`` without attention);
    ``weights``: its :class:`~.surgery.AttentionWeights`."""
    dense = shape.num_slices * shape.hidden * shape.head_dim
    return {"ranks": None, "density": 1.0, "values": dense, "indices": 0, "factors": 0, "dense": dense,
            "energy": sum(float(np.sum(w ** 2)) for w in weights.matrices.values()), "squared_error": 0.0}


def core_entry(core, shape, config: CompressionConfig, output_energy: float) -> dict:
    """What the report records of one Tucker layer (``core``: its :class:`~.numerics.pruning.LayerCore`);
    ``output_energy`` is ``||W_O||^2`` of its dense output projection, counted when that stays dense."""
    return {"ranks": list(core.ranks), "density": core.density(shape.num_slices),
            "rows": {n: (None if g.rows is None else len(g.rows)) for n, g in core.groups.items()},
            **_stored_entries(core, config, dense_output_entries(shape, config)),
            "dense": shape.num_slices * shape.hidden * shape.head_dim,
            "energy": core.energy + (output_energy if config.dense_output else 0.0),
            "squared_error": core.squared_error}


def _stored_entries(core, config: CompressionConfig, output_entries: int) -> dict:
    """What one layer stores: values (factors, core blocks, a dense output projection), indices, and the
    plain layout's output-side copy of ``U1`` columns. The plain layout (graft.py) stores the ``U1``
    columns of the rows Q/K/V keep (their union) instead of the whole ``U1``, and no index."""
    if config.layout != "plain":
        return {"values": core.value_entries + output_entries, "indices": core.index_entries, "output_copy": 0,
                "factors": core.factor_entries}
    (d, r1), (dh, r2) = core.u1.shape, core.u2.shape
    inputs = [g.rows for name, g in core.groups.items() if name != "o"]
    union = r1 if any(rows is None for rows in inputs) else len(np.unique(np.concatenate(inputs)))
    output = core.groups.get("o")
    copy = 0 if output is None else d * (r1 if output.rows is None else len(output.rows))
    factors = d * union + (0 if r2 >= dh else dh * r2)
    blocks = sum(g.values for g in core.groups.values())
    return {"values": factors + blocks + output_entries, "indices": 0, "output_copy": copy, "factors": factors}


def _layout(entry: dict) -> dict:
    """What reloading needs to rebuild one layer's modules (shapes) and its summary."""
    keys = ("ranks", "rows", "density", "values", "indices", "dense")
    return {k: entry[k] for k in keys if k in entry}


def build_report(config: CompressionConfig, entries: list[dict], model_type: str, source: str | None,
                 seconds: float, calibration=None, output_errors: list | None = None) -> dict:
    """The compression report of per-layer ``entries`` (:func:`core_entry`, :func:`low_rank_entry`): sizes
    (values, indices, factors), ranks, densities and relative weight errors, overall and per layer; with
    ``calibration`` (a :class:`~.calibration.CalibrationData`) its record and the refit's ``output_errors``."""
    dense = sum(e["dense"] for e in entries)
    output_copy = sum(e.get("output_copy", 0) for e in entries)
    values = sum(e["values"] for e in entries) + output_copy
    indices = sum(e["indices"] for e in entries)
    stored = values + config.index_cost * indices  # in stored values of the storage precision
    factors = sum(e["factors"] for e in entries)
    energy = sum(e["energy"] for e in entries)
    error = sum(e["squared_error"] for e in entries)
    report = {
        "method": config.method,
        "model": source,
        "model_type": model_type,
        "config": config.to_dict(),
        "size_fraction": {"requested": config.size_fraction, "values_only": values / dense,
                          "with_indices": stored / dense, "storage": config.storage, "layout": config.layout},
        "index_dtype": "int32",
        "params": {"dense_attention": dense, "stored": stored, "factors": factors,
                   "output_copy": output_copy, "core_values": values - factors - output_copy,
                   "indices": indices},
        "ranks": [e["ranks"] for e in entries],
        "density": [e["density"] for e in entries],
        "relative_weight_error": {
            "overall": float(np.sqrt(error / energy)),
            "per_layer": [float(np.sqrt(e["squared_error"] / e["energy"])) for e in entries],
        },
        "layers": [{"layer": i, **{k: v for k, v in e.items() if k not in ("energy", "squared_error")}}
                   for i, e in enumerate(entries)],
        "seconds": seconds,
    }
    if calibration is not None:
        report["calibration"] = calibration.record()
        if output_errors is not None:
            report["calibration"]["relative_output_error"] = output_errors
    return report
