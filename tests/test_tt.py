"""TT-matrix and its sparse-augmented form (numerics/tt.py): exact at full rank, entries as counted, sparse part as
the largest residual entries."""

from __future__ import annotations

import numpy as np
import pytest

from lestd_export.numerics.tt import (balanced_modes, sparse_residual, tt_dense, tt_entries, tt_matrix,
                                      tt_rank_for)


@pytest.mark.parametrize("in_modes, out_modes", [((4, 6), (8, 3)), ((2, 3, 4), (3, 2, 5))])
def test_tt_matrix_is_exact_at_full_rank_and_counts_its_entries(in_modes, out_modes):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(int(np.prod(in_modes)), int(np.prod(out_modes))))
    cores = tt_matrix(weight, in_modes, out_modes, [10**6] * (len(in_modes) - 1))
    np.testing.assert_allclose(tt_dense(cores), weight, atol=1e-10)
    ranks = [c.shape[-1] for c in cores[:-1]]
    assert sum(c.size for c in cores) == tt_entries(in_modes, out_modes, ranks)


def test_a_kronecker_product_is_tt_rank_one():
    """Closed form: with two mode pairs, ``A kron B`` is exactly TT rank 1 (Van Loan's rearrangement)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(5, 2))
    cores = tt_matrix(np.kron(a, b), (4, 5), (3, 2), [1])
    np.testing.assert_allclose(tt_dense(cores), np.kron(a, b), atol=1e-10)
    assert tt_entries((4, 5), (3, 2), [1]) == a.size + b.size


def test_truncation_error_is_the_discarded_energy_for_two_modes():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(12, 10))
    cores = tt_matrix(weight, (3, 4), (5, 2), [4])
    rearranged = weight.reshape(3, 4, 5, 2).transpose(0, 2, 1, 3).reshape(15, 8)
    sigma = np.linalg.svd(rearranged, compute_uv=False)
    assert np.sum((weight - tt_dense(cores)) ** 2) == pytest.approx(np.sum(sigma[4:] ** 2))


def test_budget_helpers():
    assert balanced_modes(1536, 2) == (48, 32) and balanced_modes(576, 2) == (24, 24)
    assert np.prod(balanced_modes(1536, 3)) == 1536
    rank = tt_rank_for((24, 24), (48, 32), 50_000)
    assert tt_entries((24, 24), (48, 32), [rank]) <= 50_000 < tt_entries((24, 24), (48, 32), [rank + 1])


def test_sparse_residual_keeps_the_largest_entries():
    residual = np.array([[0.1, -3.0, 0.2], [2.0, 0.0, -0.5]])
    indices, values = sparse_residual(residual, 2)
    assert indices.dtype == np.int32 and list(indices) == [1, 3] and list(values) == [-3.0, 2.0]
    assert sparse_residual(residual, 0)[0].size == 0


def test_tt_weight_holds_its_fraction_and_the_sparse_part_only_helps():
    """Budget as requested: the stored entries (a sparse entry as value + index) stay within the fraction; Saten's
    residual makes the error no larger than a TT of the entries left to it, and the error is what ``dense`` stores."""
    from lestd_export.numerics.tt import SATEN_SPARSE_SHARE, tt_weight

    weight = np.random.default_rng(3).normal(size=(48, 40))
    tt, saten = tt_weight(weight, 0.5), tt_weight(weight, 0.5, sparse_share=SATEN_SPARSE_SHARE)
    for stored in (tt, saten):
        assert stored.entries <= 0.5 * weight.size
        np.testing.assert_allclose(stored.energy - stored.kept_energy, np.sum((weight - stored.dense()) ** 2))
    assert saten.indices.size > 0 and saten.rank < tt.rank
    core_only = tt_weight(weight, (saten.entries - 2 * saten.indices.size) / weight.size)
    assert saten.rank == core_only.rank
    assert np.sum((weight - saten.dense()) ** 2) < np.sum((weight - core_only.dense()) ** 2)
