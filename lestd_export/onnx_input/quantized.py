"""Quantising an fp32 decoder graph in memory and checking the result (:func:`quantize_calibrated`,
:func:`check_stored_values`): the one path every quantised file of this package takes (``quantize``, the
exports, the ONNX-input compression)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..errors import ExportValidationError, InvalidConfigError
from ..quantize_graph import (QuantizeConfig, quantize_graph, reduction_size, stored_value_simulation, weight_matmuls,
                              with_accuracy_level)
from .budget import BudgetRequest, WeighedOptions, apply_plan, choose_plan, weigh_options
from .capture import capture_grams
from .sensitivity import loss_prices
from .sessions import compare_logits
from .source import OnnxInput

STORED_VALUE_TOLERANCE = 1e-3  # relative logit error against the stored values: fp32 arithmetic, as fp32 parity
# without a whole-file plan, weights whose input is wider are rounded without its Gram (8 K^2 bytes each: 512 MB at
# this width): a TT core's input (k r wide, 9,936 for the default model's gate at 0.9) needed tens of GB (the first
# run was killed for memory)
MAX_GRAM_WIDTH = 8192


def quantize_calibrated(source: OnnxInput, config: QuantizeConfig, sequences: np.ndarray | None, *,
                        validate: bool = True, progress: bool = True, budget: BudgetRequest | None = None) -> dict:
    """Quantise ``source.model`` (fp32, in memory; compressed factors included) in place: the input Gram of every
    weight MatMul captured through ONNX Runtime over the calibration ``sequences [S, T]`` when the rounding is
    calibrated (none: round to nearest). A ``budget`` gives every weight its own storage (or low-rank factors)
    within a whole-file byte target (:mod:`.budget`; needs ``sequences``). With ``validate``, the result must
    compute what the float graph does with the very values it stores (:func:`check_stored_values`). Returns
    :func:`~lestd_export.quantize_graph.quantize_graph`'s report (with ``stored_values``, and ``budget``: the
    allocation)."""
    import copy

    from ..export import initializer_sizes

    grams = plan = configs = None
    if budget is not None and sequences is None:
        raise InvalidConfigError("--target-mb chooses each weight's storage from calibration statistics: give a "
                                 "--calibration source")
    if (config.calibrated or budget is not None) and sequences is not None:
        initializers = {init.name: init for init in source.model.graph.initializer}
        tensors = [node.input[0] for node in weight_matmuls(source.model)  # a plan weighs every weight
                   if budget is not None or reduction_size(node, initializers) <= MAX_GRAM_WIDTH]
        grams = capture_grams(source, tensors, sequences, progress=progress, what="input statistics")
    if budget is not None:
        plan = plan_budget(source, grams, sequences, budget, config, progress=progress)
        configs = apply_plan(source.model, plan, grams, config)
        if not config.calibrated:
            grams = None
    fp32 = copy.deepcopy(source.model) if validate else None
    stored: dict = {}
    report = quantize_graph(source.model, config, grams, progress=progress, stored=stored, configs=configs)
    if plan is not None:
        report["budget"] = plan.report()
        report["budget"]["stored_bytes"] = sum(initializer_sizes(source.model).values())
    if validate:
        simulation = stored_value_simulation(fp32, source.model, stored)
        report["stored_values"] = check_stored_values(source, simulation,
                                                      None if sequences is None else sequences[:2, :64])
    return report


def plan_budget(source: OnnxInput, grams: dict, sequences: np.ndarray, request: BudgetRequest,
                config: QuantizeConfig, *, progress: bool = True):
    """The whole-file plan of ``source.model`` for ``request``: its options weighed (Grams, and prices measured
    through ONNX Runtime on ``sequences``) or read from ``request.cache`` when measured there for this model and
    calibration, then the choice for the target."""
    import hashlib

    def measure(weights: list[str], probes) -> dict:
        return loss_prices(source, weights, probes, sequences, progress=progress)

    key = {"model": str(source.model_file.resolve()), "model_bytes": source.input_bytes(),
           "modified_ns": source.model_file.stat().st_mtime_ns, "table": config.head.to_dict(),
           "calibration_sha256": hashlib.sha256(np.ascontiguousarray(sequences).tobytes()).hexdigest()}
    weighed = None if request.cache is None else WeighedOptions.load(request.cache, {**key, "low_rank": request.low_rank})
    if weighed is None:
        weighed = weigh_options(source.model, grams, config, low_rank=request.low_rank, model_type=source.model_type,
                                measure=measure, key=key, progress=progress)
        if request.cache is not None:
            weighed.save(request.cache)
    return choose_plan(weighed, request)


def check_stored_values(source: OnnxInput, simulation, ids: np.ndarray | None = None,
                        tolerance: float = STORED_VALUE_TOLERANCE) -> dict:
    """The quantised ``source.model`` against ``simulation`` (the fp32 graph with the values it stores,
    :func:`~lestd_export.quantize_graph.stored_value_simulation`), both in fp32 arithmetic (the file's
    ``MatMulNBits`` at accuracy level 0), on ``ids [B, T]`` (random tokens when None). A relative logit error above
    ``tolerance`` (a rounding, packing, folding or table fault) raises
    :class:`~lestd_export.errors.ExportValidationError`."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="lestd-stored-values-") as tmp:
        paths = []
        for name, model in (("simulation", simulation), ("file", with_accuracy_level(source.model, 0))):
            paths.append(Path(tmp) / f"{name}.onnx")
            onnx.save_model(model, str(paths[-1]), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{name}.onnx.data", size_threshold=1024)
            del model
        result = compare_logits(*paths, source, ids=ids)
    result["checked_against"] = "the fp32 graph with the values the file stores (fp32 arithmetic)"
    result["tolerance"] = tolerance
    if not result["max_relative_logit_difference"] <= tolerance:
        raise ExportValidationError(
            f"the quantised model does not compute with the values it stores: relative logit error "
            f"{result['max_relative_logit_difference']:.2e} (tolerance {tolerance:.0e}); this is a bug, please report "
            "it (--no-validate keeps the file for inspection)")
    return result
