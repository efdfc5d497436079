"""Model surgery: read attention weights out of a Hugging Face model and swap in compressed modules.

This is the only place that knows both the registry (where weights live) and the replacement
modules. The numerics it calls see plain float64 arrays; the modules it builds see tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import NonFiniteWeightsError, UnsupportedArchitectureError
from .modules import (CoreOutput, FactoredEmbedding, FactoredLinear, FactoredOutputEmbedding, LatentAttention,
                      LatentQKV, LowRankProjection, ProjectionOutput, TTLinear)
from .numerics.pruning import LayerCore, SliceGroups
from .registry import ArchSpec, AttentionShape

GROUPS = ("q", "k", "v", "o")


@dataclass
class AttentionWeights:
    """One layer's projections in row-vector convention ``y = x W`` (float64) and their biases."""

    matrices: dict[str, np.ndarray]  # q [d, h d_h], k/v [d, h_kv d_h], o [h d_h, d]
    biases: dict[str, torch.Tensor | None]

    def slice_tensor(self, shape: AttentionShape) -> np.ndarray:
        """The per-head slice tensor ``[S, d, d_h]``: Q_i, K_j, V_j, then O_i^T (DESIGN.md 2.1)."""
        dh = shape.head_dim
        slices = []
        for name in ("q", "k", "v"):
            w = self.matrices[name]
            slices += [w[:, i * dh:(i + 1) * dh] for i in range(w.shape[1] // dh)]
        w_o = self.matrices["o"]
        slices += [w_o[i * dh:(i + 1) * dh, :].T for i in range(w_o.shape[0] // dh)]
        return np.stack(slices)


def slice_groups(shape: AttentionShape, with_output: bool = True) -> SliceGroups:
    """The q, k, v (and o) slice groups; without the output heads when the output projection stays dense."""
    sizes = (shape.heads, shape.kv_heads, shape.kv_heads, shape.heads)
    return SliceGroups(GROUPS, sizes) if with_output else SliceGroups(GROUPS[:3], sizes[:3])


def _as_in_out(module: nn.Module, spec: ArchSpec) -> np.ndarray:
    weight = module.weight.detach().to(torch.float64).cpu().numpy()
    return weight if spec.weight_in_out else weight.T


def _bias(module: nn.Module, start: int | None = None, stop: int | None = None) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()[start:stop].clone()


def read_attention(attention: nn.Module, spec: ArchSpec, shape: AttentionShape, layer: int) -> AttentionWeights:
    """Extract Q, K, V, O from an original attention module; refuses NaN/Inf weights."""
    if spec.fused_qkv:
        fused = getattr(attention, spec.fused_qkv)
        w = _as_in_out(fused, spec)
        q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        bounds = {"q": (0, q_out), "k": (q_out, q_out + kv_out), "v": (q_out + kv_out, q_out + 2 * kv_out)}
        matrices = {name: w[:, a:b] for name, (a, b) in bounds.items()}
        biases = {name: _bias(fused, a, b) for name, (a, b) in bounds.items()}
    else:
        modules = {name: getattr(attention, getattr(spec, name)) for name in ("q", "k", "v")}
        matrices = {name: _as_in_out(m, spec) for name, m in modules.items()}
        biases = {name: _bias(m) for name, m in modules.items()}
    out = getattr(attention, spec.o)
    matrices["o"] = _as_in_out(out, spec)
    biases["o"] = _bias(out)
    for name, w in matrices.items():
        if not np.isfinite(w).all():
            raise NonFiniteWeightsError(
                f"layer {layer} {name}-projection has NaN/Inf weights; the model file is corrupt or was saved "
                "after a diverged training step: fix the weights before compressing")
    return AttentionWeights(matrices, biases)


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _cat_bias(biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if all(b is None for b in biases) else torch.cat([b for b in biases if b is not None])


def _fold_u2(block: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Per-head blocks ``[n, k, R2]`` in head coordinates ``[n, k, d_h]`` when ``U2`` is square, else as is."""
    return block @ u2.T if u2.shape[0] == u2.shape[1] else block


def _same_rows(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def qkv_segments(core: LayerCore, shared_rows: bool = False) -> list[tuple[np.ndarray, np.ndarray | None, list[int]]]:
    """``(weight [k or R1, cols], rows [k] or None, group widths)`` for the q, k and v groups in
    column order (head-major columns); consecutive dense groups are merged into one segment, and with
    ``shared_rows`` (the plain layout, whose Q/K/V keep the same rows) consecutive groups with equal rows.
    The flag is a property of the layout, not of the values, so a reloaded checkpoint rebuilds the
    same segments from its recorded row counts."""
    segments: list[tuple[np.ndarray, np.ndarray | None, list[int]]] = []
    for name in ("q", "k", "v"):
        group = core.groups[name]
        block = _fold_u2(group.block, core.u2)  # [n, k, R2']
        n, k, rank2 = block.shape
        weight = block.transpose(1, 0, 2).reshape(k, n * rank2)
        if segments and (_same_rows(group.rows, segments[-1][1]) if shared_rows else
                         group.rows is None and segments[-1][1] is None):
            previous, _, widths = segments[-1]
            segments[-1] = (np.concatenate([previous, weight], axis=1), group.rows, widths + [n * rank2])
        else:
            segments.append((weight, group.rows, [n * rank2]))
    return segments


def output_weight(core: LayerCore) -> np.ndarray:
    """``[h R2', k]``: the output heads' blocks transposed and stacked (``U2`` folded when square)."""
    block = _fold_u2(core.groups["o"].block, core.u2)  # [h, k, R2']
    h, k, rank2 = block.shape
    return block.transpose(0, 2, 1).reshape(h * rank2, k)


def install_core_attention(layer_module: nn.Module, spec: ArchSpec, core: LayerCore, biases: dict,
                           dtype: torch.dtype, summary: dict, shared_rows: bool = False) -> None:
    """Replace the attention of one decoder layer by a :class:`LatentAttention` over ``core``."""
    attention = getattr(layer_module, spec.attention)
    u1 = nn.Parameter(_tensor(core.u1, dtype), requires_grad=False)
    square = core.u2.shape[0] == core.u2.shape[1]
    u2 = None if square else nn.Parameter(_tensor(core.u2, dtype), requires_grad=False)
    qkv = LatentQKV([(_tensor(w, dtype), None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int32)),
                      widths) for w, rows, widths in qkv_segments(core, shared_rows)], u2)
    if spec.fused_qkv:
        shims = [ProjectionOutput((0, 1, 2), _cat_bias([biases[n] for n in ("q", "k", "v")]))]
        setattr(attention, spec.fused_qkv, shims[0])
    else:
        shims = [ProjectionOutput((i,), biases[name]) for i, name in enumerate(("q", "k", "v"))]
        for name, shim in zip(("q", "k", "v"), shims):
            setattr(attention, getattr(spec, name), shim)
    o = core.groups.get("o")  # None: the output projection stays dense
    if o is not None:
        rows = None if o.rows is None else torch.from_numpy(np.asarray(o.rows, dtype=np.int32))
        setattr(attention, spec.o, CoreOutput(u1, u2, _tensor(output_weight(core), dtype), rows, biases["o"]))
    setattr(layer_module, spec.attention, LatentAttention(attention, u1, qkv, shims, summary))


def install_low_rank(layer_module: nn.Module, spec: ArchSpec, factors: dict, biases: dict,
                     dtype: torch.dtype) -> None:
    """Replace the projections of one layer by per-matrix low-rank products (SVD baseline)."""
    attention = getattr(layer_module, spec.attention)

    def pair(name):
        return _tensor(factors[name].a, dtype), _tensor(factors[name].b, dtype)

    if spec.fused_qkv:
        bias = _cat_bias([biases[n] for n in ("q", "k", "v")])
        setattr(attention, spec.fused_qkv, LowRankProjection([pair(n) for n in ("q", "k", "v")], bias))
    else:
        for name in ("q", "k", "v"):
            setattr(attention, getattr(spec, name), LowRankProjection([pair(name)], biases[name]))
    setattr(attention, spec.o, LowRankProjection([pair("o")], biases["o"]))


@dataclass
class MlpWeights:
    """One layer's MLP in row-vector convention (float64): the weights that read the MLP input side by side
    (``inputs [d, n]``, SwiGLU ``gate | up`` or one fused/GELU input weight; ``widths`` per member) and the
    output weight ``output [f, d]``; biases per member path (``members``: input members, then the output)."""

    inputs: np.ndarray
    widths: list[int]
    output: np.ndarray
    biases: dict[str, torch.Tensor | None]


def _parent(layer_module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (layer_module.get_submodule(parent) if parent else layer_module), name


def read_mlp(layer_module: nn.Module, spec: ArchSpec, layer: int) -> MlpWeights:
    """The MLP weights of one decoder layer at the registry's paths; refuses NaN/Inf weights."""
    members = [layer_module.get_submodule(path) for path in spec.mlp_in]
    inputs = [_as_in_out(m, spec) for m in members]
    output = _as_in_out(layer_module.get_submodule(spec.mlp_out), spec)
    for name, w in [*zip(spec.mlp_in, inputs), (spec.mlp_out, output)]:
        if not np.isfinite(w).all():
            raise NonFiniteWeightsError(f"layer {layer} {name} has NaN/Inf weights; the model file is corrupt: "
                                        "fix the weights before compressing")
    biases = {path: _bias(layer_module.get_submodule(path)) for path in (*spec.mlp_in, spec.mlp_out)}
    return MlpWeights(np.concatenate(inputs, axis=1), [w.shape[1] for w in inputs], output, biases)


def balanced_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a [K, r]``, ``b [r, N]`` rescaled per rank so that column ``j`` of ``a`` and row ``j`` of ``b`` have
    equal norms (``a @ b`` unchanged): both factors then quantise alike."""
    scale = np.sqrt(np.linalg.norm(b, axis=1) / np.maximum(np.linalg.norm(a, axis=0), 1e-300))
    scale = np.where(scale > 0, scale, 1.0)
    return a * scale, b / scale[:, None]


def _linear(weight_in_out: np.ndarray, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    k, n = weight_in_out.shape
    linear = nn.Linear(k, n, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(_tensor(weight_in_out.T, dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
    linear.requires_grad_(False)
    return linear


def install_mlp(layer_module: nn.Module, spec: ArchSpec, inputs: tuple[np.ndarray, np.ndarray],
                output: tuple[np.ndarray, np.ndarray], weights: MlpWeights, dtype: torch.dtype) -> None:
    """Replace one layer's MLP weights by :class:`~.modules.FactoredLinear` modules: the input members share
    one basis ``inputs[0] [d, r]`` (their columns of ``inputs[1] [r, n]`` each), the output weight is
    ``output[0] [f, r'] @ output[1] [r', d]``."""
    a, b = balanced_factors(*inputs)
    basis = _linear(a, None, dtype)
    start = 0
    for j, (path, width) in enumerate(zip(spec.mlp_in, weights.widths)):
        parent, name = _parent(layer_module, path)
        setattr(parent, name, FactoredLinear(basis, _linear(b[:, start:start + width], weights.biases[path], dtype),
                                             owns_basis=j == 0))
        start += width
    a, b = balanced_factors(*output)
    parent, name = _parent(layer_module, spec.mlp_out)
    setattr(parent, name, FactoredLinear(_linear(a, None, dtype), _linear(b, weights.biases[spec.mlp_out], dtype)))


def mlp_members(weights: MlpWeights, spec: ArchSpec) -> dict[str, np.ndarray]:
    """Each MLP weight of one layer on its own (row-vector convention), by registry path."""
    bounds = np.cumsum([0, *weights.widths])
    members = {path: weights.inputs[:, a:b] for path, a, b in zip(spec.mlp_in, bounds[:-1], bounds[1:])}
    return {**members, spec.mlp_out: weights.output}


def tt_module(factors, bias: torch.Tensor | None, dtype: torch.dtype) -> TTLinear:
    """A :class:`~.modules.TTLinear` of a two-core :class:`~.numerics.tt.TTWeight`."""
    g1, g2 = factors.cores[0][0], factors.cores[1][..., 0]  # [k1, n1, r], [r, k2, n2]
    (k1, n1, r), (_, k2, n2) = g1.shape, g2.shape
    first = _linear(g2.transpose(1, 0, 2).reshape(k2, r * n2), None, dtype)  # F [k2, r n2]
    second = _linear(g1.transpose(0, 2, 1).reshape(k1 * r, n1), None, dtype)  # S [k1 r, n1]
    return TTLinear(first, second, (k1, k2, n1, n2), None if bias is None else bias.to(dtype),
                    torch.from_numpy(factors.indices.astype(np.int32)), _tensor(factors.values, dtype))


def install_mlp_tt(layer_module: nn.Module, spec: ArchSpec, factors: dict, weights: MlpWeights,
                   dtype: torch.dtype) -> None:
    """Replace each MLP weight of one layer by the :class:`~.modules.TTLinear` of its
    :class:`~.numerics.tt.TTWeight` (``factors`` by registry path)."""
    for path, member in factors.items():
        parent, name = _parent(layer_module, path)
        setattr(parent, name, tt_module(member, weights.biases[path], dtype))


@dataclass
class EmbeddingWeights:
    """The token table ``table [V, d]`` and, when the lm_head is not tied to it, the head ``head [d, V]`` (row-vector
    convention) and its bias (float64 arrays)."""

    table: np.ndarray
    head: np.ndarray | None
    head_bias: torch.Tensor | None

    @property
    def tied(self) -> bool:
        return self.head is None


def read_embedding(model) -> EmbeddingWeights:
    """The model's token table and lm_head (``get_input_embeddings``/``get_output_embeddings``); refuses NaN/Inf and
    layouts the factored table cannot carry (a tied head with a bias)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or not isinstance(head, nn.Linear):
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no nn.Embedding table and nn.Linear lm_head "
                                           "to factor: leave embedding out of --modules")
    tied = head.weight is embedding.weight
    if tied and head.bias is not None:
        raise UnsupportedArchitectureError("a tied lm_head with a bias is not supported: leave embedding out of "
                                           "--modules")
    table = embedding.weight.detach().double().numpy()
    head_weight = None if tied else head.weight.detach().double().numpy().T
    for name, w in (("token table", table), ("lm_head", head_weight)):
        if w is not None and not np.isfinite(w).all():
            raise NonFiniteWeightsError(f"the {name} has NaN/Inf weights; the model file is corrupt: fix the weights "
                                        "before compressing")
    return EmbeddingWeights(table, head_weight, None if tied else _bias(head))


def install_embedding(model, table: tuple[np.ndarray, np.ndarray], head: tuple[np.ndarray, np.ndarray] | None,
                      weights: EmbeddingWeights, dtype: torch.dtype) -> None:
    """Replace the token table by :class:`~.modules.FactoredEmbedding` (``table``: ``A [V, r]``, ``B [r, d]``) and
    the lm_head by :class:`~.modules.FactoredOutputEmbedding` on the same factors (tied) or by
    :class:`~.modules.FactoredLinear` of ``head`` (``[d, r']``, ``[r', V]``, untied)."""
    a, b = balanced_factors(*table)
    lookup = nn.Embedding(*a.shape, dtype=dtype)
    with torch.no_grad():
        lookup.weight.copy_(_tensor(a, dtype))
    lookup.requires_grad_(False)
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    embedding = FactoredEmbedding(lookup, _linear(b, None, dtype), None if scale is None else float(scale))
    model.set_input_embeddings(embedding)
    if weights.tied:
        model.set_output_embeddings(FactoredOutputEmbedding(embedding))
        return
    a, b = balanced_factors(*head)
    model.set_output_embeddings(FactoredLinear(_linear(a, None, dtype), _linear(b, weights.head_bias, dtype)))
