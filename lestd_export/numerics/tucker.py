"""Stage I: a shared orthonormal Tucker basis for all head slices of one attention layer.

Layout: the slice tensor is ``W[s] in R^{d x d_h}`` stacked slice-first, shape ``[S, d, d_h]``
(DESIGN.md 2.1 writes it ``d x d_h x S``; the maths is identical). We look for orthonormal
``U1 [d, R1]``, ``U2 [d_h, R2]`` and a core ``G [S, R1, R2]`` with ``W[s] ~ U1 G[s] U2^T``.

Everything is float64 numpy; nothing here knows about torch modules, Hugging Face or ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TuckerFactors:
    """Result of :func:`hooi` for one layer."""

    u1: np.ndarray  # [d, R1], orthonormal columns
    u2: np.ndarray  # [d_h, R2], orthonormal columns
    core: np.ndarray  # [S, R1, R2] = U1^T W[s] U2
    iterations: int
    converged: bool

    @property
    def ranks(self) -> tuple[int, int]:
        return self.u1.shape[1], self.u2.shape[1]


def _top_eigenvectors(gram: np.ndarray, rank: int) -> np.ndarray:
    """Leading ``rank`` eigenvectors of a symmetric PSD matrix, with a deterministic sign.

    Each vector is flipped so that its largest-magnitude entry is positive, which makes the
    result independent of the LAPACK driver's sign choice.
    """
    eigvals, eigvecs = np.linalg.eigh(gram)  # ascending
    vecs = eigvecs[:, ::-1][:, :rank]  # [n, rank], descending eigenvalues
    pivot = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[pivot, np.arange(rank)])
    signs[signs == 0] = 1.0
    return np.ascontiguousarray(vecs * signs)


def mode1_gram(w: np.ndarray) -> np.ndarray:
    """``unfold_1(W) unfold_1(W)^T = sum_s W[s] W[s]^T``, shape ``[d, d]``."""
    s, d, dh = w.shape
    flat = w.transpose(1, 0, 2).reshape(d, s * dh)
    return flat @ flat.T


def mode2_gram(w: np.ndarray) -> np.ndarray:
    """``unfold_2(W) unfold_2(W)^T = sum_s W[s]^T W[s]``, shape ``[d_h, d_h]``."""
    s, d, dh = w.shape
    flat = w.reshape(s * d, dh)
    return flat.T @ flat


def project_core(w: np.ndarray, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Core ``G[s] = U1^T W[s] U2``, shape ``[S, R1, R2]``."""
    return np.einsum("da,sde,eb->sab", u1, w, u2, optimize=True)


def hosvd_basis(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full-rank HOSVD factors (all eigenvectors, descending): ``U1 [d, d]``, ``U2 [d_h, d_h]``."""
    _, d, dh = w.shape
    return _top_eigenvectors(mode1_gram(w), d), _top_eigenvectors(mode2_gram(w), dh)


def hooi(
    w: np.ndarray,
    rank1: int,
    rank2: int,
    *,
    tol: float = 1e-6,
    max_iter: int = 10,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> TuckerFactors:
    """Higher-order orthogonal iteration with HOSVD start, computed with Gram eigendecompositions.

    ``w``: slice tensor ``[S, d, d_h]``. Stops when the relative change of ``||G||^2`` is below
    ``tol`` or after ``max_iter`` sweeps. A mode at full rank needs no update (its factor is a
    full orthogonal matrix), so with either rank full a single HOSVD step is already optimal.
    ``init`` may pass precomputed full HOSVD factors (as from :func:`hosvd_basis`).
    """
    w = np.asarray(w, dtype=np.float64)
    _, d, dh = w.shape
    if not (1 <= rank1 <= d and 1 <= rank2 <= dh):
        raise ValueError(f"ranks ({rank1}, {rank2}) must lie in [1, {d}] x [1, {dh}]")
    full1, full2 = init if init is not None else hosvd_basis(w)
    u1 = np.ascontiguousarray(full1[:, :rank1])
    u2 = np.ascontiguousarray(full2[:, :rank2])

    iterations, converged = 0, True
    if rank1 < d and rank2 < dh:
        converged = False
        previous = float(np.sum(project_core(w, u1, u2) ** 2))
        for iterations in range(1, max_iter + 1):
            y1 = w @ u2  # [S, d, R2]
            u1 = _top_eigenvectors(mode1_gram(y1), rank1)
            y2 = np.einsum("da,sde->sae", u1, w, optimize=True)  # [S, R1, d_h]
            u2 = _top_eigenvectors(mode2_gram(y2), rank2)
            energy = float(np.sum((y2 @ u2) ** 2))
            if abs(energy - previous) <= tol * max(previous, np.finfo(float).tiny):
                converged = True
                break
            previous = energy
    return TuckerFactors(u1=u1, u2=u2, core=project_core(w, u1, u2), iterations=iterations, converged=converged)


def reconstruct(u1: np.ndarray, core: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Reference (test-only) dense reconstruction ``U1 G[s] U2^T``, shape ``[S, d, d_h]``."""
    return np.einsum("da,sab,eb->sde", u1, core, u2, optimize=True)
