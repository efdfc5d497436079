"""Quantise every weight of a decoder ONNX with our own rounding (``lestd-export quantize MODEL.onnx -o OUT``):
no compression, the builder's int4/int8 layout (:mod:`~lestd_export.quantize_graph`), calibration statistics
through ONNX Runtime for the calibrated roundings."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import CompressionConfig
from ..quantize_graph import QuantizeConfig, quantize_graph, weight_matmuls
from .capture import capture_grams, load_onnx_calibration
from .driver import QUANTIZE_REPORT, compare_logits, copy_directory_files, input_record, open_for_output, write_model


def quantize_onnx(path: str | Path, out_dir: str | Path, config: QuantizeConfig, *, calibration: str = "default",
                  calibration_tokens: int = 4096, overwrite: bool = False, progress: bool = True,
                  validate: bool = True) -> dict:
    """Quantise the fp32 decoder at ``path`` into ``out_dir`` (written into a staging directory, renamed when
    complete): every weight MatMul as MatMulNBits, the token table stored once; returns the report (also
    ``quantization_report.json``). ``calibration`` (``default``, a text file, ``none``) feeds ``awq``/``gptq``."""
    from ..io import atomic_output_dir, write_json

    started = time.perf_counter()
    source = open_for_output(path, out_dir, overwrite)
    with atomic_output_dir(out_dir, overwrite) as staging:
        data = grams = None
        if config.calibrated and calibration != "none":
            data = load_onnx_calibration(source, CompressionConfig(calibration=calibration,
                                                                   calibration_tokens=calibration_tokens))
            tensors = [node.input[0] for node in weight_matmuls(source.model)]
            grams = capture_grams(source, tensors, data.sequences, progress=progress, what="input statistics")
        report = quantize_graph(source.model, config, grams, progress=progress)
        copied = copy_directory_files(source, staging)
        written = write_model(source.model, source, staging)
        del source.model
        output_bytes = sum((staging / name).stat().st_size for name in written)
        report.update({"input": input_record(source, path), "calibration": None if data is None else data.record(),
                       "output": {"files": written + copied, "model_bytes": output_bytes,
                                  "bytes_fraction": output_bytes / max(source.input_bytes(), 1)}})
        if validate:
            sample = None if data is None else data.sequences[:2, :64]
            report["vs_input"] = compare_logits(source.model_file, staging / source.model_file.name, source,
                                                ids=sample)
        report["seconds"] = time.perf_counter() - started
        write_json(staging / QUANTIZE_REPORT, report)
    return report
