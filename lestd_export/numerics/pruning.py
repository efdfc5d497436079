"""Stage II: closed-form importance, one-shot pruning and the stored-format accounting.

The rank-one basis tensors ``u1_a o u2_b o e_s`` are orthonormal, so pruning a set of core entries
adds exactly the sum of their squares to ``||W - What||^2``. Importance is therefore ``g^2``
(``element`` granularity, the paper) or a core row's sum of squares over the slices of its group
(``row`` granularity), divided by the layer energy ``E = ||W||^2`` when layers compete for one
global budget.

Stored format (DESIGN.md 3, with one measured change): each *group* of slices (the query heads,
key heads, value heads or output heads of one layer) keeps a set of ``k`` core rows *shared by all
its slices*, stored as indices ``[k]`` plus a dense block ``[n, k, R2]``; element pruning stores the
union of the touched rows with zeros inside. Shared rows make a group one leading-axis Gather and
one 2-D Gemm in ONNX Runtime; per-slice rows need a batched per-head MatMul that ran 1.1-2x slower
in a decode step and 1.5-4x in a prefill at equal bytes (README, "Performance").

Factors (:func:`factor_cost`): ``U1`` is always stored (``d R1`` entries). When ``R2 == d_h`` the
runtime layout folds ``U2`` into the core blocks, so ``U2`` is not stored at all; when ``R2 < d_h``
it is stored once (``d_h R2`` entries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ties import descending_order

INDEX_BYTES = 4  # indices are stored as int32; an index entry costs as much as an fp32 value


def factor_cost(d: int, dh: int, rank1: int, rank2: int) -> int:
    """Stored factor entries of one layer: ``d R1``, plus ``d_h R2`` when ``R2 < d_h``.

    At ``R2 == d_h`` the layout folds ``U2`` into the core blocks (no ``U2`` is stored); below full
    rank one ``U2`` serves both sides (read through ``Gemm(transB=1)`` on the Q/K/V side).
    """
    return int(d * rank1 + (0 if rank2 >= dh else dh * rank2))


@dataclass(frozen=True)
class SliceGroups:
    """Names and sizes of the consecutive slice groups of a layer tensor, e.g. q=9, k=3, v=3, o=9."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def span(self, name: str) -> slice:
        start = 0
        for group, size in zip(self.names, self.sizes):
            if group == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass
class CoreGroup:
    """Kept core rows of one slice group. ``rows is None`` means all ``R1`` rows (a dense core)."""

    rows: np.ndarray | None  # [k] int, ascending, shared by the group's n slices
    block: np.ndarray  # [n, k, R2]; zeros where element pruning removed entries

    @property
    def values(self) -> int:
        return int(self.block.size)

    @property
    def index_entries(self) -> int:
        return 0 if self.rows is None else int(self.rows.size)


@dataclass
class LayerCore:
    """Compressed representation of one layer: shared factors and per-group core blocks."""

    u1: np.ndarray  # [d, R1]
    u2: np.ndarray  # [d_h, R2]
    groups: dict[str, CoreGroup]
    energy: float  # ||W||_F^2 of the dense slices
    kept_energy: float  # ||G_kept||_F^2
    nnz: int = field(default=0)  # nonzero kept core entries
    # the objective the planner optimised (``balanced``: slice group g weighted by w_g); ``None``
    # when it is the plain Frobenius norm. ``||W' - What'||^2 = weighted_energy - weighted_kept``.
    weighted_energy: float | None = None
    weighted_kept: float | None = None

    @property
    def ranks(self) -> tuple[int, int]:
        return self.u1.shape[1], self.u2.shape[1]

    @property
    def factor_entries(self) -> int:
        """Stored factor entries (:func:`factor_cost`): ``U2`` is folded away at ``R2 == d_h``."""
        (d, r1), (dh, r2) = self.u1.shape, self.u2.shape
        return factor_cost(d, dh, r1, r2)

    @property
    def value_entries(self) -> int:
        """Factor entries plus stored core values (zeros inside kept rows included)."""
        return self.factor_entries + sum(g.values for g in self.groups.values())

    @property
    def index_entries(self) -> int:
        return sum(g.index_entries for g in self.groups.values())

    @property
    def squared_error(self) -> float:
        """Closed form ``||W - What||^2 = ||W||^2 - ||G_kept||^2``."""
        return max(self.energy - self.kept_energy, 0.0)

    @property
    def weighted_squared_error(self) -> float:
        """Closed-form error in the planner's objective norm (the plain one without weights)."""
        if self.weighted_energy is None or self.weighted_kept is None:
            return self.squared_error
        return max(self.weighted_energy - self.weighted_kept, 0.0)

    def density(self, num_slices: int) -> float:
        r1, r2 = self.ranks
        return self.nnz / float(num_slices * r1 * r2)


def allocate(gains: list[np.ndarray], costs: list[float], budget: float) -> np.ndarray:
    """Greedy knapsack over groups with non-increasing marginal gains.

    ``gains[g][j]`` is what the ``j``-th step of group ``g`` adds; each step of ``g`` costs
    ``costs[g]``. Steps are taken in order of gain per cost while the running cost fits
    ``budget``; returns the number of steps per group. Exact for concave gains up to one step.
    Ratios within :data:`~.ties.TIE_RTOL` of the largest are taken in group order.
    """
    ratios = np.concatenate([np.asarray(g, dtype=np.float64) / c for g, c in zip(gains, costs)])
    owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(gains)])
    step_cost = np.asarray(costs, dtype=np.float64)[owner]
    order = descending_order(ratios)  # near-equal ratios: the earlier group first, on every machine
    taken = np.cumsum(step_cost[order]) <= budget + 1e-9
    return np.bincount(owner[order][taken], minlength=len(gains))


def row_gains(row_energy: np.ndarray, groups: SliceGroups) -> list[np.ndarray]:
    """Marginal kept energy of each group's ``k``-th best shared row, descending, shape ``[R1]`` each.

    ``row_energy [S, R1]`` holds each slice's core-row sums of squares; a group's row (the pruning
    unit) gains the sum over its slices.
    """
    return [-np.sort(-row_energy[groups.span(name)].sum(axis=0)) for name in groups.names]


def row_cost(group_size: int, rank2: int, index_cost: int = 1) -> int:
    """Stored entries of one kept row of a group: its values in every slice plus one shared index."""
    return group_size * rank2 + index_cost


def _top_rows(row_score: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[k]`` of the ``k`` best rows, ascending (for memory locality); near-ties: the lower index."""
    return np.sort(descending_order(row_score)[:k])


def build_row_layer(
    u1: np.ndarray, u2: np.ndarray, core: np.ndarray, energy: float, groups: SliceGroups, counts: dict[str, int]
) -> LayerCore:
    """Keep the ``counts[g]`` highest-energy core rows of each group, shared by all its slices.

    A group that keeps all ``R1`` rows is stored without indices (a dense core block).
    """
    kept = {}
    kept_energy, nnz = 0.0, 0
    for name in groups.names:
        sub = core[groups.span(name)]  # [n, R1, R2]
        if counts[name] >= sub.shape[1]:
            rows, block = None, sub.copy()
        else:
            rows = _top_rows(np.sum(sub**2, axis=(0, 2)), counts[name])
            block = sub[:, rows]  # [n, k, R2]
        kept[name] = CoreGroup(rows=rows, block=block)
        kept_energy += float(np.sum(block**2))
        nnz += int(np.count_nonzero(block))
    return LayerCore(u1, u2, kept, energy, kept_energy, nnz)


def build_dense_layer(u1: np.ndarray, u2: np.ndarray, core: np.ndarray, energy: float, groups: SliceGroups) -> LayerCore:
    """Stage I only (TensorLLM): every core entry kept, no indices stored."""
    kept = {name: CoreGroup(rows=None, block=core[groups.span(name)].copy()) for name in groups.names}
    return LayerCore(u1, u2, kept, energy, float(np.sum(core**2)), int(np.count_nonzero(core)))


def build_element_layer(
    u1: np.ndarray, u2: np.ndarray, core: np.ndarray, energy: float, groups: SliceGroups, keep: np.ndarray
) -> LayerCore:
    """Keep the entries where ``keep [S, R1, R2]`` is true, in the shared-row layout.

    Each group stores the union of the rows its slices touch, with zeros where entries were pruned.
    """
    pruned = np.where(keep, core, 0.0)
    touched = keep.any(axis=2)  # [S, R1]
    kept = {}
    for name in groups.names:
        span = groups.span(name)
        rows = np.flatnonzero(touched[span].any(axis=0))
        kept[name] = CoreGroup(rows=rows, block=pruned[span][:, rows])
    return LayerCore(u1, u2, kept, energy, float(np.sum(pruned**2)), int(np.count_nonzero(pruned)))


def element_format_cost(keep: np.ndarray, groups: SliceGroups, rank2: int, index_cost: int = 1) -> int:
    """Stored core entries (values + indices) of an element mask ``[S, R1, R2]`` in the shared-row layout."""
    touched = keep.any(axis=2)  # [S, R1]
    return sum(int(touched[groups.span(name)].any(axis=0).sum()) * row_cost(size, rank2, index_cost)
               for name, size in zip(groups.names, groups.sizes))


def _top_entry_masks(scores: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Masks of the ``count`` highest scores over all given arrays; near-ties: the earlier entry."""
    flat = np.concatenate([x.ravel() for x in scores])
    keep = np.zeros(flat.size, dtype=bool)
    keep[descending_order(flat)[:count]] = True
    bounds = np.cumsum([0] + [x.size for x in scores])
    return [keep[a:b].reshape(x.shape) for a, b, x in zip(bounds[:-1], bounds[1:], scores)]


def element_masks_for_budget(
    cores: list[np.ndarray], scales: list[float], groups: SliceGroups, budget: float, index_cost: int = 1
) -> list[np.ndarray]:
    """Largest top-score element masks (one ranking over all given layers) whose stored cost fits.

    ``scales[l]`` divides layer ``l``'s scores ``g^2`` (1 for a per-layer budget, the layer energy
    for a global one). Binary search over the number of kept entries; cost is monotone in it.
    """
    scores = [c**2 / s for c, s in zip(cores, scales)]

    def cost(masks: list[np.ndarray]) -> int:
        return sum(element_format_cost(m, groups, c.shape[2], index_cost) for m, c in zip(masks, cores))

    lo, hi = 1, sum(x.size for x in scores)
    if cost(_top_entry_masks(scores, lo)) > budget:
        raise ValueError("budget too small to keep a single core entry")
    while lo < hi:  # the most entries whose masks fit
        mid = (lo + hi + 1) // 2
        if cost(_top_entry_masks(scores, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return _top_entry_masks(scores, lo)


def element_masks_for_density(cores: list[np.ndarray], scales: list[float], density: float) -> list[np.ndarray]:
    """Masks keeping the ``density`` fraction of entries with the highest (scaled) ``g^2``."""
    scores = [c**2 / s for c, s in zip(cores, scales)]
    total = sum(x.size for x in scores)
    return _top_entry_masks(scores, max(1, int(round(density * total))))
