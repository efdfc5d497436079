"""A whole-file byte budget shared out over the weights (pure numerics).

Every weight ``W [K, N]`` (read as ``x @ W``, input Gram ``C = X^T X / T``) has a few ways to be stored
(:class:`StorageOption`): blockwise int2/int4/int8 at a MatMulNBits block size, or SVD-LLM's whitened low-rank
factors ``W ~ A B`` stored in int4 (:func:`low_rank_factors`). Each option's cost is its exact stored bytes and its
error the calibration output error ``tr((W - What)^T C (W - What))`` of the values it would store (the rounding
estimated with a short clipping search, :func:`estimate_codes`). :func:`choose_options` then picks one option per
weight to minimise the summed error, each weight's error divided by its output energy ``tr(W^T C W)`` (every
weight's relative output error counts the same), within the budget (an exact knapsack on a byte grid).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .metric import cholesky_factor
from .quantize import codes, dequantize, search_scales, stored_bytes

ESTIMATE_RATIOS = np.linspace(1.0, 0.5, 6)  # clipping ratios of the planning estimate (the quantiser tries 26)
LOW_RANK_FRACTIONS = (0.35, 0.5, 0.65, 0.8)  # low-rank options, as fractions of the weight's int4 bytes


@dataclass(frozen=True)
class StorageOption:
    """One way to store a weight: ``bits`` at ``block_size``, as low-rank factors of ``rank`` when given."""

    bits: int
    block_size: int
    rank: int | None = None
    bytes: int = 0
    error: float = 0.0  # calibration output error of the stored values

    @property
    def name(self) -> str:
        stored = f"int{self.bits} block {self.block_size}"
        return stored if self.rank is None else f"rank {self.rank} factors, {stored}"

    def to_dict(self) -> dict:
        return {"storage": self.name, "bits": self.bits, "block_size": self.block_size, "rank": self.rank,
                "bytes": self.bytes, "error": self.error}


def output_error(weight: np.ndarray, approximation: np.ndarray, gram: np.ndarray) -> float:
    """``tr(E^T C E)`` with ``E = weight - approximation`` ``[K, N]``: the mean squared output error."""
    error = weight - approximation
    return float(np.einsum("kn,kn->", error, gram @ error))


def estimate_codes(weight: np.ndarray, bits: int, block_size: int, gram: np.ndarray) -> np.ndarray:
    """The values ``[K, N]`` an activation-weighted clipping search stores for ``weight`` (the planning estimate
    of the quantiser's rounding)."""
    scales = search_scales(weight, bits, block_size, importance=np.diag(gram), ratios=ESTIMATE_RATIOS)
    return dequantize(codes(weight, scales, bits, block_size), scales, block_size)


def low_rank_factors(weight: np.ndarray, gram: np.ndarray, rank: int, damping: float = 0.01
                     ) -> tuple[np.ndarray, np.ndarray]:
    """SVD-LLM: ``weight [K, N] ~ a [K, r] @ b [r, N]`` minimising the output error, from the SVD of ``L^T W``
    (``L L^T`` the damped Gram); the singular values split evenly between the factors (both get quantised)."""
    lower = cholesky_factor(gram, damping)
    u, sigma, vt = np.linalg.svd(lower.T @ weight, full_matrices=False)
    root = np.sqrt(sigma[:rank])
    return np.linalg.solve(lower.T, u[:, :rank] * root), root[:, None] * vt[:rank]


def low_rank_bytes(k: int, n: int, rank: int, bits: int, block_size: int) -> int:
    """Stored bytes of rank-``rank`` factors ``[K, r]``, ``[r, N]`` at ``bits``."""
    return stored_bytes(k, rank, bits, block_size) + stored_bytes(rank, n, bits, block_size)


def stored_values(weight: np.ndarray, gram: np.ndarray, option: StorageOption) -> np.ndarray:
    """The values ``[K, N]`` that ``option`` would store for ``weight`` (planning estimate, :func:`estimate_codes`;
    low-rank factors multiplied out)."""
    if option.rank is None:
        return estimate_codes(weight, option.bits, option.block_size, gram)
    a, b = low_rank_factors(weight, gram, option.rank)
    return (estimate_codes(a, option.bits, option.block_size, gram)
            @ estimate_codes(b, option.bits, option.block_size, a.T @ gram @ a))


def storage_options(weight: np.ndarray, gram: np.ndarray, quantized: tuple[tuple[int, int], ...],
                    low_rank: tuple[float, ...] | None = None, factor_bits: int = 4,
                    factor_block: int = 32) -> list[StorageOption]:
    """The options of one weight ``[K, N]`` with input Gram ``gram [K, K]``: each ``(bits, block)`` of
    ``quantized``, and for each fraction in ``low_rank`` (default :data:`LOW_RANK_FRACTIONS`) low-rank factors at ``factor_bits`` of the largest rank (a
    multiple of ``factor_block``) whose bytes are at most that fraction of the weight's ``factor_bits`` bytes."""
    weight, gram = np.asarray(weight, dtype=np.float64), np.asarray(gram, dtype=np.float64)
    low_rank = LOW_RANK_FRACTIONS if low_rank is None else low_rank
    k, n = weight.shape
    options = [StorageOption(bits, block, None, stored_bytes(k, n, bits, block)) for bits, block in quantized]
    if low_rank:
        full = stored_bytes(k, n, factor_bits, factor_block)
        ranks = range(factor_block, min(k, n), factor_block)  # whole blocks: B [r, N] pads r to them
        chosen = {max((r for r in ranks if low_rank_bytes(k, n, r, factor_bits, factor_block) <= fraction * full),
                      default=None) for fraction in low_rank}
        options += [StorageOption(factor_bits, factor_block, rank, low_rank_bytes(k, n, rank, factor_bits,
                                                                                  factor_block))
                    for rank in sorted(chosen - {None})]
    return [replace(o, error=output_error(weight, stored_values(weight, gram, o), gram)) for o in options]


def choose_options(options: list[list[StorageOption]], budget: int, losses: list[list[float]] | None = None,
                   resolution: int = 20000) -> list[int]:
    """One option index per weight minimising the summed loss of the chosen options (``losses[i][j]``, default
    their errors) with total bytes ``<= budget``: the
    multiple-choice knapsack solved exactly by dynamic programming over the budget in ``resolution`` units (each
    option's bytes rounded up to whole units, so the choice always fits; exact when a unit is one byte). Raises
    ValueError when even the smallest options exceed ``budget``."""
    losses = [[o.error for o in opts] for opts in options] if losses is None else losses
    smallest = sum(min(o.bytes for o in opts) for opts in options)
    if smallest > budget:
        raise ValueError(f"even the smallest storage of every weight ({smallest} bytes) exceeds the budget of "
                         f"{budget} bytes")
    unit = max(1, -(-budget // resolution))
    units = budget // unit
    best = np.zeros(units + 1)  # best[b]: least error of the weights so far within b units
    picks = []
    for loss, opts in zip(losses, options):
        steps = [-(-o.bytes // unit) for o in opts]
        candidates = np.full((len(opts), units + 1), np.inf)
        for j, step in enumerate(steps):
            if step <= units:
                candidates[j, step:] = best[:units + 1 - step] + loss[j]
        picks.append(np.argmin(candidates, axis=0).astype(np.int16))  # ties: the first (callers list small first)
        best = candidates[picks[-1], np.arange(units + 1)]
    choice, left = [], units
    for opts, pick in zip(reversed(options), reversed(picks)):
        j = int(pick[left])
        choice.append(j)
        left -= -(-opts[j].bytes // unit)
    return choice[::-1]
