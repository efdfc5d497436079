"""Compress the attention of a decoder ONNX model into a new directory (:func:`compress_onnx`): plan, graft
the compressed layers (:mod:`~lestd_export.graft`), optionally quantise every weight MatMul, write the
directory and compare its logits with the input's."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import CompressionConfig
from ..errors import InvalidConfigError
from ..onnx_sites import GraphMappingError
from ..quantize_graph import QuantizeConfig
from .plan import check_config, plan_cores, plan_low_rank
from .sessions import compare_logits
from .source import OnnxInput, open_onnx_input

REPORT_FILE = "compression_report.json"
QUANTIZE_REPORT = "quantization_report.json"
# reports of the input model: they would describe another model
STALE_FILES = ("export_report.json", REPORT_FILE, QUANTIZE_REPORT)
QUANTIZE_BITS = {"none": None, "int8": 8, "int4": 4}
EXTERNAL_DATA_BYTES = 1 << 30  # an input without external data is written inline below this size


def _storage(config: CompressionConfig, quantize: str | None) -> tuple[CompressionConfig, str]:
    """One precision for the planner's costs (``config.storage``) and the quantiser (``quantize``, None:
    the config's)."""
    if quantize is None:
        quantize = "none" if config.storage == "fp32" else config.storage
    if quantize not in QUANTIZE_BITS:
        raise InvalidConfigError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANTIZE_BITS)}")
    wanted = "fp32" if quantize == "none" else quantize
    return (config if config.storage == wanted else replace(config, storage=wanted)), quantize


def copy_directory_files(source: OnnxInput, staging: Path) -> list[str]:
    """Everything in the input directory but the model file, its external data and stale reports."""
    skip = {source.model_file.name, *source.external_files, *STALE_FILES}
    copied = []
    for item in sorted(source.directory.iterdir()):
        if item.name in skip or item.name.startswith(".") or item.resolve() == staging.resolve():
            continue
        if item.is_dir():
            continue  # sibling folders (other variants, caches) are not part of the model
        if item.is_file():
            shutil.copy2(item, staging / item.name)
            copied.append(item.name)
    return copied


def open_for_output(path: str | Path, out_dir: str | Path, overwrite: bool, attention: bool = True) -> OnnxInput:
    """The input at ``path`` (its attention located when ``attention``), once ``out_dir`` is known to be writable
    and not the input's own directory."""
    from ..io import check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    source = open_onnx_input(path, attention)
    if out_dir.resolve() == source.directory.resolve():
        raise InvalidConfigError(f"-o {out_dir} is the input directory: write the new model elsewhere")
    return source


def write_model(model, source: OnnxInput, staging: Path) -> list[str]:
    """Save ``model`` as ``staging/<input file name>`` (external data ``<name>.data`` when the input had some or
    is large); returns the written file names."""
    import onnx

    target = staging / source.model_file.name
    size = sum(len(init.raw_data) for init in model.graph.initializer)
    external = bool(source.external_files) or size >= EXTERNAL_DATA_BYTES
    location = source.model_file.name + ".data"
    if external:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(model, str(target))
    written = [target.name] + ([location] if external else [])
    umask = os.umask(0)
    os.umask(umask)
    for name in written:  # onnx creates external data files private (0600); make them like any new file
        (staging / name).chmod(0o666 & ~umask)
    return written


def input_record(source: OnnxInput, path: str | Path) -> dict:
    """The report's description of an ONNX input."""
    return {"path": str(path), "model_file": source.model_file.name, "producer": source.producer,
            "config": source.config_file.name, "layers": len(source.sites) or None, "packed_qkv": source.sites[0].packed if source.sites else None,
            "bytes": source.input_bytes(),
            "shape": {"hidden": source.shape.hidden, "heads": source.shape.heads, "kv_heads": source.shape.kv_heads,
                      "head_dim": source.shape.head_dim}}


def compress_onnx(path: str | Path, out_dir: str | Path, config: CompressionConfig, *, quantize: str | None = None,
                  rounding: str = "awq", block_size: int = 32, head_bits: int | None = None,
                  overwrite: bool = False, progress: bool = True, validate: bool = True) -> dict:
    """Compress the attention of the decoder ONNX at ``path`` into ``out_dir``; returns the report.

    ``out_dir`` receives the input directory's other files (genai_config.json, config.json, tokenizer
    files...), the new model under the same file name (external data ``<name>.data`` when the input
    used external data or is large) and ``compression_report.json``; it is written into a staging
    directory renamed into place when complete. ``quantize`` (``int4``/``int8``) turns every weight
    MatMul of the result (compressed attention, MLP, lm_head) into MatMulNBits, as the genai builder
    does (None: as ``config.storage`` says), with ``rounding`` (calibrated on ``config.calibration`` through ONNX
    Runtime, the compressed factors included) at ``block_size``. With ``validate`` the
    written model is loaded by ONNX Runtime and its logits compared with the input's (recorded; a
    model that does not load, or a quantised one that does not compute with the values it stores, is an error
    and nothing is written).
    """
    from ..compress import build_report, core_entry
    from ..io import atomic_output_dir, write_json

    config, quantize = _storage(check_config(config), quantize)
    started = time.perf_counter()
    source = open_for_output(path, out_dir, overwrite)
    with atomic_output_dir(out_dir, overwrite) as staging:
        from ..graft import LatentLayer, graft_attention

        if config.method == "svd":
            layers, entries, data = plan_low_rank(source, config, progress=progress)
            errors = refit = None
        else:
            cores, _, data, _, errors, refit = plan_cores(source, config, progress=progress)
            layers = [LatentLayer.from_core(core) for core in cores]
            entries = [core_entry(core, source.shape, config, energy)
                       for core, energy in zip(cores, source.output_energies)]
        model = source.model
        grafted = graft_attention(model, source.sites, layers)
        quantised = None
        sample = None if data is None else data.sequences[:2, :64]  # real text where there is some
        if QUANTIZE_BITS[quantize] is not None:  # every weight and the token table, the grafted factors' inputs too
            from .quantized import quantize_calibrated

            quantised = quantize_calibrated(source, QuantizeConfig(bits=QUANTIZE_BITS[quantize], block_size=block_size,
                                                                   rounding=rounding, head_bits=head_bits),
                                            None if data is None else data.sequences, validate=validate,
                                            progress=progress)
            quantised.update(nodes=quantised["weight_matmuls"], attention_nodes=len(grafted))
        copied = copy_directory_files(source, staging)
        written = write_model(model, source, staging)
        del model, source.model
        target = staging / source.model_file.name
        output_bytes = sum((staging / name).stat().st_size for name in written)
        vs_input = compare_logits(source.model_file, target, source, ids=sample) if validate else None
        report = build_report(config, entries, source.model_type or "unknown", str(path),
                              time.perf_counter() - started, data, errors)
        report["input"] = input_record(source, path)
        report["output"] = {"files": written + copied, "model_bytes": output_bytes,
                            "bytes_fraction": output_bytes / max(source.input_bytes(), 1), "quantize": quantised,
                            "grafted_matmuls": len(grafted)}
        report["refit"] = refit
        if vs_input is not None:
            report["vs_input"] = vs_input
        report["seconds"] = time.perf_counter() - started
        write_json(staging / REPORT_FILE, report)
    return report
