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
from dataclasses import dataclass

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


SATEN_SPARSE_SHARE = 0.25  # Saten: the share of a weight's stored entries its sparse residual gets (2 per entry)


@dataclass
class TTWeight:
    """A weight ``W [K, N]`` stored as TT-matrix cores (modes ``in_modes`` x ``out_modes``) and, for Saten, a sparse
    residual: flat int32 ``indices`` into ``W`` and their ``values``. ``energy``/``kept_energy`` as
    :class:`~.lowrank.LowRankMatrix` (Frobenius)."""

    cores: list[np.ndarray]
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray
    energy: float
    kept_energy: float

    @property
    def rank(self) -> int:
        return int(self.cores[0].shape[-1])

    @property
    def entries(self) -> int:
        """Stored entries: the cores' values, and a value and an index per sparse entry."""
        return int(sum(c.size for c in self.cores) + 2 * self.indices.size)

    def dense(self) -> np.ndarray:
        """The ``[K, N]`` matrix stored."""
        result = tt_dense(self.cores).ravel()
        result[self.indices] += self.values
        return result.reshape(int(np.prod(self.in_modes)), int(np.prod(self.out_modes)))


def tt_weight(weight: np.ndarray, fraction: float, pairs: int = 2, sparse_share: float = 0.0) -> TTWeight:
    """``weight [K, N]`` in ``fraction`` of its entries: TT-SVD on ``pairs`` balanced mode pairs at the largest uniform
    rank that fits, and (``sparse_share`` > 0, Saten) that share of the entries as the residual's largest entries."""
    weight = np.asarray(weight, dtype=np.float64)
    k, n = weight.shape
    entries = int(fraction * k * n)
    sparse = int(sparse_share * entries) // 2
    in_modes, out_modes = balanced_modes(k, pairs), balanced_modes(n, pairs)
    cores = tt_matrix(weight, in_modes, out_modes, [tt_rank_for(in_modes, out_modes, entries - 2 * sparse)]
                      * (pairs - 1))
    residual = weight - tt_dense(cores)
    indices, values = sparse_residual(residual, sparse)
    energy = float(np.sum(weight ** 2))
    error = float(np.sum(residual ** 2) - np.sum(values ** 2))
    return TTWeight(cores, in_modes, out_modes, indices, values, energy, energy - error)
