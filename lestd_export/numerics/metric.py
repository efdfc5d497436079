"""Data-aware norms for Stage I and II: whitening by calibration statistics (DESIGN.md 2.5).

With ``C = X^T X / N = L L^T`` the Gram matrix of a layer's attention input, the output error of a
Q/K/V slice is ``||X (W_s - What_s)||^2 / N = ||L^T (W_s - What_s)||^2``, and the output error of
output head ``i`` (slice ``O_i^T [d, d_h]``, input ``H_i``) is ``||(O_i^T - Ohat_i^T) L_i||^2`` with
``H_i^T H_i / N = L_i L_i^T``. A :class:`LayerMetric` holds one left factor ``A = L^T`` shared by
all slices (so that one basis ``U1 = A^{-1} U1'`` serves every head; on the output heads, whose
``d`` mode is the output side, this uses the layer's input statistics as the compromise metric)
and optional per-slice right factors ``B_s`` (identity for Q/K/V, ``L_i`` for the output heads).

Stage I and II then run on ``W'_s = A W_s B_s`` exactly as in the data-free case: HOOI gives an
orthonormal ``U1'``, ``U2'`` and the closed-form identity ``||W' - What'||^2 = ||W'||^2 - ||G'_kept||^2``
holds in this norm. Stored factors map back: ``U1 = A^{-1} U1'`` (no longer orthonormal) and, per
slice, ``G_s = G'_s U2'^T B_s^{-1}`` with ``U2`` folded (right factors need ``R2 = d_h``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cholesky_factor(gram: np.ndarray, damping: float) -> np.ndarray:
    """Lower ``L`` with ``L L^T = gram + damping * mean(diag(gram)) * I`` (float64)."""
    gram = np.asarray(gram, dtype=np.float64)
    scale = float(np.mean(np.diag(gram))) or 1.0
    jitter = damping * scale
    for _ in range(8):  # a Gram of fewer tokens than dimensions is singular: raise the damping until it factors
        try:
            return np.linalg.cholesky(gram + jitter * np.eye(len(gram)))
        except np.linalg.LinAlgError:
            jitter = max(jitter * 10, 1e-10 * scale)
    raise ValueError("the calibration Gram matrix is not positive definite even with damping: "
                     "use more calibration tokens")


@dataclass(frozen=True)
class LayerMetric:
    """``||A (W_s - What_s) B_s||_F`` per slice of a layer tensor ``[S, d, d_h]``."""

    left: np.ndarray  # A [d, d]: L^T (upper triangular), a symmetric Gram power, or I
    right: np.ndarray | None = None  # [S, d_h, d_h] lower triangular B_s, or None (identity)
    input_gram: np.ndarray | None = None  # [d, d] C of the Q/K/V input: row gains after the refit (planner)

    def apply(self, w: np.ndarray) -> np.ndarray:
        """``W'_s = A W_s B_s``, shape ``[S, d, d_h]``."""
        out = np.einsum("ab,sbe->sae", self.left, w, optimize=True)
        return out if self.right is None else out @ self.right

    def basis(self, u1_white: np.ndarray) -> np.ndarray:
        """Stored ``U1 = A^{-1} U1'`` ``[d, R1]`` ."""
        return np.linalg.solve(self.left, u1_white)

    def unright(self, core: np.ndarray, u2: np.ndarray, span: slice = slice(None)) -> np.ndarray:
        """Per-slice ``G'_s U2'^T B_s^{-1}`` ``[n, k, d_h]`` for the slices ``span`` (``U2`` folded; ``R2 = d_h``)."""
        folded = core @ u2.T  # [n, k, d_h]
        if self.right is None:
            return folded
        return np.stack([np.linalg.solve(b.T, f.T).T for b, f in zip(self.right[span], folded)])  # f B_s^{-1}


def gram_power(gram: np.ndarray, power: float, damping: float) -> np.ndarray:
    """Symmetric ``(gram + damping mean(diag) I)^power`` via an eigendecomposition."""
    gram = np.asarray(gram, dtype=np.float64)
    eigvals, eigvecs = np.linalg.eigh(gram + damping * (float(np.mean(np.diag(gram))) or 1.0) * np.eye(len(gram)))
    return (eigvecs * np.clip(eigvals, 1e-300, None) ** power) @ eigvecs.T


def layer_metric(x_gram: np.ndarray, h_gram: np.ndarray | None, sizes: tuple[int, int, int, int], head_dim: int,
                 damping: float, input_power: float = 1.0) -> LayerMetric:
    """Metric from a layer's input Gram ``[d, d]`` and head Gram ``[h d_h, h d_h]`` (block diagonal part).

    ``input_power`` ``p`` sets the shared left factor: ``A = L^T`` (Cholesky) at ``p = 1`` (the
    Q/K/V output error exactly), ``A = I`` at ``p = 0``, the symmetric ``C^{p/2}`` between. The left
    factor is shared with the output heads, whose ``d`` mode is the output side: in trained models a
    few input dimensions carry hundreds of times the median energy, and full whitening then spends
    the output heads' budget on those dimensions (measured in ``benchmarks/calibration_quality.py``).
    ``sizes`` are the q, k, v, o slice counts; Q/K/V slices get ``B_s = I``, output head ``i`` gets
    the Cholesky factor of its diagonal block of the head Gram. ``h_gram=None``: no right factors.
    """
    d = len(x_gram)
    if input_power == 1.0:
        left = cholesky_factor(x_gram, damping).T
    elif input_power == 0.0:
        left = np.eye(d)
    else:
        left = gram_power(x_gram, input_power / 2, damping)
    if h_gram is None:
        return LayerMetric(left, None, x_gram)
    n_q, n_k, n_v, n_o = sizes
    eye = np.eye(head_dim)
    right = [eye] * (n_q + n_k + n_v)
    for i in range(n_o):
        block = h_gram[i * head_dim:(i + 1) * head_dim, i * head_dim:(i + 1) * head_dim]
        right.append(cholesky_factor(block, damping))
    return LayerMetric(left, np.stack(right), x_gram)
