"""Closed-form refit of the kept core values against the dense layer's outputs (DESIGN.md 2.5).

The basis ``U1``, ``U2`` and the kept rows stay fixed; only the stored blocks change, so the
format and the size are those of the plan. With ``Xc`` the inputs of the already-compressed model
and ``Xd`` the dense model's (same tokens), a Q/K/V group minimises
``sum_s ||Xc P B_s U2^T - Xd W_s||^2`` over its blocks ``B_s [k, R2]`` (``P = U1[:, rows]``):
``B_s = (P^T Ccc P)^{-1} P^T Ccd W_s U2``. The output heads minimise
``||Hc~ M P^T - Hd W_O||^2`` over ``M [h R2, k]`` (``Hc~`` the heads in the ``U2`` basis):
``M = (Hcc~)^{-1} Hcd~ W_O P (P^T P)^{-1}``. Errors are evaluated in closed form from the Gram
matrices (``C.. = X.^T X. / N``), and a refit is kept only where it lowers the error, so it never
increases a layer's calibration output error (a ridge term ``damping`` keeps the solves stable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ties import improves


@dataclass(frozen=True)
class RefitResult:
    block: np.ndarray  # the group's new block [n, k, R2] (or the old one if the refit did not help)
    error_before: float  # output error per token, sum of squares
    error_after: float
    target: float  # ||Xd W||^2 per token: relative error = error / target


def _solve(gram: np.ndarray, rhs: np.ndarray, damping: float) -> np.ndarray:
    scale = float(np.mean(np.diag(gram))) or 1.0
    return np.linalg.solve(gram + damping * scale * np.eye(len(gram)), rhs)


def _quadratic_error(b: np.ndarray, gram_cc: np.ndarray, cross: np.ndarray, target: float) -> float:
    """``tr(B^T Gcc B) - 2 tr(B^T cross) + target`` (the squared error of ``Xc B`` against the target)."""
    return float(np.sum(b * (gram_cc @ b)) - 2.0 * np.sum(b * cross) + target)


def refit_input_group(basis: np.ndarray, u2: np.ndarray, block: np.ndarray, dense: np.ndarray, c_cc: np.ndarray,
                      c_cd: np.ndarray, c_dd: np.ndarray, damping: float = 1e-6) -> RefitResult:
    """Refit a Q/K/V group. ``basis = U1[:, rows]`` ``[d, k]``, ``block [n, k, R2]``, ``dense [n, d, d_h]``."""
    n, k, rank2 = block.shape
    targets = (dense @ u2).transpose(1, 0, 2).reshape(dense.shape[1], n * rank2)  # [d, n R2]: W_s U2 side by side
    gram = basis.T @ c_cc @ basis  # [k, k]
    cross = basis.T @ c_cd @ targets  # [k, n R2]
    target = float(np.einsum("sde,df,sfe->", dense, c_dd, dense, optimize=True))
    old = block.transpose(1, 0, 2).reshape(k, n * rank2)
    new = _solve(gram, cross, damping)
    before, after = _quadratic_error(old, gram, cross, target), _quadratic_error(new, gram, cross, target)
    if not improves(after, before):  # a near-tie keeps the plan's values, on every machine
        return RefitResult(block, before, before, target)
    return RefitResult(new.reshape(k, n, rank2).transpose(1, 0, 2), before, after, target)


def refit_output_group(basis: np.ndarray, u2: np.ndarray, block: np.ndarray, dense: np.ndarray, h_cc: np.ndarray,
                       h_cd: np.ndarray, h_dd: np.ndarray, damping: float = 1e-6) -> RefitResult:
    """Refit the output heads. ``basis = U1[:, rows]`` ``[d, k]``, ``block [h, k, R2]``, ``dense [h, d, d_h]``
    (the slices ``O_i^T``); ``h_..`` are head Grams ``[h d_h, h d_h]``."""
    h, k, rank2 = block.shape
    dh = u2.shape[0]
    lift = np.kron(np.eye(h), u2)  # [h d_h, h R2]: heads -> heads in the U2 basis
    w_o = dense.transpose(0, 2, 1).reshape(h * dh, -1)  # [h d_h, d]
    gram = lift.T @ h_cc @ lift  # [h R2, h R2]
    right = basis.T @ basis  # [k, k]
    cross = lift.T @ h_cd @ w_o @ basis  # [h R2, k]
    target = float(np.sum(w_o * (h_dd @ w_o)))
    old = block.transpose(0, 2, 1).reshape(h * rank2, k)  # M: the heads' transposed blocks stacked

    def error(m):
        return float(np.sum((gram @ m) * (m @ right)) - 2.0 * np.sum(m * cross) + target)

    new = _solve(gram, cross, damping) @ np.linalg.inv(right + damping * np.eye(k) * (np.mean(np.diag(right)) or 1.0))
    before, after = error(old), error(new)
    if not improves(after, before):  # a near-tie keeps the plan's values, on every machine
        return RefitResult(block, before, before, target)
    return RefitResult(new.reshape(h, rank2, k).transpose(0, 2, 1), before, after, target)


def refit_gains(basis: np.ndarray, gram: np.ndarray, dense: np.ndarray, damping: float = 1e-6) -> np.ndarray:
    """Output energy captured by each further column of ``basis [d, R1]`` (in that order) after the
    least-squares refit of a Q/K/V group ``dense [n, d, d_h]`` with inputs of Gram ``gram [d, d]``.

    Keeping the first ``k`` columns leaves the error ``||X W||^2 / N - sum(gains[:k])``: the gains
    are the squared rows of ``R^{-T} P^T C W`` with ``P^T C P = R^T R`` (Gram-Schmidt in the metric ``C``).
    """
    targets = dense.transpose(1, 0, 2).reshape(dense.shape[1], -1)  # [d, n d_h]
    inner = basis.T @ gram @ basis
    inner = inner + damping * (float(np.mean(np.diag(inner))) or 1.0) * np.eye(len(inner))
    upper = np.linalg.cholesky(inner).T  # R: inner = R^T R
    z = np.linalg.solve(upper.T, basis.T @ gram @ targets)  # [R1, n d_h]
    return np.sum(z**2, axis=1)
