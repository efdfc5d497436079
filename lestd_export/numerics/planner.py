"""Budget planner: turn a size fraction into ranks, kept core rows/entries and per-layer shares.

Every candidate's weight error is closed-form, so the planner never runs the model. Ranks are
chosen on the HOSVD core (whose leading sub-blocks give every truncation for free); HOOI then
refines the chosen ranks, and the final selection is redone on the HOOI core with the same cost
model, so the requested budget is met exactly (up to one allocation step).

Cost model per layer (entries, as the ONNX file stores them): ``d R1`` factor entries plus
``d_h R2`` when ``R2 < d_h`` (:func:`~.pruning.factor_cost`), plus per group ``n k R2`` values and
``k`` int32 row indices shared by its ``n`` slices (none for a dense core). Quantised storage
(:attr:`TuckerRequest.index_cost`) counts an index as the values its bytes would hold (int8: 4,
int4: 8). The plain layout (:attr:`TuckerRequest.plain_layout`, what quantisers take, see
``graft.py``) stores no whole ``U1`` and no indices: Q, K and V share their kept rows (one pruning
unit, one MatMul) and each kept row stores its ``U1`` column on the input side; each kept output-head
row stores its own copy of its ``U1`` column. There a row costs its values plus ``d``.

Objective (:data:`OBJECTIVES`): ``frobenius`` is the papers' ``||W - What||_F``. Its split between
slice groups is a gauge choice: scaling ``W_Q`` by ``a`` and ``W_K`` by ``1/a`` (or ``W_V`` by ``b``
and ``W_O`` by ``1/b``) leaves the model unchanged but moves Frobenius energy between groups, and in
trained models Q/K carry far more of it than V/O, so a Frobenius planner starves V and O.
``balanced`` weights every slice of group ``g`` (q, k, v, o of a layer) by ``w_g = E_g^{-1/2}``
(``E_g`` the group's squared Frobenius energy), rescaled by one per-layer constant so that the
weighted layer energy equals the raw one, and runs Stage I and Stage II on the weighted tensor
``W'_s = w_g W_s``. The stored core is unweighted, ``G_s = G'_s / w_g``, with the same ``U1``/``U2``,
so ``U1 G_s U2^T`` reconstructs ``W_s``, the closed-form identity holds in the weighted norm and,
slice by slice, in the plain one (``||W_s - What_s||^2 = ||W_s||^2 - ||G_s,kept||^2``). The order
of a group's rows is unchanged by its (uniform) weight; what changes is the basis, the ranks and how
many rows each group keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .metric import LayerMetric
from .refit import refit_gains
from .pruning import (
    CoreGroup,
    LayerCore,
    factor_cost,
    SliceGroups,
    allocate,
    build_dense_layer,
    build_element_layer,
    build_row_layer,
    element_masks_for_budget,
    element_masks_for_density,
    row_cost,
    row_gains,
)
from .ties import descending_order, first_best
from .tucker import hooi, hosvd_basis, project_core, reconstruct

Progress = Callable[[int], None]
MIN_FILL = 0.995  # a plan must store at least this fraction of the requested budget
OBJECTIVES = ("balanced", "frobenius", "fisher")
DEFAULT_OBJECTIVE = {"lestd": "balanced", "tensorllm": "frobenius"}


@dataclass(frozen=True)
class TuckerRequest:
    """What to compute for the Tucker methods (``lestd`` and its Stage-I-only ``tensorllm``)."""

    method: str = "lestd"  # "lestd" | "tensorllm"
    size_fraction: float | None = 0.5
    ranks: tuple[int | None, int | None] | None = None  # None inside = full rank of that mode
    core_density: float | None = None
    granularity: str = "row"  # "row" | "element"
    budget: str = "layer"  # "layer" | "global"
    tol: float = 1e-6
    max_iter: int = 10
    objective: str | None = None  # "balanced" | "frobenius" | "fisher"; None: the method's default
    balance_power: float = 1.0  # balanced: w_g = (T_g / E_g) ** (balance_power / 2), see slice_weights
    balance_mode: str = "group"  # "group" (T_g = 1) | "pair" (T_g = sqrt(E_q E_k) or sqrt(E_v E_o))
    balance_boost: tuple[tuple[str, float], ...] = ()  # (group, factor) multiplying T_g
    index_cost: int = 1  # stored values one row index costs (int32 index / value bytes)
    plain_layout: bool = False  # Q/K/V share rows; every kept row stores its U1 column (no whole U1, no index)

    def extra_row_costs(self, d: int, units: SliceGroups) -> dict[str, int]:
        """Per pruning unit (:meth:`units`), the entries a kept row costs beyond its values and index."""
        return dict.fromkeys(units.names, d) if self.plain_layout else {}

    def factor_cost(self, d: int, dh: int, rank1: int, rank2: int) -> int:
        """Entries of a layer's factors (:func:`~.pruning.factor_cost`); the plain layout pays ``U1`` per row."""
        return factor_cost(d, dh, 0 if self.plain_layout else rank1, rank2)

    def units(self, groups: SliceGroups) -> SliceGroups:
        """The pruning units: the groups, or in the plain layout Q/K/V as one unit (the slices are q, k, v, o)."""
        if not self.plain_layout:
            return groups
        inputs = sum(size for name, size in zip(groups.names, groups.sizes) if name != "o")
        return SliceGroups(("qkv", "o"), (inputs, groups.sizes[-1])) if "o" in groups.names else \
            SliceGroups(("qkv",), (inputs,))

    @property
    def row_index_cost(self) -> int:
        return 0 if self.plain_layout else self.index_cost

    @property
    def resolved_objective(self) -> str:
        objective = self.objective or DEFAULT_OBJECTIVE[self.method]
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        return objective


PAIRS = (("q", "k"), ("v", "o"))  # groups whose product the model computes (a gauge pair)


def slice_weights(w: np.ndarray, groups: SliceGroups, objective: str, power: float = 1.0,
                  mode: str = "group", boost: tuple[tuple[str, float], ...] = ()) -> np.ndarray:
    """Per-slice weights ``[S]`` of the objective (all ones for ``frobenius``).

    ``balanced``: every slice of group ``g`` gets ``w_g = (T_g / E_g)^{power/2}``, where ``E_g`` is the
    group's energy and the target ``T_g`` is 1 (``mode="group"``: every group counts the same) or, for
    ``mode="pair"``, the geometric mean ``sqrt(E_q E_k)`` of its gauge pair (q, k) or (v, o), which
    is invariant to the rescalings and keeps the pairs' natural ratio. ``boost`` multiplies named
    groups' weighted energy. One constant then makes the weighted layer energy equal the raw one.
    A group with no energy gets weight 1.
    """
    weights = np.ones(w.shape[0])
    if objective == "frobenius":
        return weights
    energy = np.sum(w**2, axis=(1, 2))
    group_energy = {name: float(energy[groups.span(name)].sum()) for name in groups.names}
    target = dict.fromkeys(groups.names, 1.0)
    if mode == "pair":
        for a, b in PAIRS:
            if a in target and b in target:
                target[a] = target[b] = float(np.sqrt(group_energy[a] * group_energy[b]))
    elif mode != "group":
        raise ValueError(f"unknown balance mode {mode!r}")
    for name, factor in boost:
        target[name] *= factor
    for name in groups.names:
        if group_energy[name] > 0:
            weights[groups.span(name)] = (target[name] / group_energy[name]) ** (power / 2)
    weighted = float(np.sum(weights**2 * energy))
    if weighted > 0:
        weights *= np.sqrt(float(energy.sum()) / weighted)
    return weights


def rank_grid(full: int, steps: int) -> np.ndarray:
    """Candidate ranks ``full/steps, 2 full/steps, ..., full`` (unique, at least 1)."""
    return np.unique(np.clip(np.round(np.linspace(full / steps, full, steps)).astype(int), 1, full))


def _row_kept(row_energy: list[np.ndarray], scales: list[float], groups: SliceGroups, rank2: int,
              budget: float, index_cost: int, gains: list[dict] | None = None,
              extra: dict[str, int] | None = None) -> tuple[float, list[dict[str, int]]]:
    """Allocate core rows of several layers (equal ranks) under one budget of stored entries.

    Returns the kept energy (sum over layers of kept / scale) and the per-layer row counts.
    ``gains`` (per layer, group -> gains in row order) override the groups' sorted row energies;
    ``extra`` (group -> entries) is added to the cost of each kept row of that group.
    """
    extra = extra or {}
    override = gains
    gains, costs = [], []
    for j, (energy, scale) in enumerate(zip(row_energy, scales)):
        for name, size, gain in zip(groups.names, groups.sizes, row_gains(energy, groups)):
            if override is not None and name in override[j]:
                gain = override[j][name]
            gains.append(gain / scale)
            costs.append(row_cost(size, rank2, index_cost) + extra.get(name, 0))
    counts = allocate(gains, costs, budget)
    kept = float(sum(g[:c].sum() for g, c in zip(gains, counts)))
    per_layer = [dict(zip(groups.names, counts[i * len(groups.names):(i + 1) * len(groups.names)].tolist()))
                 for i in range(len(row_energy))]
    return kept, per_layer


def _dense_core_fits(num_layers: int, num_slices: int, rank1: int, rank2: int, core_budget: float,
                     extra: dict[str, int] | None = None) -> bool:
    """Whether whole cores (no pruning, hence no indices) fit: then pruning has nothing to gain."""
    return num_layers * rank1 * (num_slices * rank2 + sum((extra or {}).values())) <= core_budget


def _best_ranks_row(cumulative: list[np.ndarray], scales: list[float], groups: SliceGroups, budget: float,
                    candidates: list[tuple[int, int]], rank2_options: Sequence[int],
                    request: TuckerRequest) -> tuple[int, int]:
    """Ranks (shared by the given layers) whose best row allocation keeps the most scaled energy."""
    d, dh = cumulative[0].shape[1:]
    extra = request.extra_row_costs(d, groups)
    # for each R2, the largest R1 whose whole cores fit (no indices), and the two just above it
    # (pruned), so that some candidate fills the budget to within one allocation step
    fill = []
    for r2 in rank2_options:
        r1 = int((budget / len(cumulative) - factor_cost(d, dh, 0, r2))
                 // (request.factor_cost(d, dh, 1, 0) + groups.total * r2 + sum(extra.values())))
        fill += [(r1 + j, r2) for j in range(3) if 1 <= r1 + j <= d]
    filled, fallback = {}, None
    for r1, r2 in sorted(set(candidates) | set(fill)):  # ascending ranks: a tie goes to the smaller
        factors = len(cumulative) * request.factor_cost(d, dh, r1, r2)
        core_budget = budget - factors
        if core_budget <= 0:
            continue
        if _dense_core_fits(len(cumulative), groups.total, r1, r2, core_budget, extra):
            kept = sum(float(c[:, :r1, r2 - 1].sum()) / s for c, s in zip(cumulative, scales))
            stored = factors + len(cumulative) * r1 * (groups.total * r2 + sum(extra.values()))
        else:
            kept, counts = _row_kept([c[:, :r1, r2 - 1] for c in cumulative], scales, groups, r2, core_budget,
                                     request.row_index_cost, extra=extra)
            stored = factors + sum(k * (row_cost(size, r2, request.row_index_cost) + extra.get(name, 0))
                                   for layer in counts for (name, k), size in zip(layer.items(), groups.sizes))
        fallback = fallback or (r1, r2)
        if stored >= MIN_FILL * budget:  # the size asked for is the size delivered
            filled[(r1, r2)] = kept
    if filled:  # the most kept energy; near-ties (numerics.ties) go to the smallest ranks on every machine
        return list(filled)[first_best(list(filled.values()))]
    if fallback is None:
        raise ValueError("size fraction too small: even the smallest ranks do not fit")
    return fallback


def _best_ranks_dense(cumulative: np.ndarray, budget: float, rank2_options: Sequence[int], request: TuckerRequest,
                      units: SliceGroups) -> tuple[int, int]:
    """TensorLLM: for each R2 the largest R1 whose dense core plus factors fit; keep the best energy."""
    s, d, dh = cumulative.shape
    extra = sum(request.extra_row_costs(d, units).values())  # the plain layout's U1 columns, per latent row
    options = []
    for r2 in rank2_options:
        per_row = request.factor_cost(d, dh, 1, 0) + s * r2 + extra
        r1 = min(int((budget - factor_cost(d, dh, 0, r2)) // per_row), d)
        if r1 >= 1:
            stored = factor_cost(d, dh, 0, r2) + r1 * per_row
            options.append((stored >= MIN_FILL * budget, float(cumulative[:, :r1, r2 - 1].sum()), (r1, r2)))
    if not options:
        raise ValueError("size fraction too small: even the smallest ranks do not fit")
    eligible = [option for option in options if option[0]] or options  # those that fill the budget, if any
    return eligible[first_best([kept for _, kept, _ in eligible])][2]  # near-ties: the smallest R2


def fisher_weights(groups: SliceGroups, sensitivity: dict[str, float]) -> np.ndarray:
    """Per-slice weights ``[S]`` of the ``fisher`` objective: ``w_g = sqrt(F_g)``.

    ``F_g`` is the measured mean squared gradient of the loss with respect to group ``g``'s outputs,
    so ``sum_g F_g ||X (W_g - What_g)||^2`` estimates the loss increase (a diagonal, isotropic Fisher
    approximation) in the same units for every group and layer; invariant to the Q/K and V/O
    rescalings (a scale ``a`` on the outputs divides the gradient by ``a``).
    """
    weights = np.ones(groups.total)
    for name in groups.names:
        weights[groups.span(name)] = np.sqrt(max(float(sensitivity[name]), 1e-30))
    return weights


def compress_layers(tensors: Sequence[np.ndarray], groups: SliceGroups, request: TuckerRequest,
                    progress: Progress | None = None, metrics: Sequence[LayerMetric] | None = None,
                    sensitivities: Sequence[dict[str, float]] | None = None) -> list[LayerCore]:
    """Stage I + Stage II for every layer tensor ``[S, d, d_h]`` (float64).

    ``metrics`` (one :class:`~.metric.LayerMetric` per layer, from calibration) make the objective
    the layers' output error instead of their weight error; ``sensitivities`` (per layer, group ->
    mean squared output gradient) are needed by the ``fisher`` objective. Decomposition, rank choice
    and pruning run on the transformed, weighted tensors ``w_s A W_s B_s``, where the closed-form
    identity holds (``LayerCore.weighted_energy - weighted_kept``); the returned layers store the
    factors and blocks of the original weights (see :func:`to_stored`). ``progress(n)`` is called
    after each layer's HOOI. Raises ``ValueError`` for impossible budgets.
    """
    s, d, dh = tensors[0].shape
    objective = request.resolved_objective
    transformed = list(tensors) if metrics is None else [m.apply(w) for m, w in zip(metrics, tensors)]
    if objective == "fisher":
        if sensitivities is None:
            raise ValueError("the fisher objective needs measured sensitivities: calibrate the model")
        weights = [fisher_weights(groups, x) for x in sensitivities]
    else:
        weights = [slice_weights(w, groups, objective, request.balance_power, request.balance_mode,
                                 request.balance_boost) for w in transformed]
    weighted = [w * x[:, None, None] for w, x in zip(transformed, weights)]
    weighted_energies = [float(np.sum(w**2)) for w in weighted]
    # a global budget compares layers by normalised score, except in loss units (fisher), which compare as they are
    global_scales = [1.0] * len(tensors) if objective == "fisher" else weighted_energies
    dense_entries = s * d * dh
    bases = [hosvd_basis(w) for w in weighted]
    per_slice_right = metrics is not None and metrics[0].right is not None
    rank2_options = [dh] if per_slice_right else list(range(1, dh + 1))  # per-slice B_s fold only at R2 = d_h

    if request.ranks is not None:
        r1 = request.ranks[0] or d
        r2 = request.ranks[1] or dh
        if r2 not in rank2_options:
            raise ValueError(f"the calibrated output-head metric needs R2 = d_h = {dh}: use --ranks {r1},full")
        ranks = [(r1, r2)] * len(tensors)
    elif request.core_density is not None or request.size_fraction is None:
        ranks = [(d, dh)] * len(tensors)
    else:
        candidates = [(int(a), int(b)) for a in rank_grid(d, 32) for b in rank_grid(dh, 8) if b in rank2_options]
        cumulative = [np.cumsum(project_core(w, *b) ** 2, axis=2) for w, b in zip(weighted, bases)]
        layer_budget = request.size_fraction * dense_entries
        if request.method == "tensorllm":
            ranks = [_best_ranks_dense(c, layer_budget, rank2_options, request, request.units(groups))
                     for c in cumulative]
        elif request.budget == "global":
            shared = _best_ranks_row(cumulative, global_scales, request.units(groups), layer_budget * len(tensors),
                                     candidates, rank2_options, request)
            ranks = [shared] * len(tensors)
        else:
            ranks = [_best_ranks_row([c], [1.0], request.units(groups), layer_budget, candidates, rank2_options,
                                     request) for c in cumulative]

    factors = []
    for w, basis, (r1, r2) in zip(weighted, bases, ranks):
        factors.append(hooi(w, r1, r2, tol=request.tol, max_iter=request.max_iter, init=basis))
        if progress is not None:
            progress(1)

    if request.method == "tensorllm":
        layers = [build_dense_layer(f.u1, f.u2, f.core, e, groups) for f, e in zip(factors, weighted_energies)]
    else:
        gains = None
        if metrics is not None and metrics[0].input_gram is not None and request.granularity == "row":
            gains = [_refit_row_gains(f, m, w, x, request.units(groups))
                     for f, m, w, x in zip(factors, metrics, tensors, weights)]
        layers = _select(factors, weighted_energies, global_scales, groups, request, dense_entries, gains)
    return [to_stored(layer, w, x, None if metrics is None else metrics[i], groups)
            for i, (layer, w, x) in enumerate(zip(layers, tensors, weights))]


def to_stored(layer: LayerCore, dense: np.ndarray, weights: np.ndarray, metric: LayerMetric | None,
              groups: SliceGroups) -> LayerCore:
    """Map a layer built on ``w_s A W_s B_s`` back to the original weights ``dense [S, d, d_h]``.

    ``U1 = A^{-1} U1'``; blocks are divided by ``w_s`` and, with per-slice right factors, ``U2`` is
    folded per slice (``G'_s U2'^T B_s^{-1}``, stored ``U2 = I``). ``weighted_energy``/``weighted_kept``
    keep the objective's closed form; ``energy``/``kept_energy`` describe the plain weights
    (``kept_energy`` is ``energy`` minus the plain squared error, from a reconstruction when a metric
    makes ``U1`` non-orthonormal).
    """
    u1, u2 = layer.u1, layer.u2
    right = metric is not None and metric.right is not None
    if metric is not None:
        u1 = metric.basis(u1)
    kept = {}
    for name in groups.names:
        span = groups.span(name)
        block = layer.groups[name].block  # [n, k, R2], weighted domain
        if right:
            block = metric.unright(block, layer.u2, span)  # [n, k, d_h]
        kept[name] = CoreGroup(rows=layer.groups[name].rows, block=block / weights[span][:, None, None])
    if right:
        u2 = np.eye(u2.shape[0])
    energy = float(np.sum(dense**2))
    stored = LayerCore(u1, u2, kept, energy, 0.0, layer.nnz, layer.energy, layer.kept_energy)
    if metric is None:
        stored.kept_energy = float(sum(np.sum(g.block**2) for g in kept.values()))  # orthonormal U1: exact
    else:
        stored.kept_energy = energy - float(np.sum((dense - reconstruct_layer(stored, groups)) ** 2))
    return stored


def _core_budget(size_fraction: float, dense_entries: int, factors, request: TuckerRequest) -> float:
    """Entries left for one layer's core once its factors are paid for."""
    (d, r1), (dh, r2) = factors.u1.shape, factors.u2.shape
    if size_fraction is None:  # explicit ranks and no density: keep the whole core
        return np.inf
    left = size_fraction * dense_entries - request.factor_cost(d, dh, r1, r2)
    if left <= 0:
        r1, r2 = factors.ranks
        raise ValueError(f"ranks ({r1}, {r2}) alone exceed size fraction {size_fraction}: lower the ranks")
    return left


def split_units(layer: LayerCore, groups: SliceGroups) -> LayerCore:
    """A layer selected by merged pruning units (``qkv``) with its blocks split back into the groups."""
    if set(layer.groups) == set(groups.names):
        return layer
    start, kept = 0, {}
    for name, size in zip(groups.names, groups.sizes):
        unit = layer.groups["o" if name == "o" else "qkv"]
        offset = 0 if name == "o" else start
        kept[name] = CoreGroup(rows=unit.rows, block=unit.block[offset:offset + size])
        start += size
    layer.groups = kept
    return layer


def reconstruct_layer(layer: LayerCore, groups: SliceGroups) -> np.ndarray:
    """Dense ``[S, d, d_h]`` rebuilt from a stored layer (reference and error accounting only)."""
    parts = []
    for name in groups.names:
        group = layer.groups[name]
        u1 = layer.u1 if group.rows is None else layer.u1[:, group.rows]
        parts.append(reconstruct(u1, group.block, layer.u2))
    return np.concatenate(parts)


def _refit_row_gains(factors, metric: LayerMetric, dense: np.ndarray, weights: np.ndarray,
                     groups: SliceGroups) -> dict[str, np.ndarray]:
    """Per Q/K/V group, the weighted output energy each further row (in the group's row order) keeps
    *after* the least-squares refit (:func:`~.refit.refit_gains`); the refit lowers Q/K/V errors far
    more than the output heads' (whose optimum given the rows is the projection the plan already
    makes), so allocating on these gains moves rows to where the refit cannot help."""
    basis = metric.basis(factors.u1)
    gains = {}
    for name in groups.names:
        if name == "o":
            continue
        span = groups.span(name)
        order = descending_order(np.sum(factors.core[span] ** 2, axis=(0, 2)))  # as build_row_layer keeps them
        gains[name] = refit_gains(basis[:, order], metric.input_gram, dense[span] * weights[span][:, None, None])
    return gains


def _select(factors, energies, scales_global, groups, request, dense_entries, gains=None) -> list[LayerCore]:
    """Stage II: one-shot top-k under the budget or the explicit density, on the weighted HOOI cores.

    ``energies`` are the weighted layer energies; ``scales_global`` divide the scores when all layers
    share one budget (the paper's normalised score ``g^2 / E``, or 1 in loss units). ``gains`` (per
    layer, group -> per-row gains in the group's row order) replace the row energies in the budget
    allocation where given.
    """
    scopes = [list(range(len(factors)))] if request.budget == "global" else [[i] for i in range(len(factors))]
    layers: list[LayerCore | None] = [None] * len(factors)
    for scope in scopes:
        scores = [factors[i].core for i in scope]
        scales = [scales_global[i] for i in scope] if request.budget == "global" else [1.0] * len(scope)
        r1, r2 = factors[scope[0]].ranks
        if request.granularity == "row":
            row_energy = [np.sum(c**2, axis=2) for c in scores]
            units = request.units(groups)
            if request.core_density is not None:
                budget = request.core_density * len(scope) * groups.total * r1 * r2
                _, counts = _row_kept(row_energy, scales, units, r2, budget, index_cost=0)
            else:
                budget = len(scope) * _core_budget(request.size_fraction, dense_entries, factors[scope[0]], request)
                extra = request.extra_row_costs(factors[scope[0]].u1.shape[0], units)
                if _dense_core_fits(len(scope), groups.total, r1, r2, budget, extra):
                    budget = np.inf
                _, counts = _row_kept(row_energy, scales, units, r2, budget, index_cost=request.row_index_cost,
                                      gains=None if gains is None else [gains[i] for i in scope], extra=extra)
            for i, count in zip(scope, counts):
                f = factors[i]
                layers[i] = split_units(build_row_layer(f.u1, f.u2, f.core, energies[i], units, count), groups)
        else:
            if request.core_density is not None:
                masks = element_masks_for_density(scores, scales, request.core_density)
            else:
                budget = len(scope) * _core_budget(request.size_fraction, dense_entries, factors[scope[0]], request)
                masks = element_masks_for_budget(scores, scales, groups, budget)
            for i, mask in zip(scope, masks):
                f = factors[i]
                layers[i] = build_element_layer(f.u1, f.u2, f.core, energies[i], groups, mask)
    return layers  # type: ignore[return-value]
