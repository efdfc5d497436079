"""Plan an ONNX input's compression as ``compress`` plans a PyTorch model's: the settings an ONNX input
allows (:func:`check_config`), the calibrated Stage I/II and the refit (:func:`plan_cores`), and the
per-matrix low-rank baseline (:func:`plan_low_rank`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..config import CompressionConfig
from ..errors import InvalidConfigError
from ..onnx_sites import GraphMappingError
from .capture import calibrate
from .refit import LayerCuts, dense_refit, sequential_refit_onnx
from .source import OnnxInput, read_weights


def check_config(config: CompressionConfig) -> CompressionConfig:
    """Refuse what needs a PyTorch model; the graft's layout is the plain one (every weight a MatMul)."""
    if config.modules != ("attention",):
        raise InvalidConfigError("an ONNX input has its attention compressed only: for its MLP use `lestd-export "
                                 "quantize --target-mb MB` (low-rank factors among its choices), or compress the "
                                 "PyTorch model with --modules mlp")
    if config.heal:
        raise InvalidConfigError("--heal distils a PyTorch model: it is not available for an ONNX input")
    if config.objective == "fisher":
        raise InvalidConfigError("the fisher objective needs loss gradients of a PyTorch model: use balanced or "
                                 "frobenius for an ONNX input")
    if config.granularity == "element":
        raise InvalidConfigError("element pruning is not grafted into ONNX graphs: use --granularity row")
    if config.input_whitening is None:  # p > 0: the full-rank refit is exact on calibration-like text only (README)
        config = replace(config, input_whitening=0.0)
    return config if config.layout == "plain" else replace(config, layout="plain")


def plan_cores(source: OnnxInput, config: CompressionConfig, *,
               progress: bool = True) -> tuple[list, list[np.ndarray], object, list | None, list | None, str | None]:
    """Weights -> calibrated Stage I/II -> refit. Returns ``(cores, dense tensors, calibration data,
    statistics, relative output errors, how the refit ran)`` (the last four None without calibration)."""
    from tqdm.auto import tqdm

    from ..compress import check_ranks, layer_metrics, tucker_request
    from ..numerics.planner import compress_layers, reconstruct_layer
    from ..surgery import slice_groups

    config = check_config(config)  # the plain layout the graft writes
    shape = source.shape
    groups = slice_groups(shape, with_output=not config.dense_output)
    check_ranks(config, shape.hidden, shape.head_dim)
    weights = read_weights(source)
    tensors = [w.slice_tensor(shape)[:groups.total] for w in weights]  # q, k, v slices first
    data, statistics = calibrate(source, config, progress)
    metrics = layer_metrics(statistics, groups, shape, config)
    with tqdm(total=len(tensors), desc=f"{config.method}: decomposing layers", unit="layer",
              disable=not progress) as bar:
        try:
            cores = compress_layers(tensors, groups, tucker_request(config, shape), bar.update, metrics, None)
        except ValueError as error:
            raise InvalidConfigError(f"cannot meet the request: {error}") from None
    errors, refit = None, None
    if statistics is not None and config.refit:
        try:
            cuts, why = LayerCuts(source.model, source.sites), None
        except GraphMappingError as error:
            cuts, why = None, str(error)
        if cuts is not None:
            errors = sequential_refit_onnx(source, cores, tensors, data, groups, target=config.refit_target,
                                           bits=config.bits, progress=progress, cuts=cuts)
            refit = f"layer by layer through onnxruntime (target: {config.refit_target})"
        else:
            errors = dense_refit(cores, tensors, statistics, groups, bits=config.bits)
            refit = f"dense activations ({why})"
        for core, dense in zip(cores, tensors):  # the refit changed the values: recount the plain error
            core.kept_energy = core.energy - float(np.sum((dense - reconstruct_layer(core, groups)) ** 2))
    source.output_energies = [float(np.sum(w.matrices["o"] ** 2)) for w in weights]
    return cores, tensors, data, statistics, errors, refit


def plan_low_rank(source: OnnxInput, config: CompressionConfig, *,
                  progress: bool = True) -> tuple[list, list[dict], object]:
    """The per-matrix low-rank baseline (``--method svd``; SVD-LLM whitening when calibrated), as
    ``compress`` computes it: ``(graft layers, report entries, calibration data or None)``."""
    from ..compress import check_ranks, low_rank_entry, svd_factors
    from ..graft import LowRankLayer

    shape = source.shape
    check_ranks(config, shape.hidden, shape.head_dim)
    weights = read_weights(source)
    data, statistics = calibrate(source, config, progress)
    try:
        low_rank = svd_factors(weights, statistics, config, shape)
    except ValueError as error:
        raise InvalidConfigError(f"cannot meet the request: {error}") from None
    entries = [low_rank_entry(factors, shape) for factors in low_rank]
    layers = [LowRankLayer([(f.a, f.b) for f in factors[:3]], (factors[3].a, factors[3].b)) for factors in low_rank]
    return layers, entries, data
