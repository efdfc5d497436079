"""What one weight group stores, in the form every emitter consumes (numpy; row vectors, ``y = x W``).

A :class:`StoredGroup` is a chain of 2-D products (what quantisers take and ONNX Runtime runs fast)::

    x'  = x, each head mapped by head_in          (optional, [d_h, R2]: LeSTD's output heads when R2 < d_h)
    z   = x' @ basis                              (optional, [K, u]: LeSTD's U1 columns, SVD's a)
    y_j = take(z, positions_j, axis=-1) @ weight_j  per block (positions None: all of z), concatenated
    y   = y, each head mapped by head_out          (optional, [R2, d_h]: LeSTD's Q/K/V when R2 < d_h)
    y   = y @ last                                (optional, [r, N]: the output side's copy of U1 columns)

A dense weight is one block and nothing else; LeSTD's Q/K/V are one basis and a block per kept-row segment;
the SVD baseline's matrices are a basis (``a``) and one block (``b``) each. The values are the ones written,
range-equalised where the method asks for it (:func:`equalize`), so an emitter maps fields, never methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Block:
    """``take(z, positions) @ weight``: ``weight [k, cols]``; ``widths`` are the columns of each member it writes."""

    weight: np.ndarray  # [k, cols]
    positions: np.ndarray | None  # [k] columns of z it reads; None: all of them
    widths: list[int]


@dataclass
class StoredGroup:
    """One weight group's stored factors (see the module doc for the chain they compute)."""

    blocks: list[Block]
    basis: np.ndarray | None = None  # [K, u]
    head_in: np.ndarray | None = None  # [d_h, R2]
    head_out: np.ndarray | None = None  # [R2, d_h]
    last: np.ndarray | None = None  # [r, N]

    @property
    def widths(self) -> list[int]:
        """Output columns of each member (after ``head_out``), in order."""
        widths = [w for block in self.blocks for w in block.widths]
        if self.head_out is not None:
            rank2, dh = self.head_out.shape
            widths = [w // rank2 * dh for w in widths]
        return widths

    @property
    def entries(self) -> int:
        """Stored weight values (the head maps and positions excluded)."""
        factors = [self.basis, self.last]
        return sum(b.weight.size for b in self.blocks) + sum(f.size for f in factors if f is not None)


    def apply(self, x: np.ndarray) -> np.ndarray:
        """The chain on ``x [T, K]`` in numpy (the reference the emitters are tested against), ``[T, N]``."""
        if self.head_in is not None:
            x = (x.reshape(len(x), -1, self.head_in.shape[0]) @ self.head_in).reshape(len(x), -1)
        z = x if self.basis is None else x @ self.basis
        y = np.concatenate([(z if b.positions is None else z[:, b.positions]) @ b.weight for b in self.blocks], axis=1)
        if self.head_out is not None:
            y = (y.reshape(len(y), -1, self.head_out.shape[0]) @ self.head_out).reshape(len(y), -1)
        return y if self.last is None else y @ self.last


def equalize(first: np.ndarray, second: np.ndarray | None, second_ranges: np.ndarray | None = None):
    """``(F diag(s), s)`` with ``s_j = sqrt(r_j / max|F[:, j]|)`` for ``x @ F @ S`` (``F [K, r]``, ``S [r, N]``);
    ``r_j`` is ``max|S[j, :]|`` unless ``second_ranges`` gives it. Divide ``S``'s rows by ``s``.

    Cross-layer equalisation (Nagel et al. 2019): the product is unchanged and both factors get the same range,
    so blockwise int4 (MatMulNBits blocks run along ``S``'s rows) rounds them far less."""
    first_ranges = np.abs(first).max(axis=0)  # [r]
    second_ranges = np.abs(second).max(axis=1) if second_ranges is None else second_ranges
    valid = (first_ranges > 0) & (second_ranges > 0)
    scale = np.sqrt(np.where(valid, second_ranges / np.where(valid, first_ranges, 1.0), 1.0))
    return first * scale, scale


def segment_union(rank1: int, segments: list[tuple[np.ndarray, np.ndarray | None, list[int]]]) -> np.ndarray:
    """Latent rows read by any segment, ascending (all ``rank1`` when a segment is dense)."""
    if any(rows is None for _, rows, _ in segments):
        return np.arange(rank1)
    return np.unique(np.concatenate([rows for _, rows, _ in segments]))


def latent_input_group(u1: np.ndarray, u2: np.ndarray | None,
                       segments: list[tuple[np.ndarray, np.ndarray | None, list[int]]]) -> StoredGroup:
    """LeSTD's Q/K/V: ``x @ U1[:, union]`` once, then each segment's kept rows; equalised over the union.

    ``segments``: ``(weight [k or R1, cols], rows [k] or None, member widths)``; ``u2`` ``[d_h, R2]`` when
    ``R2 < d_h`` (the blocks are then in the ``R2`` basis and every head is mapped through ``U2^T``)."""
    union = segment_union(u1.shape[1], segments)
    positions = [None if rows is None else np.searchsorted(union, rows) for _, rows, _ in segments]
    ranges = np.zeros(len(union))  # the largest |entry| of each union row over the segments that read it
    for (weight, _, _), pos in zip(segments, positions):
        np.maximum.at(ranges, slice(None) if pos is None else pos, np.abs(weight).max(axis=1))
    basis, scale = equalize(u1[:, union], None, ranges)
    blocks = []
    for (weight, rows, widths), pos in zip(segments, positions):
        weight = weight / scale[slice(None) if pos is None else pos, None]
        reads_all = rows is None or np.array_equal(rows, union)
        blocks.append(Block(weight, None if reads_all else pos, list(widths)))
    return StoredGroup(blocks, basis=basis, head_out=None if u2 is None else u2.T)


def latent_output_group(u1: np.ndarray, u2: np.ndarray | None, weight: np.ndarray,
                        rows: np.ndarray | None) -> StoredGroup:
    """LeSTD's output heads: ``heads @ weight [h R2, k] @ U1[:, rows]^T``, equalised; ``u2`` maps each head
    first when ``R2 < d_h``."""
    columns = u1 if rows is None else u1[:, rows]
    core, scale = equalize(weight, columns.T)
    return StoredGroup([Block(core, None, [core.shape[1]])], head_in=u2, last=columns.T / scale[:, None])


def low_rank_group(a: np.ndarray, b: np.ndarray) -> StoredGroup:
    """One matrix of the per-matrix low-rank baseline, ``x @ a @ b``, as it is (equalising measured worse)."""
    return StoredGroup([Block(b, None, [b.shape[1]])], basis=a)
