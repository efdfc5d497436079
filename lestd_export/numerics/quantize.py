"""The values a blockwise-quantised MatMul stores (pure numerics; ONNX Runtime's ``MatMulNBits``, symmetric).

A weight ``W [K, N]`` read as ``x @ W`` is stored in blocks of ``block_size`` along ``K`` per column, each with
one scale and the fixed zero point ``2^(bits-1)`` (the builder's symmetric format: no zero-point bytes, the fast
kernel). :func:`blockwise_round` is ONNX Runtime's own round-to-nearest; :func:`search_scales` chooses each
block's scale to minimise the (optionally activation-weighted) rounding error, :func:`refine_scales` improves it
by alternating codes and least-squares scales, and :func:`gptq` rounds along
``K`` with error compensation (GPTQ) on a given grid. All of them return values on the format's grid, so an
export stores exactly what the PyTorch simulation computes with.
"""

from __future__ import annotations

import numpy as np

from .pruning import LayerCore

PACKED_BITS = (2, 4, 8)  # MatMulNBits widths this package writes (2: ONNX Runtime's CPU kernel, ~1.7x slower than 4)
CLIP_RATIOS = np.linspace(1.0, 0.5, 26)  # block scales tried by search_scales, as fractions of the max-abs scale


def _blocks(matrix: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N] -> [blocks, block_size, N]``, zero-padded along ``K``."""
    k, n = matrix.shape
    padded = np.concatenate([matrix, np.zeros(((-k) % block_size, n), dtype=matrix.dtype)])
    return padded.reshape(-1, block_size, n)


def max_abs_scales(matrix: np.ndarray, bits: int, block_size: int = 32) -> np.ndarray:
    """ONNX Runtime's symmetric scales ``[blocks, N]``: the block's entry of largest magnitude maps to
    ``-2^(bits-1)`` (so the scale carries its sign); 1 for an all-zero block."""
    blocks = _blocks(matrix, block_size)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0]  # signed
    return np.where(largest == 0, 1.0, largest / -(2 ** (bits - 1)))


def _block_codes(blocks: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes of ``blocks [blocks, block_size, N]`` on ``scales [blocks, N]``, clipped to the int range."""
    limit = 2 ** (bits - 1)
    return np.clip(np.round(blocks / scales[:, None, :]), -limit, limit - 1)


def codes(matrix: np.ndarray, scales: np.ndarray, bits: int, block_size: int = 32) -> np.ndarray:
    """Signed integer codes ``[K, N]`` in ``[-2^(bits-1), 2^(bits-1) - 1]`` of ``matrix`` on the grid ``scales``."""
    q = _block_codes(_blocks(matrix, block_size), scales, bits)
    return q.reshape(-1, matrix.shape[1])[:matrix.shape[0]]


def dequantize(q: np.ndarray, scales: np.ndarray, block_size: int = 32) -> np.ndarray:
    """The values ``q * scale`` ``[K, N]`` that MatMulNBits multiplies by."""
    k = q.shape[0]
    return (_blocks(q, block_size) * scales[:, None, :]).reshape(-1, q.shape[1])[:k]


def pack_matmulnbits(q: np.ndarray, scales: np.ndarray, bits: int, block_size: int = 32
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits``'s symmetric inputs for signed codes ``q [K, N]`` on ``scales [blocks, N]``: ``B`` uint8
    ``[N, blocks, block_size * bits / 8]`` (codes + ``2^(bits-1)``, low bits first) and scales float32
    ``[N, blocks]`` (as the genai builder stores them; ``GatherBlockQuantized`` reads the same two for a tied
    table); no zero points (the kernels' default ``2^(bits-1)``, the fast path)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"MatMulNBits packs {', '.join(map(str, PACKED_BITS))} bits here, not {bits}")
    unsigned = (_blocks(q, block_size) + 2 ** (bits - 1)).astype(np.uint8)  # [blocks, block_size, N]
    per_column = unsigned.transpose(2, 0, 1)  # [N, blocks, block_size]
    per_byte = 8 // bits
    packed = np.zeros_like(per_column[..., 0::per_byte])
    for j in range(per_byte):  # code j of each byte in bits [j * bits, (j + 1) * bits)
        packed |= per_column[..., j::per_byte] << (j * bits)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales.T.astype(np.float32))


def unpack_matmulnbits(data: np.ndarray, scales: np.ndarray, k: int, bits: int, block_size: int = 32
                       ) -> np.ndarray:
    """The values ``[K, N]`` that symmetric ``MatMulNBits`` inputs (``data`` ``[N, blocks, block_size * bits / 8]``,
    ``scales`` ``[N, blocks]``; or a ``GatherBlockQuantized`` table's same two) multiply by: the inverse of
    :func:`pack_matmulnbits`."""
    per_column = np.asarray(data, dtype=np.uint8).reshape(data.shape[0], -1)  # [N, blocks * block_size * bits / 8]
    mask = (1 << bits) - 1  # low bits first
    per_column = np.stack([(per_column >> (j * bits)) & mask for j in range(8 // bits)], axis=-1
                          ).reshape(per_column.shape[0], -1)
    q = per_column[:, :k].T.astype(np.float64) - 2 ** (bits - 1)  # [K, N] signed codes
    return dequantize(q, np.asarray(scales, dtype=np.float64).reshape(q.shape[1], -1).T, block_size)


def blockwise_round(matrix: np.ndarray, bits: int, block_size: int = 32) -> np.ndarray:
    """What ``MatMulNBits`` computes with for ``x @ matrix`` (``matrix [K, N]``) after ONNX Runtime's symmetric
    round-to-nearest quantiser, as the genai builder writes it (equal to it to float rounding, tested)."""
    scales = max_abs_scales(matrix, bits, block_size)
    return dequantize(codes(matrix, scales, bits, block_size), scales, block_size).astype(matrix.dtype)


def _row_weights(importance: np.ndarray | None, k: int, block_size: int) -> np.ndarray:
    """``importance [K]`` (uniform when None) as ``[blocks, block_size, 1]``, zero-padded like :func:`_blocks`."""
    weight = np.ones(k) if importance is None else np.asarray(importance, dtype=np.float64)
    return _blocks(weight[:, None], block_size)


def _weighted_error(blocks: np.ndarray, weight: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``sum_k weight_k (w_k - q_k s)^2`` per block and column ``[blocks, N]`` of codes ``q`` on ``scales``."""
    return np.sum(weight * (blocks - q * scales[:, None, :]) ** 2, axis=1)


def search_scales(matrix: np.ndarray, bits: int, block_size: int = 32, importance: np.ndarray | None = None,
                  ratios: np.ndarray = CLIP_RATIOS) -> np.ndarray:
    """Per block and column, the scale ``r * max_abs_scale`` (``r`` in ``ratios``) whose rounding error
    ``sum_k importance_k (w_k - q_k)^2`` is least (``importance [K]``: e.g. the mean squared input of each row,
    as activation-aware quantisers weigh it; uniform when None). Returns ``[blocks, N]``."""
    base = max_abs_scales(matrix, bits, block_size)
    blocks, weight = _blocks(matrix, block_size), _row_weights(importance, matrix.shape[0], block_size)
    best, best_error = base, np.full(base.shape, np.inf)
    for ratio in ratios:
        scales = base * ratio
        error = _weighted_error(blocks, weight, _block_codes(blocks, scales, bits), scales)
        better = error < best_error
        best, best_error = np.where(better, scales, best), np.where(better, error, best_error)
    return best


def refine_scales(matrix: np.ndarray, scales: np.ndarray, bits: int, block_size: int = 32,
                  importance: np.ndarray | None = None, iterations: int = 4) -> np.ndarray:
    """Alternate codes and scales (Lloyd-style): with the codes fixed, each block's weighted least-squares scale
    ``sum_k i_k w_k q_k / sum_k i_k q_k^2``, then the codes on it; a block keeps its best scale so far, so the
    weighted rounding error never grows from ``scales`` ``[blocks, N]``. Returns ``[blocks, N]``."""
    blocks, weight = _blocks(matrix, block_size), _row_weights(importance, matrix.shape[0], block_size)
    best, best_error, current = scales, np.full(scales.shape, np.inf), scales
    for _ in range(iterations + 1):  # the given scales, then ``iterations`` fitted ones
        q = _block_codes(blocks, current, bits)
        error = _weighted_error(blocks, weight, q, current)
        better = error < best_error
        best, best_error = np.where(better, current, best), np.where(better, error, best_error)
        norm = np.sum(weight * q * q, axis=1)
        fitted = np.sum(weight * blocks * q, axis=1) / np.where(norm > 0, norm, 1.0)
        current = np.where((norm > 0) & (fitted != 0), fitted, best)
    return best


def gptq(matrix: np.ndarray, hessian: np.ndarray, scales: np.ndarray, bits: int, block_size: int = 32,
         damping: float = 0.01) -> np.ndarray:
    """GPTQ (Frantar et al. 2023) on a fixed grid: quantise the rows of ``matrix [K, N]`` in order and push each
    row's rounding error onto the rows not yet quantised through the inverse of the damped input Gram
    ``hessian [K, K]`` (``damping`` times its mean diagonal). Returns the dequantised ``[K, N]`` on ``scales``."""
    k, n = matrix.shape
    limit = 2 ** (bits - 1)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damping * float(np.mean(np.diag(h))) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # U with H^-1 = U^T U: row i holds the updates of row i
    w = np.array(matrix, dtype=np.float64)
    w[dead] = 0.0
    row_scales = np.repeat(scales, block_size, axis=0)[:k]  # [K, N]
    out = np.empty_like(w)
    for i in range(k):
        q = np.clip(np.round(w[i] / row_scales[i]), -limit, limit - 1) * row_scales[i]
        out[i] = q
        w[i + 1:] -= np.outer(upper[i, i + 1:] / upper[i, i], w[i] - q)
    return out.astype(matrix.dtype)


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


def stored_bytes(k: int, n: int, bits: int, block_size: int) -> int:
    """Bytes :func:`pack_matmulnbits` writes for a ``[K, N]`` weight: the codes (``K`` padded to whole blocks) and
    one float32 scale per block and column."""
    blocks = -(-k // block_size)
    return n * blocks * (block_size * bits // 8 + 4)
