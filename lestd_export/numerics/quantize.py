"""The values a blockwise-quantised MatMul stores (pure numerics; ONNX Runtime's ``MatMulNBits``, symmetric)."""

from __future__ import annotations

import numpy as np

from .pruning import LayerCore


def blockwise_round(matrix: np.ndarray, bits: int, block_size: int = 32) -> np.ndarray:
    """What ``MatMulNBits`` computes with for ``x @ matrix`` (``matrix [K, N]``): blocks of ``block_size`` along
    ``K`` per column, the entry of largest magnitude mapped to ``-2^(bits-1)``, round to nearest (ONNX Runtime's
    symmetric quantiser, as the genai builder writes it; equal to it to float rounding, tested)."""
    k, n = matrix.shape
    limit = 2 ** (bits - 1)
    padded = np.concatenate([matrix, np.zeros(((-k) % block_size, n), dtype=matrix.dtype)])
    blocks = padded.reshape(-1, block_size, n)  # [blocks, block_size, N]
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)  # signed, [blocks, 1, N]
    scale = np.where(largest == 0, 1.0, largest / -limit)
    return (np.clip(np.round(blocks / scale), -limit, limit - 1) * scale).reshape(-1, n)[:k].astype(matrix.dtype)


def round_qkv_basis(core: LayerCore, bits: int, block_size: int = 32) -> None:
    """Put the ``U1`` columns that Q/K/V read on the grid of the plain layout's first MatMul (``X @ U1[:, rows]``),
    so that a refit that follows compensates its rounding. Scaling a column keeps it on its grid (the block scales
    scale with it), so the graft's range equalisation leaves the stored values as rounded here."""
    used = [core.groups[name].rows for name in ("q", "k", "v") if name in core.groups]
    columns = (np.arange(core.u1.shape[1]) if any(rows is None for rows in used)
               else np.unique(np.concatenate(used)))
    u1 = np.array(core.u1, copy=True)
    u1[:, columns] = blockwise_round(u1[:, columns], bits, block_size)
    core.u1 = u1
