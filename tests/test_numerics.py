"""Ladder rungs 1-3 on pure numerics: exact at full rank, closed-form identities, budget as requested."""

import numpy as np
import pytest

from lestd_export.config import CompressionConfig
from lestd_export.errors import InvalidConfigError
from lestd_export.numerics.planner import TuckerRequest, compress_layers, slice_weights
from lestd_export.numerics.pruning import (
    CoreGroup,
    LayerCore,
    SliceGroups,
    allocate,
    build_element_layer,
    build_row_layer,
)
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
        rows = np.arange(r1) if group.rows is None else group.rows
        core[span, rows] = group.block
    return reconstruct(layer.u1, core, layer.u2)


def gauge_tensor(seed=0, q=1.0, k=1.0, v=1.0, o=1.0):
    """A slice tensor whose groups carry very different energies, like trained Q/K versus V/O,
    optionally rescaled per group (q*k = 1 and v*o = 1 leave the attention function unchanged)."""
    w = slice_tensor(seed)
    for name, scale in zip(GROUPS.names, (8.0 * q, 5.0 * k, 0.5 * v, 0.7 * o)):
        w[GROUPS.span(name)] *= scale
    return w


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


@pytest.mark.parametrize("objective", ["balanced", "frobenius"])
@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("budget", ["layer", "global"])
@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.35])
def test_planner_meets_size_fraction_within_one_percent(granularity, budget, fraction, objective):
    tensors = [slice_tensor(seed) for seed in range(3)]
    layers = compress_layers(tensors, GROUPS, TuckerRequest(size_fraction=fraction, granularity=granularity,
                                                            budget=budget, objective=objective))
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


@pytest.mark.parametrize("objective", ["frobenius", "balanced"])
def test_lestd_error_never_worse_than_tensorllm_at_same_fraction(objective):
    """The dense core (TensorLLM) at lower R1 is in LeSTD's search space: in the objective's own norm
    LeSTD never does worse (for ``balanced``, against TensorLLM run on the same weighted tensor)."""
    tensors = [gauge_tensor(seed) for seed in range(2)]
    for fraction in (0.8, 0.5):
        lestd = compress_layers(tensors, GROUPS, TuckerRequest(size_fraction=fraction, objective=objective))
        tllm = compress_layers(tensors, GROUPS, TuckerRequest(method="tensorllm", size_fraction=fraction,
                                                              objective=objective))
        assert (sum(x.weighted_squared_error for x in lestd)
                <= sum(x.weighted_squared_error for x in tllm) * 1.0001)


# --------------------------------------------------------------------------- balanced objective


def test_balanced_full_rank_is_exact():
    w = gauge_tensor(5)
    (layer,) = compress_layers([w], GROUPS, TuckerRequest(ranks=(None, None), size_fraction=None,
                                                          objective="balanced"))
    assert layer.ranks == (48, 16) and layer.squared_error == pytest.approx(0.0, abs=1e-8 * np.sum(w**2))
    assert np.allclose(dense_from_layer(layer, GROUPS.total, 48), w, atol=1e-9)


def test_balanced_weights_equalise_group_energy():
    w = gauge_tensor(6)
    weights = slice_weights(w, GROUPS, "balanced")
    group_energy = [np.sum((w[GROUPS.span(n)] * weights[GROUPS.span(n), None, None]) ** 2) for n in GROUPS.names]
    assert np.allclose(group_energy, group_energy[0])
    assert sum(group_energy) == pytest.approx(np.sum(w**2))  # one constant keeps the layer energy
    assert np.array_equal(slice_weights(w, GROUPS, "frobenius"), np.ones(GROUPS.total))


def test_pair_mode_balances_within_gauge_pairs_only():
    w = gauge_tensor(6)
    weights = slice_weights(w, GROUPS, "balanced", mode="pair")
    energy = {n: np.sum(w[GROUPS.span(n)] ** 2) for n in GROUPS.names}
    weighted = {n: np.sum((w[GROUPS.span(n)] * weights[GROUPS.span(n), None, None]) ** 2) for n in GROUPS.names}
    assert weighted["q"] == pytest.approx(weighted["k"]) and weighted["v"] == pytest.approx(weighted["o"])
    ratio = np.sqrt(energy["q"] * energy["k"] / (energy["v"] * energy["o"]))  # invariant to the gauge
    assert weighted["q"] / weighted["v"] == pytest.approx(ratio)


@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("fraction", [0.6, 0.35])
def test_balanced_closed_form_errors_match_reconstruction(granularity, fraction):
    """Weighted norm: ||W' - What'||^2 = ||W'||^2 - ||G'_kept||^2; plain norm, with the unweighted core
    G_s = G'_s / w_g: ||W - What||^2 = ||W||^2 - ||G_kept||^2 (the identity holds slice by slice)."""
    tensors = [gauge_tensor(seed) for seed in (7, 8)]
    layers = compress_layers(tensors, GROUPS, TuckerRequest(size_fraction=fraction, granularity=granularity,
                                                            objective="balanced"))
    for w, layer in zip(tensors, layers):
        r1 = layer.ranks[0]
        residual = w - dense_from_layer(layer, GROUPS.total, r1)
        weights = slice_weights(w, GROUPS, "balanced")
        plain = np.sum(residual**2)
        weighted = np.sum((residual * weights[:, None, None]) ** 2)
        assert layer.squared_error == pytest.approx(plain, rel=1e-8)
        assert layer.weighted_squared_error == pytest.approx(weighted, rel=1e-8)
        assert layer.weighted_energy == pytest.approx(np.sum((w * weights[:, None, None]) ** 2))
        assert 0 < layer.weighted_squared_error < layer.weighted_energy


@pytest.mark.parametrize("granularity", ["row", "element"])
@pytest.mark.parametrize("budget", ["layer", "global"])
def test_balanced_plan_is_invariant_to_gauge_rescaling(granularity, budget):
    """Q*10, K/10 (and V*3, O/3) compute the same attention: the balanced plan must not change."""
    base = [gauge_tensor(seed) for seed in (9, 10)]
    scaled = [gauge_tensor(9, q=10.0, k=0.1, v=3.0, o=1 / 3), base[1]]
    request = TuckerRequest(size_fraction=0.45, granularity=granularity, budget=budget, objective="balanced")
    first, second = compress_layers(base, GROUPS, request), compress_layers(scaled, GROUPS, request)
    for a, b in zip(first, second):
        assert a.ranks == b.ranks
        assert np.allclose(np.abs(a.u1.T @ b.u1), np.eye(a.ranks[0]), atol=1e-6)  # same basis up to sign
        for name in GROUPS.names:
            ra, rb = a.groups[name].rows, b.groups[name].rows
            assert (ra is None) == (rb is None) and (ra is None or np.array_equal(ra, rb))
        assert a.squared_error / a.energy != pytest.approx(0.0)
        assert a.weighted_squared_error / a.weighted_energy == pytest.approx(
            b.weighted_squared_error / b.weighted_energy, rel=1e-6)


def test_frobenius_plan_follows_the_gauge():
    """The plain objective is not gauge invariant: inflating Q (and deflating K) moves rows to Q."""
    request = TuckerRequest(size_fraction=0.45, objective="frobenius")
    (a,) = compress_layers([gauge_tensor(11)], GROUPS, request)
    (b,) = compress_layers([gauge_tensor(11, q=10.0, k=0.1)], GROUPS, request)
    rows = [{n: (x.ranks[0] if g.rows is None else len(g.rows)) for n, g in x.groups.items()} for x in (a, b)]
    assert rows[0] != rows[1]


# ------------------------------------------------------------------------------------ accounting


def test_factor_entries_fold_u2_at_full_r2():
    """At R2 == d_h the runtime folds U2 into the core blocks (not stored); below, U2 is stored once."""
    def layer(r1, r2):
        groups = {"q": CoreGroup(rows=None, block=np.zeros((4, r1, r2)))}
        return LayerCore(np.zeros((48, r1)), np.zeros((16, r2)), groups, 1.0, 0.0)

    assert layer(20, 16).factor_entries == 48 * 20
    assert layer(20, 12).factor_entries == 48 * 20 + 16 * 12
    assert layer(20, 16).value_entries == 48 * 20 + 4 * 20 * 16


@pytest.mark.parametrize("method", ["lestd", "tensorllm"])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_planner_fills_budget_with_new_accounting(method, fraction):
    tensors = [gauge_tensor(seed) for seed in range(3)]
    layers = compress_layers(tensors, GROUPS, TuckerRequest(method=method, size_fraction=fraction))
    dense = sum(w.size for w in tensors)
    achieved = sum(layer.value_entries + layer.index_entries for layer in layers) / dense
    assert achieved <= fraction
    if method == "lestd":
        assert achieved >= 0.99 * fraction


def test_config_objective_defaults_and_validation():
    assert CompressionConfig().objective == "balanced"
    assert CompressionConfig(method="tensorllm").objective == "frobenius"
    assert CompressionConfig(method="svd").objective is None
    assert CompressionConfig(objective="frobenius").objective == "frobenius"
    config = CompressionConfig(objective="frobenius", size_fraction=0.5)
    assert CompressionConfig.from_dict(config.to_dict()) == config
    for bad in ({"objective": "l1"}, {"method": "tensorllm", "objective": "balanced"},
                {"method": "svd", "objective": "frobenius"}, {"method": "tensorllm", "budget": "global"}):
        with pytest.raises(InvalidConfigError):
            CompressionConfig(**bad)


def test_explicit_density_keeps_that_fraction_of_rows():
    tensors = [slice_tensor(4)]
    (layer,) = compress_layers(tensors, GROUPS, TuckerRequest(ranks=(None, None), core_density=0.5,
                                                              size_fraction=None))
    assert layer.ranks == (48, 16)
    assert layer.density(GROUPS.total) == pytest.approx(0.5, abs=0.03)


def test_stored_groups_compute_the_products_they_store():
    """Equalising rescales the factors, never the product: each StoredGroup's chain equals the plain factor product."""
    from lestd_export.numerics.stored import latent_input_group, latent_output_group, low_rank_group

    rng = np.random.default_rng(4)
    d, r1, dh, r2, heads = 24, 10, 8, 4, 3
    u1, u2 = rng.standard_normal((d, r1)), np.linalg.qr(rng.standard_normal((dh, r2)))[0]
    rows = np.array([1, 3, 4, 8])
    segments = [(rng.standard_normal((4, 2 * r2)), rows, [r2, r2]),
                (rng.standard_normal((r1, r2)), None, [r2])]  # a pruned and a dense segment
    x = rng.standard_normal((5, d)) * np.linspace(0.1, 10, d)
    qkv = latent_input_group(u1, u2, segments)
    z = x @ u1
    blocks = [(z if r is None else z[:, r]) @ w for w, r, _ in segments]
    expected = np.concatenate([(b.reshape(5, -1, r2) @ u2.T).reshape(5, -1) for b in blocks], axis=1)
    np.testing.assert_allclose(qkv.apply(x), expected, rtol=1e-10)
    assert qkv.widths == [dh, dh, dh] and qkv.entries == d * r1 + sum(w.size for w, _, _ in segments)
    o_weight = rng.standard_normal((heads * r2, len(rows)))
    h = rng.standard_normal((5, heads * dh))
    out = latent_output_group(u1, u2, o_weight, rows)
    expected = (h.reshape(5, heads, dh) @ u2).reshape(5, -1) @ o_weight @ u1[:, rows].T
    np.testing.assert_allclose(out.apply(h), expected, rtol=1e-10)
    a, b = rng.standard_normal((d, 3)), rng.standard_normal((3, 7))
    np.testing.assert_allclose(low_rank_group(a, b).apply(x), x @ a @ b, rtol=1e-12)
