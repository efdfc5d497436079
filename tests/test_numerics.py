"""Ladder rungs 1-3 on pure numerics: exact at full rank, closed-form identities, budget as requested."""

import numpy as np
import pytest

from lestd_export.numerics.planner import TuckerRequest, compress_layers
from lestd_export.numerics.pruning import SliceGroups, allocate, build_element_layer, build_row_layer
from lestd_export.numerics.tucker import hooi, reconstruct

GROUPS = SliceGroups(("q", "k", "v", "o"), (4, 2, 2, 4))


def slice_tensor(seed=0, d=48, dh=16):
    rng = np.random.default_rng(seed)
    # a decaying spectrum, like trained attention weights, so truncations are meaningful
    w = rng.standard_normal((GROUPS.total, d, dh)) * (0.9 ** np.arange(dh))
    return w @ np.diag(np.linspace(1.0, 0.2, dh))


def dense_from_layer(layer, num_slices, r1):
    """Reference reconstruction of a pruned layer: scatter the kept blocks back into a full core."""
    core = np.zeros((num_slices, r1, layer.u2.shape[1]))
    for name in GROUPS.names:
        group = layer.groups[name]
        span = GROUPS.span(name)
        for i, s in enumerate(range(span.start, span.stop)):
            core[s, group.rows[i]] += group.block[i]
    return reconstruct(layer.u1, core, layer.u2)


def test_hooi_full_rank_is_exact_and_orthonormal():
    w = slice_tensor()
    f = hooi(w, 48, 16)
    assert np.allclose(reconstruct(f.u1, f.core, f.u2), w, atol=1e-10)
    assert np.allclose(f.u1.T @ f.u1, np.eye(48), atol=1e-10)
    assert np.allclose(f.u2.T @ f.u2, np.eye(16), atol=1e-10)


def test_hooi_truncated_is_orthonormal_deterministic_and_beats_hosvd():
    w = slice_tensor(1)
    first, second = hooi(w, 20, 10), hooi(w, 20, 10)
    hosvd = hooi(w, 20, 10, max_iter=0)
    assert np.allclose(first.u1.T @ first.u1, np.eye(20), atol=1e-10)
    assert np.allclose(first.u2.T @ first.u2, np.eye(10), atol=1e-10)
    assert np.array_equal(first.core, second.core) and np.array_equal(first.u1, second.u1)
    assert np.sum(first.core**2) >= np.sum(hosvd.core**2) - 1e-9
    assert first.iterations >= 1


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_closed_form_error_identity(granularity):
    w = slice_tensor(2)
    f = hooi(w, 30, 12)
    rng = np.random.default_rng(0)
    if granularity == "row":
        layer = build_row_layer(f.u1, f.u2, f.core, float(np.sum(w**2)), GROUPS, {"q": 9, "k": 20, "v": 5, "o": 14})
    else:
        keep = np.abs(f.core) > np.quantile(np.abs(f.core), 0.7)
        keep &= rng.random(keep.shape) < 0.9
        layer = build_element_layer(f.u1, f.u2, f.core, float(np.sum(w**2)), GROUPS, keep)
    measured = np.sum((w - dense_from_layer(layer, GROUPS.total, 30)) ** 2)
    closed_form = np.sum(w**2) - layer.kept_energy
    assert abs(measured - closed_form) <= 1e-8 * np.sum(w**2)
    assert layer.squared_error == pytest.approx(measured, rel=1e-8)


def test_one_shot_top_k_equals_iterative_pruning_with_refit():
    """The paper prunes 10% of survivors per round and refits survivors as <W, B>; with an orthonormal
    basis the refit returns the same values, so it keeps exactly the one-shot top-k set."""
    w = slice_tensor(3)
    f = hooi(w, 24, 12)
    u1, u2 = f.u1, f.u2
    target = int(0.2 * f.core.size)
    alive = np.ones(f.core.shape, dtype=bool)
    values = f.core.copy()
    while alive.sum() > target:
        drop = min(max(1, int(0.1 * alive.sum())), alive.sum() - target)
        scores = np.where(alive, values**2, np.inf).ravel()
        alive.ravel()[np.argsort(scores, kind="stable")[:drop]] = False
        # refit every survivor: g = <W, u1_a o u2_b o e_s>
        values = np.where(alive, np.einsum("da,sde,eb->sab", u1, w, u2), 0.0)
    one_shot = np.zeros(f.core.size, dtype=bool)
    one_shot[np.argsort(-(f.core**2).ravel(), kind="stable")[:target]] = True
    assert np.array_equal(alive.ravel(), one_shot)


def test_allocate_takes_best_ratio_first_and_respects_budget():
    gains = [np.array([10.0, 1.0]), np.array([6.0, 5.0, 0.5])]
    counts = allocate(gains, [2.0, 1.0], budget=4.0)
    # ratios: g0: 5, 0.5; g1: 6, 5, 0.5 -> take g1[0] (1), g0[0] (2), g1[1] (1) = cost 4
    assert counts.tolist() == [1, 2]


@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("budget", ["layer", "global"])
@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.35])
def test_planner_meets_size_fraction_within_one_percent(granularity, budget, fraction):
    tensors = [slice_tensor(seed) for seed in range(3)]
    layers = compress_layers(tensors, GROUPS, TuckerRequest(size_fraction=fraction, granularity=granularity,
                                                            budget=budget))
    dense = sum(w.size for w in tensors)
    achieved = sum(layer.value_entries + layer.index_entries for layer in layers) / dense
    assert 0.99 * fraction <= achieved <= fraction


def test_tensorllm_keeps_dense_core_and_fits():
    tensors = [slice_tensor(seed) for seed in range(2)]
    layers = compress_layers(tensors, GROUPS, TuckerRequest(method="tensorllm", size_fraction=0.5))
    for layer in layers:
        assert layer.index_entries == 0
        assert all(g.rows is None for g in layer.groups.values())
    assert sum(layer.value_entries for layer in layers) <= 0.5 * sum(w.size for w in tensors)


def test_lestd_error_never_worse_than_tensorllm_at_same_fraction():
    tensors = [slice_tensor(seed) for seed in range(2)]
    for fraction in (0.8, 0.5):
        lestd = compress_layers(tensors, GROUPS, TuckerRequest(size_fraction=fraction))
        tllm = compress_layers(tensors, GROUPS, TuckerRequest(method="tensorllm", size_fraction=fraction))
        assert sum(x.squared_error for x in lestd) <= sum(x.squared_error for x in tllm) * 1.0001


def test_explicit_density_keeps_that_fraction_of_rows():
    tensors = [slice_tensor(4)]
    (layer,) = compress_layers(tensors, GROUPS, TuckerRequest(ranks=(None, None), core_density=0.5,
                                                              size_fraction=None))
    assert layer.ranks == (48, 16)
    assert layer.density(GROUPS.total) == pytest.approx(0.5, abs=0.03)
