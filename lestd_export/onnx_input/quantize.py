"""Quantise every weight of a decoder ONNX with our own rounding (``lestd-export quantize MODEL.onnx -o OUT``):
no compression, the builder's int4/int8 layout (:mod:`~lestd_export.quantize_graph`), calibration statistics
through ONNX Runtime for the calibrated roundings. Every quantised file this package writes (this verb, the
exports, the ONNX-input compression) goes through :func:`~.quantized.quantize_calibrated` and its stored-value
check."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import CompressionConfig
from ..quantize_graph import QuantizeConfig
from .budget import BudgetRequest
from .capture import load_onnx_calibration
from .driver import QUANTIZE_REPORT, copy_directory_files, input_record, open_for_output, write_model
from .quantized import quantize_calibrated
from .sessions import compare_logits


def quantize_onnx(path: str | Path, out_dir: str | Path, config: QuantizeConfig, *, calibration: str = "default",
                  calibration_tokens: int = 4096, overwrite: bool = False, progress: bool = True,
                  validate: bool = True, budget: BudgetRequest | None = None) -> dict:
    """Quantise the fp32 decoder at ``path`` into ``out_dir`` (written into a staging directory, renamed when
    complete): every weight MatMul as MatMulNBits, the token table stored once; returns the report (also
    ``quantization_report.json``). ``calibration`` (``default``, a text file, ``none``) feeds ``awq``/``gptq`` and
    a ``budget``'s plan (each weight's own storage within a whole-file byte target, :mod:`.budget`).
    With ``validate`` the file must compute with the values it stores (:func:`~.quantized.check_stored_values`,
    else nothing is written) and its logits are compared with the input's."""
    from ..io import atomic_output_dir, write_json

    started = time.perf_counter()
    source = open_for_output(path, out_dir, overwrite, attention=False)  # every weight MatMul, found by structure
    with atomic_output_dir(out_dir, overwrite) as staging:
        data = None
        if (config.calibrated or budget is not None) and calibration != "none":
            data = load_onnx_calibration(source, CompressionConfig(calibration=calibration,
                                                                   calibration_tokens=calibration_tokens))
        report = quantize_calibrated(source, config, None if data is None else data.sequences, validate=validate,
                                     progress=progress, budget=budget)
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
