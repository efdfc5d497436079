"""Per-matrix truncated SVD baseline: ``W ~ A B`` for each of Q, K, V, O separately.

Storage per matrix of shape ``[in, out]`` at rank ``r`` is ``r (in + out)`` entries. Ranks are
shared out (per layer, or over all layers for a global budget) by the same greedy allocator as the
Tucker planner: each singular value is a step whose gain is ``sigma^2 / ||W||^2`` of its own
matrix, so that a low-energy matrix (GPT-2 initialises ``c_proj`` small) is not starved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .pruning import allocate


@dataclass
class LowRankMatrix:
    """``W ~ a @ b`` with ``a [in, r]`` (singular values folded in) and ``b [r, out]``."""

    a: np.ndarray
    b: np.ndarray
    energy: float
    kept_energy: float

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def entries(self) -> int:
        return int(self.a.size + self.b.size)


def svd_layers(layers: Sequence[Sequence[np.ndarray]], size_fraction: float, budget: str = "layer",
               rank: int | None = None, lefts: Sequence[Sequence[np.ndarray]] | None = None
               ) -> list[list[LowRankMatrix]]:
    """Truncated SVD of every matrix ``[in, out]`` of every layer at a matched size fraction.

    With ``rank`` given, every matrix gets ``min(rank, in, out)`` and the size fraction is ignored.
    ``lefts`` (SVD-LLM whitening, per layer and matrix): ``A = L^T`` with ``L L^T`` the Gram matrix
    of the matrix's input; the SVD is taken of ``A W`` (whose truncation error is the output error)
    and ``a = A^{-1} U_r S_r``. Energies are then output energies.
    """
    if lefts is not None:
        layers = [[left @ np.asarray(w, dtype=np.float64) for w, left in zip(mats, ls)]
                  for mats, ls in zip(layers, lefts)]
    decomposed = [[np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False) for w in mats]
                  for mats in layers]
    shapes = [[w.shape for w in mats] for mats in layers]

    if rank is not None:
        ranks = [[min(rank, *shape) for shape in layer] for layer in shapes]
    else:
        scopes = [list(range(len(layers)))] if budget == "global" else [[i] for i in range(len(layers))]
        ranks = [[0] * len(layer) for layer in layers]
        for scope in scopes:
            gains, costs, owners = [], [], []
            for i in scope:
                for j, (_, sigma, _) in enumerate(decomposed[i]):
                    gains.append(sigma**2 / np.sum(sigma**2))  # relative error: no matrix is starved
                    costs.append(sum(shapes[i][j]))
                    owners.append((i, j))
            total = size_fraction * sum(a * b for i in scope for a, b in shapes[i])
            for (i, j), r in zip(owners, allocate(gains, costs, total)):
                ranks[i][j] = int(r)

    result = []
    for i, (layer, layer_ranks) in enumerate(zip(decomposed, ranks)):
        row = []
        for j, ((u, sigma, vt), r) in enumerate(zip(layer, layer_ranks)):
            r = max(r, 1)
            a = u[:, :r] * sigma[:r]
            if lefts is not None:
                a = np.linalg.solve(lefts[i][j], a)
            row.append(LowRankMatrix(a=a, b=vt[:r].copy(), energy=float(np.sum(sigma**2)),
                                     kept_energy=float(np.sum(sigma[:r] ** 2))))
        result.append(row)
    return result
