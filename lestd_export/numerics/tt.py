"""TT-matrix (tensor-train) factorisation of a weight and its sparse-augmented form (Saten), pure numerics.

A weight ``W [K, N]`` with ``K = k_1 ... k_d`` and ``N = n_1 ... n_d`` is read as the tensor
``W[(i_1..i_d), (j_1..j_d)]`` and stored as cores ``G_t [r_{t-1}, k_t, n_t, r_t]`` (``r_0 = r_d = 1``) with
``W[i, j] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]``: ``sum_t r_{t-1} k_t n_t r_t`` entries (TT-SVD,
Oseledets 2011, on the mode pairs ``(k_t, n_t)``; TT-LLM and Saten use this layout for the FFN). TT truncation is
Frobenius-optimal per step only; unlike a low-rank product it has no whitened (output-error) form, because
``L^T W`` in TT format is not ``W`` in TT format. :func:`sparse_residual` adds Saten's unstructured sparse part: the
largest entries of ``W - TT(W)``, each stored as a value and an int32 index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def balanced_modes(size: int, count: int) -> tuple[int, ...]:
    """``count`` factors of ``size`` as equal as its divisors allow (largest first), e.g. 1536, 2 -> (48, 32)."""
    modes = []
    left = size
    for t in range(count, 1, -1):
        target = round(left ** (1 / t))
        divisor = min((d for d in range(1, left + 1) if left % d == 0), key=lambda d: (abs(d - target), -d))
        modes.append(divisor)
        left //= divisor
    modes.append(left)
    return tuple(sorted(modes, reverse=True))


def _pairs(weight: np.ndarray, in_modes: Sequence[int], out_modes: Sequence[int]) -> np.ndarray:
    """``W [K, N]`` as the tensor ``[k_1 n_1, ..., k_d n_d]`` (mode pairs adjacent)."""
    d = len(in_modes)
    tensor = weight.reshape(*in_modes, *out_modes)
    order = [axis for t in range(d) for axis in (t, d + t)]
    return tensor.transpose(order).reshape([k * n for k, n in zip(in_modes, out_modes)])


def tt_matrix(weight: np.ndarray, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
              ) -> list[np.ndarray]:
    """TT-SVD of ``weight [K, N]`` with the given modes and the ``d - 1`` inner ranks (each capped by what the
    unfolding has): cores ``[r_{t-1}, k_t, n_t, r_t]``. Exact when no rank is capped below the unfolding's rank."""
    if int(np.prod(in_modes)) != weight.shape[0] or int(np.prod(out_modes)) != weight.shape[1]:
        raise ValueError(f"modes {tuple(in_modes)} x {tuple(out_modes)} do not factor the shape {weight.shape}")
    if len(in_modes) != len(out_modes) or len(ranks) != len(in_modes) - 1:
        raise ValueError("give as many input as output modes, and one rank fewer")
    sizes = [k * n for k, n in zip(in_modes, out_modes)]
    rest = _pairs(np.asarray(weight, dtype=np.float64), in_modes, out_modes).reshape(1, -1)
    cores, left = [], 1
    for t, rank in enumerate(ranks):
        unfolding = rest.reshape(left * sizes[t], -1)
        u, sigma, vt = np.linalg.svd(unfolding, full_matrices=False)
        r = min(int(rank), len(sigma))
        cores.append(u[:, :r].reshape(left, in_modes[t], out_modes[t], r))
        rest, left = sigma[:r, None] * vt[:r], r
    cores.append(rest.reshape(left, in_modes[-1], out_modes[-1], 1))
    return cores


def tt_dense(cores: Sequence[np.ndarray]) -> np.ndarray:
    """The ``[K, N]`` matrix the cores store."""
    d = len(cores)
    result = cores[0]  # [1, k_1, n_1, r_1]
    for core in cores[1:]:
        result = np.tensordot(result, core, axes=([-1], [0]))  # [1, k_1, n_1, ..., k_t, n_t, r_t]
    result = result.reshape(result.shape[1:-1])  # [k_1, n_1, ..., k_d, n_d]
    in_axes, out_axes = list(range(0, 2 * d, 2)), list(range(1, 2 * d, 2))
    k = int(np.prod([c.shape[1] for c in cores]))
    return result.transpose(in_axes + out_axes).reshape(k, -1)


def tt_entries(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored entries of TT cores with these modes and inner ranks."""
    bounds = [1, *ranks, 1]
    return sum(bounds[t] * k * n * bounds[t + 1] for t, (k, n) in enumerate(zip(in_modes, out_modes)))


def tt_rank_for(in_modes: Sequence[int], out_modes: Sequence[int], entries: int) -> int:
    """The largest uniform inner rank whose cores hold at most ``entries`` (at least 1)."""
    rank = 1
    while tt_entries(in_modes, out_modes, [rank + 1] * (len(in_modes) - 1)) <= entries:
        rank += 1
    return rank


def sparse_residual(residual: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Saten's unstructured sparse part: the flat indices ``[count]`` (int32, sorted) and values of the ``count``
    largest-magnitude entries of ``residual``."""
    flat = residual.ravel()
    count = max(0, min(int(count), flat.size))
    indices = np.sort(np.argpartition(-np.abs(flat), count - 1)[:count]) if count else np.zeros(0, dtype=np.int64)
    return indices.astype(np.int32), flat[indices]
