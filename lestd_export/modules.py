"""Compressed-domain attention modules (DESIGN.md 2.4). No module holds or rebuilds a dense W.

How they plug into a Hugging Face attention module without copying its forward:
:class:`LatentAttention` wraps the original attention, computes ``Z = X U1`` and, from ``Z``, the
query/key/value outputs of all heads at once (:class:`LatentQKV`); it then runs the original forward
with ``Z`` as the hidden states, where ``q_proj``/``k_proj``/``v_proj`` (or a fused ``c_attn``) are
:class:`ProjectionOutput` shims that hand back those precomputed outputs. Rotary embeddings, q/k
norms, masks and the KV cache are therefore the original code. ``o_proj`` is a :class:`CoreOutput`
that maps the heads back through ``U1^T`` once.

Layout (measured on ONNX Runtime CPU, see README "Performance"): weights are always the *right*
operand of a 2-D product (a weight on the left runs ~1.8x slower in a decode step; a batched
per-head MatMul 1.1-2x slower in decode and 1.5-4x in prefill), and ``U2`` is folded into the core
blocks when ``R2 == d_h`` (no extra entries). A pruned group keeps the same core rows for all of its
heads, so it is one leading-axis Gather of ``Z^T`` plus one ``Gemm(transA=1)`` with its block
``[k, n d_h]``. ``U1`` is stored once; the output side reads it through ONNX Runtime's
``FusedMatMul(transB=1)`` (or ``Gemm(transA=1, transB=1)`` after a scatter), never a transposed copy.
"""

from __future__ import annotations

import torch
from torch import nn


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _SavesInputs(torch.autograd.Function):
    """Base of the two-input products below: keeps both inputs for the backward pass (healing)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)


class _MatMulT(_SavesInputs):
    """``x [..., a] @ w^T`` for ``w [b, a]``, exported as ONNX Runtime's ``FusedMatMul(transB=1)``.

    Reads the stored ``w``: a plain ``MatMul(x, Transpose(w))`` would be constant-folded (by the
    exporter or by ONNX Runtime) into a second, transposed copy of ``w``.
    """

    @staticmethod
    def forward(x, w):
        return torch.matmul(x, w.t())

    @staticmethod
    def backward(ctx, grad):  # grad [..., b]
        x, w = ctx.saved_tensors
        return grad @ w, grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    @staticmethod
    def symbolic(g, x, w):
        out = g.op("com.microsoft::FusedMatMul", x, w, transB_i=1, alpha_f=1.0)
        rank = x.type().dim()
        if rank is not None:  # the exporter has no shape inference for contrib ops: give the rank only
            out.setType(x.type().with_sizes([None] * rank))  # (traced sizes would freeze dynamic axes)
        return out


class _TMatMul(_SavesInputs):
    """``x^T @ w`` for ``x [a, N]``, ``w [a, b]``, exported as ``Gemm(transA=1)`` (no Transpose node)."""

    @staticmethod
    def forward(x, w):
        return x.t() @ w

    @staticmethod
    def backward(ctx, grad):  # grad [N, b]
        x, w = ctx.saved_tensors
        return w @ grad.t(), x @ grad

    @staticmethod
    def symbolic(g, x, w):
        return g.op("Gemm", x, w, transA_i=1)


class _TMatMulT(_SavesInputs):
    """``x^T @ w^T`` for ``x [a, N]``, ``w [b, a]``: ``Gemm(transA=1, transB=1)``."""

    @staticmethod
    def forward(x, w):
        return x.t() @ w.t()

    @staticmethod
    def backward(ctx, grad):  # grad [N, b]
        x, w = ctx.saved_tensors
        return w.t() @ grad.t(), grad.t() @ x.t()

    @staticmethod
    def symbolic(g, x, w):
        return g.op("Gemm", x, w, transA_i=1, transB_i=1)


class _ScatterRows(torch.autograd.Function):
    """``[R1, N]`` zeros with rows ``rows [k]`` (unique) set to ``values [k, N]``: one ScatterND.

    ``u1 [d, R1]`` only supplies ``R1`` (its shape), so no new constant enters the graph.
    """

    @staticmethod
    def forward(values, rows, u1):
        out = values.new_zeros(u1.shape[1], values.shape[1])
        return out.index_copy(0, rows.long(), values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):  # grad [R1, N]
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows.long()), None, None

    @staticmethod
    def symbolic(g, values, rows, u1):
        def dim(x, axis):  # [1] int64: x.shape[axis]
            return g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([axis])),
                        g.op("Constant", value_t=torch.tensor([axis + 1])))

        zeros = g.op("ConstantOfShape", g.op("Concat", dim(u1, 1), dim(values, 1), axis_i=0),
                     value_t=torch.tensor([0.0], dtype=torch.float32))
        zeros = g.op("CastLike", zeros, values)
        index = g.op("Unsqueeze", g.op("Cast", rows, to_i=7), g.op("Constant", value_t=torch.tensor([1])))
        return g.op("ScatterND", zeros, index, values)


class _ReshapeLike(torch.autograd.Function):
    """``y [N, c] -> [*lead, c]`` with ``lead = like.shape[:-1]``: Shape, Slice, Concat, Reshape."""

    @staticmethod
    def forward(y, like):
        return y.reshape(*like.shape[:-1], y.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape), None

    @staticmethod
    def symbolic(g, y, like):
        lead = g.op("Slice", g.op("Shape", like), g.op("Constant", value_t=torch.tensor([0])),
                    g.op("Constant", value_t=torch.tensor([-1])))
        shape = g.op("Concat", lead, g.op("Constant", value_t=torch.tensor([-1])), axis_i=0)
        return g.op("Reshape", y, shape)


class LatentQKV(nn.Module):
    """``Z [B, T, R1] ->`` one ``[B, T, n_g d_h]`` output per group (query, key, value heads).

    The layer's groups are stored as *segments* in column order. A run of consecutive dense groups
    (all ``R1`` rows) is one segment, one MatMul with ``weight_j [R1, cols]`` whose output is split
    per group (three small MatMuls ran ~10% slower than one merged MatMul in a decode step). A
    pruned group is its own segment: it gathers its rows ``rows_j [k]`` (int32) of ``Z^T`` along the
    leading axis and is one ``Gemm(transA=1)`` with ``weight_j [k, cols]``. When ``R2 < d_h`` the weights are in
    the ``R2`` basis and every head is then mapped by ``U2^T``; at ``R2 == d_h`` ``U2`` is folded in.
    """

    def __init__(self, segments: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]],
                 u2: nn.Parameter | None):
        super().__init__()
        self.num_segments = len(segments)
        self.group_widths = [widths for _, _, widths in segments]  # output columns of each group
        for j, (weight, rows, _) in enumerate(segments):
            self.register_parameter(f"weight_{j}", _param(weight))
            if rows is not None:
                self.register_buffer(f"rows_{j}", rows.to(torch.int32))
        self.u2 = u2  # [d_h, R2] when R2 < d_h, else None

    def segment_rows(self, j: int) -> torch.Tensor | None:
        """The rows ``rows_j [k]`` that segment ``j`` gathers, or None for a dense segment (all ``R1`` rows)."""
        return self._buffers.get(f"rows_{j}")

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        zt = None
        outputs = []
        for j in range(self.num_segments):
            weight, rows = getattr(self, f"weight_{j}"), self.segment_rows(j)
            if rows is None:
                out = torch.matmul(z, weight)  # [B, T, cols]
            else:
                zt = z.reshape(-1, z.shape[-1]).t() if zt is None else zt  # [R1, N], shared by the pruned groups
                out = _ReshapeLike.apply(_TMatMul.apply(zt.index_select(0, rows), weight), z)  # [B, T, cols]
            widths = self.group_widths[j]
            outputs += list(torch.split(out, widths, dim=-1)) if len(widths) > 1 else [out]
        if self.u2 is not None:
            rank2 = self.u2.shape[1]
            outputs = [_MatMulT.apply(out.unflatten(-1, (-1, rank2)), self.u2).flatten(-2)  # [B, T, n d_h]
                       for out in outputs]
        return outputs

    def extra_repr(self) -> str:
        parts = []
        for j in range(self.num_segments):
            k, cols = getattr(self, f"weight_{j}").shape
            parts.append(f"{len(self.group_widths[j])} group(s), {cols} cols x "
                         f"{'all' if self.segment_rows(j) is None else k} rows")
        return "; ".join(parts)


class ProjectionOutput(nn.Module):
    """Stands in for ``q_proj``/``k_proj``/``v_proj`` (one group) or a fused ``c_attn`` (all three):
    returns the output(s) :class:`LatentAttention` computed for this forward, plus the original bias."""

    def __init__(self, groups: tuple[int, ...], bias: torch.Tensor | None):
        super().__init__()
        self.groups = groups
        self.bias = None if bias is None else _param(bias)
        self.pending: list[torch.Tensor] | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            raise RuntimeError("a compressed projection can only run inside its LatentAttention's forward")
        parts = [self.pending[g] for g in self.groups]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"output of latent QKV group(s) {list(self.groups)}"


class CoreOutput(nn.Module):
    """Output projection ``[B, T, h d_h] -> [B, T, d]``: ``(sum_i (head_i U2) M_Oi^T) U1^T``.

    ``weight [h R2', k]`` stacks the heads' transposed core blocks (``U2`` folded in when
    ``R2 == d_h``); ``rows [k]`` (int32) says which latent rows they fill (``None``: all ``R1``).
    """

    def __init__(self, u1: nn.Parameter, u2: nn.Parameter | None, weight: torch.Tensor, rows: torch.Tensor | None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.u1 = u1  # [d, R1], shared with LatentAttention
        self.u2 = u2  # [d_h, R2] when R2 < d_h, else None
        self.weight = _param(weight)
        self.register_buffer("rows", None if rows is None else rows.to(torch.int32))
        self.bias = None if bias is None else _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.u2 is not None:
            x = torch.matmul(x.unflatten(-1, (-1, self.u2.shape[0])), self.u2).flatten(-2)  # [B, T, h R2]
        part = torch.matmul(x, self.weight)  # [B, T, k]
        if self.rows is None:
            out = _MatMulT.apply(part, self.u1)  # [B, T, d]
        else:
            latent = _ScatterRows.apply(part.reshape(-1, part.shape[-1]).t(), self.rows, self.u1)  # [R1, N]
            out = _ReshapeLike.apply(_TMatMulT.apply(latent, self.u1), x)  # [B, T, d]
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        rows = "all" if self.rows is None else self.rows.numel()
        return f"{self.weight.shape[0]} head cols -> {rows} of R1={self.u1.shape[1]} rows -> d={self.u1.shape[0]}"


class LatentAttention(nn.Module):
    """Wraps an attention module whose projections are shims; feeds it ``Z = X U1``."""

    def __init__(self, attention: nn.Module, u1: nn.Parameter, qkv: LatentQKV, shims: list[ProjectionOutput],
                 summary: dict):
        super().__init__()
        self.attention = attention
        self.u1 = u1  # [d, R1]
        self.qkv = qkv
        self._shims = shims  # plain list: the shims are registered under the wrapped attention
        self.summary = summary  # ranks, density, stored / dense parameters (for repr and reports)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            z = kwargs["hidden_states"] = torch.matmul(kwargs["hidden_states"], self.u1)  # [B, T, R1]
        else:
            z = torch.matmul(args[0], self.u1)
            args = (z, *args[1:])
        outputs = self.qkv(z)
        for shim in self._shims:
            shim.pending = outputs
        try:
            return self.attention(*args, **kwargs)
        finally:
            for shim in self._shims:
                shim.pending = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["attention"], name)

    def extra_repr(self) -> str:
        s = self.summary
        return (f"ranks=({s['ranks'][0]}, {s['ranks'][1]}), density={s['density']:.3f}, "
                f"params={s['stored']}/{s['dense']} ({s['stored'] / s['dense']:.1%} of dense)")


class LowRankProjection(nn.Module):
    """Per-matrix truncated SVD baseline: ``x @ a_j @ b_j`` for each part ``j``, concatenated."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor | None = None):
        super().__init__()
        self.num_parts = len(factors)
        for j, (a, b) in enumerate(factors):
            self.register_parameter(f"a_{j}", _param(a))  # [in, r]
            self.register_parameter(f"b_{j}", _param(b))  # [r, out]
        self.bias = None if bias is None else _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.matmul(torch.matmul(x, getattr(self, f"a_{j}")), getattr(self, f"b_{j}"))
                 for j in range(self.num_parts)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return ", ".join(f"rank={getattr(self, f'a_{j}').shape[1]}" for j in range(self.num_parts))


class FactoredLinear(nn.Module):
    """A compressed MLP weight: ``expand(basis(x))``, i.e. ``x [.., in] @ A [in, r] @ B [r, out] (+ bias)``.

    Both factors are plain ``nn.Linear`` modules, so every exporter and quantiser sees two ordinary weight
    MatMuls. Weights that read one input (SwiGLU gate and up) use the *same* ``basis`` module: the first
    registers it, the others only refer to it (``owns_basis=False``), so the checkpoint and the ONNX graph
    store it once, no exporter sees tied weights, and the export computes ``x A`` once per layer.
    """

    def __init__(self, basis: nn.Linear, expand: nn.Linear, owns_basis: bool = True):
        super().__init__()
        if owns_basis:
            self.basis = basis  # [in] -> [r], no bias
        else:
            object.__setattr__(self, "basis", basis)  # a reference, not a submodule
        self.expand = expand  # [r] -> [out], the original bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.basis(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.expand.bias

    def dense_weight(self) -> torch.Tensor:
        """The ``[in, out]`` weight the factors store (``A B``)."""
        return (self.expand.weight @ self.basis.weight).detach().T

    def extra_repr(self) -> str:
        return f"rank={self.basis.out_features}"


class _LogitsMatMulT(_MatMulT):
    """:class:`_MatMulT` whose ONNX output keeps ``w``'s row count (the vocabulary) as a static last axis."""

    @staticmethod
    def symbolic(g, x, w):
        out = _MatMulT.symbolic(g, x, w)
        rank, rows = x.type().dim(), w.type().sizes()[0]
        if rank is not None:
            out.setType(x.type().with_sizes([None] * (rank - 1) + [rows]))
        return out


class TiedOutputEmbedding(nn.Module):
    """A tied ``lm_head`` for export: ``logits = h @ E^T`` on the input embedding ``E [V, d]`` itself.

    Read through ``FusedMatMul(transB=1)`` (as ``U1`` is), so the graph stores ``E`` once: a tied
    ``nn.Linear`` traces to ``MatMul(h, Transpose(E))``, which ONNX Runtime constant-folds into a second,
    transposed copy (113 MB on SmolLM2). ``E`` is not registered as a parameter here, so exporters that
    look for tied parameters see none.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V]
        return _LogitsMatMulT.apply(hidden, self._embedding[0].weight)


class FactoredEmbedding(nn.Module):
    """A compressed token table ``E [V, d] ~ A [V, r] @ B [r, d]``: a lookup is ``table(ids) @ B`` (``table`` an
    ``nn.Embedding`` holding ``A``, ``expand`` an ``nn.Linear`` holding ``B``), so the graph gathers ``r`` values per
    token and multiplies once; ``B`` is read through ``FusedMatMul(transB=1)`` from ``expand.weight [d, r]``, the
    layout a tied head multiplies by, so an export stores it once. A scaled embedding (one whose lookup is multiplied
    by ``embed_scale``) keeps its scale."""

    def __init__(self, table: nn.Embedding, expand: nn.Linear, scale: float | None = None):
        super().__init__()
        self.table = table  # [V, r]
        self.expand = expand  # [r] -> [d], no bias
        self.scale = scale  # a scaled embedding's factor (Gemma 3's embed_scale), applied to every lookup

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., d]
        rows = _MatMulT.apply(self.table(ids), self.expand.weight)  # [..., r] @ B, B^T [d, r] read as stored
        return rows if self.scale is None else rows * self.scale

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.expand.out_features

    def extra_repr(self) -> str:
        return f"vocab={self.table.num_embeddings}, rank={self.table.embedding_dim}, d={self.expand.out_features}"


class FactoredOutputEmbedding(nn.Module):
    """The lm_head tied to a :class:`FactoredEmbedding`: ``logits = (h @ B^T) @ A^T`` from the embedding's own
    factors (not registered here: stored once). ``h @ B^T`` is a plain MatMul by ``expand.weight [d, r]``; ``A`` is
    read through ``FusedMatMul(transB=1)`` as a tied table is (:class:`TiedOutputEmbedding`), so neither the graph
    nor ONNX Runtime's constant folding makes a transposed copy of the ``[V, r]`` table."""

    def __init__(self, embedding: FactoredEmbedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V]
        embedding = self._embedding[0]
        latent = torch.matmul(hidden, embedding.expand.weight)  # [..., r]
        return _LogitsMatMulT.apply(latent, embedding.table.weight)


class TTLinear(nn.Module):
    """A compressed weight ``W [K, N]`` as a two-core TT-matrix (TT-LLM's FFN format), with Saten's sparse residual
    when it has one: ``K = k1 k2``, ``N = n1 n2``, ``W[(i1 i2), (j1 j2)] = sum_r G1[i1, j1, r] G2[r, i2, j2]``.

    Computed as two plain weight MatMuls, so exporters and quantisers see ordinary weights::

        t = x.reshape(M k1, k2) @ F          F [k2, r n2]  (G2)     -> [M, k1, r, n2] -> [M n2, k1 r]
        y = t @ S                            S [k1 r, n1]  (G1)     -> [M, n2, n1] -> [M, N]
        y[..., col(i)] += x[..., row(i)] * v_i   per sparse entry (flat int32 index into W)
    """

    def __init__(self, first: nn.Linear, second: nn.Linear, modes: tuple[int, int, int, int], bias=None,
                 sparse_index: torch.Tensor | None = None, sparse_values: torch.Tensor | None = None):
        super().__init__()
        self.first = first  # [k2] -> [r n2], no bias
        self.second = second  # [k1 r] -> [n1], no bias
        self.modes = modes  # (k1, k2, n1, n2)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("sparse_index", sparse_index if sparse_index is not None
                             else torch.zeros(0, dtype=torch.int32))  # [nnz] flat into [K, N]
        self.sparse_values = nn.Parameter(sparse_values if sparse_values is not None else torch.zeros(0),
                                          requires_grad=False)  # [nnz]

    @property
    def in_features(self) -> int:
        return self.modes[0] * self.modes[1]

    @property
    def out_features(self) -> int:
        return self.modes[2] * self.modes[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        k1, k2, n1, n2 = self.modes
        lead = x.shape[:-1]
        t = self.first(x.reshape(-1, k2))  # [M k1, r n2]
        rank = t.shape[-1] // n2
        t = t.reshape(-1, k1, rank, n2).permute(0, 3, 1, 2).reshape(-1, k1 * rank)  # [M n2, k1 r]
        y = self.second(t).reshape(-1, n2, n1).permute(0, 2, 1).reshape(*lead, n1 * n2)  # [..., N]
        if self.sparse_index.numel():
            index = self.sparse_index.long()
            rows, cols = torch.div(index, n1 * n2, rounding_mode="floor"), index % (n1 * n2)
            updates = x.index_select(-1, rows) * self.sparse_values  # [..., nnz]
            y = y.scatter_add(-1, cols.expand_as(updates), updates)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """The ``[K, N]`` weight the cores and the sparse residual store."""
        with torch.no_grad():
            product = self.forward(torch.eye(self.in_features, dtype=self.first.weight.dtype))
        return product if self.bias is None else product - self.bias

    def extra_repr(self) -> str:
        k1, k2, n1, n2 = self.modes
        return f"modes=({k1}x{k2}, {n1}x{n2}), rank={self.first.out_features // n2}, sparse={self.sparse_index.numel()}"
