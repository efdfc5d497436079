"""Calibration through ONNX Runtime: the calibration tokens of an ONNX input (its directory's tokenizer)
and the per-layer activation statistics captured from the dense graph."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from ..config import CompressionConfig
from .sessions import decoder_feed, subgraph_model, subgraph_session
from .source import OnnxInput

CAPTURE_BATCH = 4  # calibration sequences per ONNX Runtime run


def capture_grams(source: OnnxInput, tensors: list[str], sequences: np.ndarray, *, progress: bool = True,
                  what: str = "calibration statistics") -> dict[str, np.ndarray]:
    """``X^T X / N`` (float64) of each named tensor ``[..., K]`` of the dense graph over the token ``sequences``
    ``[S, T]``, run through ONNX Runtime in batches; memory is one batch of activations plus the Grams."""
    from tqdm.auto import tqdm

    wanted = list(dict.fromkeys(tensors))
    session = subgraph_session(subgraph_model(source.model, wanted), source.model)
    totals: dict[str, np.ndarray] = {}
    count = 0
    with tqdm(total=sequences.size, desc=f"{what} (onnxruntime)", unit="tok", disable=not progress) as bar:
        for start in range(0, len(sequences), CAPTURE_BATCH):
            batch = sequences[start:start + CAPTURE_BATCH]
            values = session.run(wanted, decoder_feed(session, source.io, source.shape, batch, source.genai_decoder))
            for name, value in zip(wanted, values):
                x = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
                totals[name] = totals[name] + x.T @ x if name in totals else x.T @ x
            count += batch.size
            bar.update(batch.size)
    del session
    return {name: total / count for name, total in totals.items()}


def collect_onnx_statistics(source: OnnxInput, data, *, progress: bool = True) -> list:
    """Per layer :class:`~lestd_export.calibration.LayerStatistics` (input and head Gram matrices, float64) over the
    calibration ``data``, captured through ONNX Runtime from the dense graph."""
    from ..calibration import LayerStatistics

    wanted = [name for site in source.sites for name in (site.qkv_input, site.o_input)]
    grams = capture_grams(source, wanted, data.sequences, progress=progress)
    return [LayerStatistics(grams[site.qkv_input], grams[site.o_input], {}, data.sequences.size)
            for site in source.sites]


def load_onnx_calibration(source: OnnxInput, config: CompressionConfig):
    """Calibration token sequences for ``config.calibration`` with the input directory's tokenizer."""
    from ..calibration import CalibrationError, load_calibration
    from ..hf import load_tokenizer

    if config.calibration == "none":
        return None
    if config.calibration == "self":
        raise CalibrationError("--calibration self samples a PyTorch model: for an ONNX input calibrate on "
                               "default, a text file, or none")
    tokenizer = load_tokenizer(source.directory)
    if tokenizer is None:
        raise CalibrationError(f"{source.directory} has no tokenizer files (tokenizer.json, tokenizer_config.json) "
                               "to tokenise the calibration text: add them, or pass --calibration none")
    stub = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=source.max_positions))
    return load_calibration(config.calibration, stub, tokenizer, config.calibration_tokens)


def calibrate(source: OnnxInput, config: CompressionConfig, progress: bool) -> tuple[object, list | None]:
    """Calibration data and its per-layer statistics captured through ONNX Runtime (``(None, None)`` without)."""
    data = load_onnx_calibration(source, config)
    if data is None:
        return None, None
    started = time.perf_counter()
    statistics = collect_onnx_statistics(source, data, progress=progress)
    data.seconds += time.perf_counter() - started
    return data, statistics
