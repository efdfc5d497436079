"""Quantise every weight of a decoder ONNX with our own rounding (``lestd-export quantize MODEL.onnx -o OUT``):
no compression, the builder's int4/int8 layout (:mod:`~lestd_export.quantize_graph`), calibration statistics
through ONNX Runtime for the calibrated roundings. Every quantised file this package writes (this verb, the
exports, the ONNX-input compression) goes through :func:`quantize_calibrated` and its stored-value check
:func:`check_stored_values`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import CompressionConfig
from ..errors import ExportValidationError
from ..quantize_graph import (QuantizeConfig, quantize_graph, stored_value_simulation, weight_matmuls,
                              with_accuracy_level)
from .capture import capture_grams, load_onnx_calibration
from .driver import QUANTIZE_REPORT, compare_logits, copy_directory_files, input_record, open_for_output, write_model
from .source import OnnxInput

STORED_VALUE_TOLERANCE = 1e-3  # relative logit error against the stored values: fp32 arithmetic, as fp32 parity


def quantize_calibrated(source: OnnxInput, config: QuantizeConfig, sequences: np.ndarray | None, *,
                        validate: bool = True, progress: bool = True) -> dict:
    """Quantise ``source.model`` (fp32, in memory; compressed factors included) in place: the input Gram of every
    weight MatMul captured through ONNX Runtime over the calibration ``sequences [S, T]`` when the rounding is
    calibrated (none: round to nearest). With ``validate``, the result must compute what the float graph does
    with the very values it stores (:func:`check_stored_values`). Returns
    :func:`~lestd_export.quantize_graph.quantize_graph`'s report (with ``stored_values``)."""
    import copy

    grams = None
    if config.calibrated and sequences is not None:
        tensors = [node.input[0] for node in weight_matmuls(source.model)]
        grams = capture_grams(source, tensors, sequences, progress=progress, what="input statistics")
    fp32 = copy.deepcopy(source.model) if validate else None
    stored: dict = {}
    report = quantize_graph(source.model, config, grams, progress=progress, stored=stored)
    if validate:
        simulation = stored_value_simulation(fp32, source.model, stored)
        report["stored_values"] = check_stored_values(source, simulation,
                                                      None if sequences is None else sequences[:2, :64])
    return report


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


def quantize_onnx(path: str | Path, out_dir: str | Path, config: QuantizeConfig, *, calibration: str = "default",
                  calibration_tokens: int = 4096, overwrite: bool = False, progress: bool = True,
                  validate: bool = True) -> dict:
    """Quantise the fp32 decoder at ``path`` into ``out_dir`` (written into a staging directory, renamed when
    complete): every weight MatMul as MatMulNBits, the token table stored once; returns the report (also
    ``quantization_report.json``). ``calibration`` (``default``, a text file, ``none``) feeds ``awq``/``gptq``.
    With ``validate`` the file must compute with the values it stores (:func:`check_stored_values`, else nothing
    is written) and its logits are compared with the input's."""
    from ..io import atomic_output_dir, write_json

    started = time.perf_counter()
    source = open_for_output(path, out_dir, overwrite)
    with atomic_output_dir(out_dir, overwrite) as staging:
        data = None
        if config.calibrated and calibration != "none":
            data = load_onnx_calibration(source, CompressionConfig(calibration=calibration,
                                                                   calibration_tokens=calibration_tokens))
        report = quantize_calibrated(source, config, None if data is None else data.sequences, validate=validate,
                                     progress=progress)
        sample = None if data is None else data.sequences[:2, :64]
        copied = copy_directory_files(source, staging)
        written = write_model(source.model, source, staging)
        del source.model
        output_bytes = sum((staging / name).stat().st_size for name in written)
        report.update({"input": input_record(source, path), "calibration": None if data is None else data.record(),
                       "output": {"files": written + copied, "model_bytes": output_bytes,
                                  "bytes_fraction": output_bytes / max(source.input_bytes(), 1)}})
        if validate:
            report["vs_input"] = compare_logits(source.model_file, staging / source.model_file.name, source,
                                                ids=sample)
        report["seconds"] = time.perf_counter() - started
        write_json(staging / QUANTIZE_REPORT, report)
    return report
