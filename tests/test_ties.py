"""Plans do not depend on the last bits of their inputs (issue 16: a tie decided by OpenBLAS's kernel).

The ONNX-input path and ``compress`` compute the same statistics in two runtimes, and one machine's
BLAS kernel differs from another's in the last bits: every discrete choice must come out the same.
"""

import numpy as np
import pytest

from lestd_export.numerics.planner import TuckerRequest, compress_layers
from lestd_export.numerics.pruning import SliceGroups, allocate, element_masks_for_density
from lestd_export.numerics.ties import TIE_RTOL, descending_order, first_best, improves, snap

GROUPS = SliceGroups(("q", "k", "v", "o"), (4, 2, 2, 4))


def rank_deficient_tensor(rank=16, d=48, dh=16, seed=0):
    """A layer whose slices share a ``rank``-dim column space: every R1 >= rank keeps exactly the
    same energy, so the rank choice between them is a tie that only rounding can break."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    return np.einsum("da,sab->sdb", basis, rng.standard_normal((GROUPS.total, rank, dh)) * 0.9 ** np.arange(dh))


def last_bit_copies(w, count=6):
    """``w`` with each entry moved by a few ulps, as another BLAS kernel or runtime would compute it."""
    rng = np.random.default_rng(1)
    return [w * (1.0 + 4e-16 * rng.standard_normal(w.shape)) for _ in range(count)]


def plan(layer, request):
    core = compress_layers([layer], GROUPS, request)[0]
    return core.ranks, {name: None if g.rows is None else g.rows.tolist() for name, g in core.groups.items()}


@pytest.mark.parametrize("plain_layout", [True, False])
def test_planner_near_tie_between_r1_choices_is_decided_the_same_way(plain_layout):
    w = rank_deficient_tensor()
    request = TuckerRequest(size_fraction=0.6, plain_layout=plain_layout)
    plans = [plan(copy, request) for copy in last_bit_copies(w)]
    assert all(p == plans[0] for p in plans)
    assert plans[0][0][0] >= 16  # the tie is real: every candidate from R1 = 16 on keeps all the energy


def test_near_tied_rank_scores_go_to_the_first_candidate():
    scores = [1.0, 3.0, 3.0 * (1 + 1e-15), 3.0 * (1 - 1e-15), 2.0]
    assert first_best(scores) == 1
    assert first_best([1.0, 3.0, 3.0 * (1 + 10 * TIE_RTOL)]) == 2  # a real difference still wins


def test_allocate_near_tie_at_the_budget_edge_goes_to_the_earlier_group():
    for eps in (1e-15, -1e-15, 0.0):
        gains = [np.array([4.0, 1.0]), np.array([4.0, 1.0 + eps])]
        assert allocate(gains, [1.0, 1.0], budget=3.0).tolist() == [2, 1]


def test_descending_order_breaks_near_ties_by_position():
    values = np.array([1.0, 5.0, 5.0 * (1 - 1e-14), 5.0 * (1 + 1e-14), 0.0])
    assert descending_order(values).tolist() == [1, 2, 3, 0, 4]
    assert snap(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_refit_keeps_the_plan_on_a_near_tie():
    assert not improves(1.0 - 1e-12, 1.0) and improves(0.99, 1.0)


def test_element_masks_near_tie_at_the_edge_keep_the_same_entries():
    core = np.random.default_rng(3).uniform(-1, 1, (GROUPS.total, 8, 4))
    core.flat[[5, 50, 90, 140, 200]] = [10.0, 11.0, 12.0, 13.0, 14.0]
    core.flat[[30, 300]] = 3.0  # an exact tie for the sixth place, broken differently by each copy's last bits
    masks = [element_masks_for_density([copy], [1.0], 6 / core.size)[0] for copy in last_bit_copies(core, 4)]
    assert all(np.array_equal(m, masks[0]) for m in masks)
    assert masks[0].sum() == 6 and masks[0].flat[30] and not masks[0].flat[300]


def test_greedy_check_tolerates_only_real_ties():
    import torch
    from tiny import assert_same_greedy, tiny_model

    model = tiny_model("llama-gqa")
    with torch.no_grad():
        expected = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = expected.numpy()
    assert_same_greedy(expected.copy(), expected, model)
    wrong = expected.copy()
    wrong[0, 5] = (wrong[0, 5] + 1) % 128
    with pytest.raises(AssertionError, match="step 5"):
        assert_same_greedy(wrong, expected, model)
    assert_same_greedy(wrong, expected, model, tie=1e9)  # everything is a tie at an absurd tolerance
