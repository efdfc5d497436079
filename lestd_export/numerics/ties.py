"""Decisions on floats that come out the same on every machine and in every runtime.

The planner decides discrete things (ranks, kept rows, allocation steps, whether a refit is kept) by
comparing floats. The same statistics computed by two BLAS kernels (OpenBLAS's SkylakeX vs Haswell
kernels) or two runtimes (ONNX Runtime vs PyTorch activations) agree to about 1e-8 relative, so a
comparison decided by the last bits goes one way on one machine and the other way on the next,
and the ONNX-input path and ``compress`` would build two different models from one request.

Rule: two scores within :data:`TIE_RTOL` of the largest magnitude compared are equal, and equal
scores are decided by the caller's fixed order (the earlier candidate, the lower rank, the lower
row index, the earlier group). Differences that small change no measurable quality: ``1e-6`` of a
kept energy is far below any error the tool reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TIE_RTOL = 1e-6  # relative to the largest magnitude compared; above the ~1e-8 cross-runtime spread


def snap(values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """``values`` on a grid of ``TIE_RTOL * scale`` (default: the largest ``|value|``), as float64.

    Values closer than the grid step almost always land on one grid point, so an order taken on
    snapped values leaves last-bit differences to the caller's tie-breaking order.
    """
    values = np.asarray(values, dtype=np.float64)
    if scale is None:
        scale = float(np.max(np.abs(values))) if values.size else 0.0
    step = TIE_RTOL * scale
    return values if step <= 0 or not np.isfinite(step) else np.round(values / step)


def descending_order(values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Indices sorting ``values`` largest first; near-equal values (:func:`snap`) keep their given order."""
    return np.argsort(-snap(values, scale), kind="stable")


def first_best(scores: Sequence[float]) -> int:
    """Index of the first score within ``TIE_RTOL`` (of the largest magnitude) of the highest one."""
    values = np.asarray(scores, dtype=np.float64)
    if not values.size:
        raise ValueError("no candidates to choose from")
    best = float(values.max())
    return int(np.flatnonzero(values >= best - TIE_RTOL * float(np.abs(values).max()))[0])


def improves(new: float, old: float) -> bool:
    """Whether ``new`` is lower than ``old`` by more than a tie (``TIE_RTOL`` of their magnitude)."""
    return new < old - TIE_RTOL * max(abs(new), abs(old))
