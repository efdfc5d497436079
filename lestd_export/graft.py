"""Graft compressed attention into an existing decoder graph (DESIGN.md 3.1).

Each layer's projection nodes (located by :mod:`.onnx_sites`) are replaced by a compressed subgraph
that writes the *same* output names, so GroupQueryAttention, rotary, norms and runtime configs of
the host graph (an onnxruntime-genai build or an optimum export) stay valid.

Plain layout: every stored weight is the right operand of a 2-D ``MatMul``, so ONNX Runtime's
quantisers (``MatMulNBitsQuantizer``, ``quantize_dynamic``) cover the factors and core blocks too::

    Z     = X @ A                         A = U1[:, union of the Q/K/V rows]   [d, u]
    out_j = Gather(Z, pos_j, axis=-1) @ W_j   per segment that keeps fewer rows (W_j [k_j, cols]), else Z @ W_j
    qkv   = Concat(out_j)  (or Split per q/k/v output)
    o     = (H @ W_O) @ D                 W_O [h d_h, k_O], D = U1[:, rows_O]^T   [k_O, d]

The plain layout's planner (numerics/planner.py) gives Q, K and V the same rows, so ``qkv`` is two
MatMuls, ``X @ A @ W``, and a layer adds one MatMul for Q/K/V and one for O (none with
``--dense-output``). A checkpoint planned for the shared layout still grafts (with Gathers).

Every layer is written from its :class:`~.numerics.stored.StoredGroup` s (Q/K/V, output), whatever the method:
:func:`_emit` maps each field of the chain to nodes once, so a new method or weight kind is new numerics only.
LeSTD's factor pairs ``x @ F @ S`` are written range-equalised (cross-layer equalisation, Nagel et al. 2019):
column ``j`` of ``F`` times ``s_j``, row ``j`` of ``S`` divided by it, ``s_j = sqrt(max|S_j| / max|F_j|)``, so
both have the same range. The product is unchanged; MatMulNBits blocks run along ``S``'s rows, which the
whitened basis leaves at very different scales, and int4 rounds them far less after equalising. The SVD
baseline's pairs are written as they are (equalising them measured worse: README, Edge deployment).

A compressed MLP (:class:`MlpFactors`, ``compress --modules mlp``) is grafted weight by weight
(:func:`graft_mlp`): the node that multiplies by a dense MLP weight (found by the registry's module path)
becomes ``(x @ A) @ B`` writing the same output (a ``Gemm``'s bias kept as an ``Add``), and the weights that
read the MLP input share one ``x @ A``; a TT-matrix weight (:class:`TTFactors`, ``--mlp-method tt|saten``)
becomes its two core MatMuls between reshapes, a sparse residual a Gather and a ScatterElements(add).

A factored token table (:class:`EmbeddingFactors`, ``compress --modules embedding``) is grafted by
:func:`graft_embedding`: the lookup becomes ``Gather(A, ids) @ B`` and a tied lm_head ``(h @ B^T) @ A^T``, with
``A^T`` read by ``FusedMatMul(transB=1)`` so that ``A`` is stored once (the quantiser then shares its codes between
the head's MatMulNBits and the lookup's GatherBlockQuantized); an untied lm_head becomes ``(h @ A') @ B'``.

``D`` is the second layout of ``U1`` that a quantised product needs (MatMulNBits blocks along the
reduction axis, which differs between ``X U1`` and ``latent U1^T``); only the rows the output heads
keep are stored. When ``R2 < d_h`` each head is mapped through ``U2^T`` (Q/K/V) or ``U2`` (O).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .numerics.pruning import LayerCore
from .numerics.stored import StoredGroup, latent_input_group, latent_output_group, low_rank_group, segment_union
from .onnx_sites import AttentionSite, GraphMappingError, replace_nodes
from .surgery import output_weight, qkv_segments

Segment = tuple[np.ndarray, np.ndarray | None, list[int]]  # (weight [k or R1, cols], rows [k] or None, widths)


@dataclass
class LatentLayer:
    """One layer's stored compressed attention, as numpy arrays (row-vector convention ``y = x W``)."""

    u1: np.ndarray  # [d, R1]
    u2: np.ndarray | None  # [d_h, R2] when R2 < d_h (else folded into the blocks)
    segments: list[Segment]  # Q/K/V in column order (see surgery.qkv_segments)
    o_weight: np.ndarray | None  # [h R2', k_O]; None: the output projection stays dense (not grafted)
    o_rows: np.ndarray | None  # [k_O] rows of the latent space the output heads fill; None: all R1

    @classmethod
    def from_core(cls, core: LayerCore) -> LatentLayer:
        square = core.u2.shape[0] == core.u2.shape[1]
        out = core.groups.get("o")  # None: the output projection stays dense
        rows = None if out is None else out.rows
        return cls(core.u1, None if square else core.u2, qkv_segments(core, shared_rows=True),
                   None if out is None else output_weight(core), None if rows is None else np.asarray(rows))

    @classmethod
    def from_module(cls, latent) -> LatentLayer:
        """From a :class:`~.modules.LatentAttention` (a compressed PyTorch model's layer)."""
        qkv = latent.qkv
        segments = []
        for j in range(qkv.num_segments):
            rows = qkv.segment_rows(j)
            segments.append((_numpy(getattr(qkv, f"weight_{j}")), None if rows is None else _numpy(rows),
                             list(qkv.group_widths[j])))
        out = _core_output(latent.attention)  # None: the output projection stayed dense
        rows = None if out is None else out.rows
        return cls(_numpy(latent.u1), None if qkv.u2 is None else _numpy(qkv.u2), segments,
                   None if out is None else _numpy(out.weight), None if rows is None else _numpy(rows))

    def stored(self) -> tuple[list[StoredGroup], StoredGroup | None]:
        """The Q/K/V group and the output group (None: the output projection stays dense) as written."""
        out = None if self.o_weight is None else latent_output_group(self.u1, self.u2, self.o_weight, self.o_rows)
        return [latent_input_group(self.u1, self.u2, self.segments)], out

    @property
    def qkv_union(self) -> np.ndarray:
        """Latent rows read by any Q/K/V segment, ascending (all ``R1`` when a segment is dense)."""
        return segment_union(self.u1.shape[1], self.segments)


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _core_output(attention):
    from .modules import CoreOutput

    found = [m for m in attention.children() if isinstance(m, CoreOutput)]
    return found[0] if found else None


class _Builder:
    """Collects the nodes and initializers of one layer's subgraph under a common name prefix."""

    def __init__(self, prefix: str, weight_prefix: str, dtype=np.float32):
        self.prefix, self.weight_prefix, self.dtype = prefix, weight_prefix, dtype
        self.nodes: list = []
        self.initializers: list = []
        self.weight_matmuls: list[str] = []

    def constant(self, name: str, array: np.ndarray, weight: bool = True):
        from onnx import numpy_helper

        full = f"{self.weight_prefix}.{name}"
        data = np.ascontiguousarray(array.astype(self.dtype) if weight else array)
        self.initializers.append(numpy_helper.from_array(data, full))
        return full

    def node(self, op: str, inputs: list[str], name: str, output: str | list[str] | None = None, **attrs) -> str:
        """Add a node; ``output`` names its output(s) (default: one named after the node). Returns the first."""
        from onnx import helper

        outputs = [output] if isinstance(output, str) else output or [f"{self.prefix}/{name}/output_0"]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{self.prefix}/{name}", **attrs))
        return outputs[0]

    def matmul(self, x: str, weight: np.ndarray, name: str, output: str | None = None) -> str:
        """``x @ weight`` with ``weight [K, N]`` a 2-D initializer (what the quantisers take)."""
        out = self.node("MatMul", [x, self.constant(name, weight)], name, output)
        self.weight_matmuls.append(self.nodes[-1].name)
        return out

    def heads(self, x: str, size: int, name: str) -> str:
        """``[B, T, n size] -> [B, T, n, size]``."""
        shape = self.constant(f"{name}_shape", np.array([0, 0, -1, size], dtype=np.int64), weight=False)
        return self.node("Reshape", [x, shape], name)

    def flat(self, x: str, name: str, output: str | None = None) -> str:
        """``[B, T, n, size] -> [B, T, n size]``."""
        shape = self.constant(f"{name}_shape", np.array([0, 0, -1], dtype=np.int64), weight=False)
        return self.node("Reshape", [x, shape], name, output)


def _emit(b: _Builder, x: str, group: StoredGroup, tag: str, output: str | None = None) -> list[str]:
    """Write one :class:`~.numerics.stored.StoredGroup` reading ``x``: the outputs of its blocks (after the head
    maps), or, with ``last``, the one tensor after it (named ``output`` when given)."""
    if group.head_in is not None:  # every input head mapped first
        dh = group.head_in.shape[0]
        x = b.flat(b.matmul(b.heads(x, dh, f"{tag}heads_in"), group.head_in, f"{tag}head_in"), f"{tag}flat_in")
    z = x if group.basis is None else b.matmul(x, group.basis, f"{tag}basis")  # [B, T, u]
    outs = []
    for j, block in enumerate(group.blocks):
        source = z
        if block.positions is not None:
            position = b.constant(f"{tag}positions_{j}", block.positions.astype(np.int32), weight=False)
            source = b.node("Gather", [z, position], f"{tag}gather_{j}", axis=-1)  # [B, T, k_j]
        out = b.matmul(source, block.weight, f"{tag}block_{j}")  # [B, T, cols_j]
        if group.head_out is not None:  # blocks in the R2 basis: every head mapped through U2^T
            rank2 = group.head_out.shape[0]
            out = b.flat(b.matmul(b.heads(out, rank2, f"{tag}heads_{j}"), group.head_out, f"{tag}head_out_{j}"),
                         f"{tag}flat_{j}")
        outs.append(out)
    if group.last is not None:
        latent = outs[0] if len(outs) == 1 else b.node("Concat", outs, f"{tag}concat", axis=-1)
        outs = [b.matmul(latent, group.last, f"{tag}last")]
    if output is not None:
        _rename(b, _rename_last(b, outs, None, f"{tag}concat_out"), output)
        return [output]
    return outs


def _write_qkv(b: _Builder, outs: list[str], widths: list[int], site: AttentionSite) -> None:
    """Make the subgraph's Q/K/V parts (``outs``, of ``widths`` columns per group) write the site's outputs."""
    if site.packed:
        _rename_last(b, outs, site.qkv_outputs[0], "qkv")
        return
    if len(outs) == len(site.qkv_outputs):  # one segment per group
        for out, name in zip(outs, site.qkv_outputs):
            _rename(b, out, name)
        return
    packed = _rename_last(b, outs, None, "qkv")
    split = b.constant("split_widths", np.array(widths, dtype=np.int64), weight=False)
    b.node("Split", [packed, split], "split", list(site.qkv_outputs), axis=-1)


def _rename_last(b: _Builder, outs: list[str], output: str | None, name: str) -> str:
    if len(outs) == 1:
        if output is not None:
            _rename(b, outs[0], output)
            return output
        return outs[0]
    return b.node("Concat", outs, name, output, axis=-1)


def _rename(b: _Builder, tensor: str, output: str) -> None:
    """Make the node that produces ``tensor`` write ``output`` instead."""
    for node in b.nodes:
        for i, name in enumerate(node.output):
            if name == tensor:
                node.output[i] = output
                return
    raise AssertionError(f"{tensor} is not produced in this subgraph")


@dataclass
class LowRankLayer:
    """One layer of the per-matrix low-rank baseline (``svd``; SVD-LLM when calibrated): ``x @ a @ b``."""

    qkv: list[tuple[np.ndarray, np.ndarray]]  # q, k, v in column order: a [d, r], b [r, out]
    o: tuple[np.ndarray, np.ndarray]  # a [h d_h, r], b [r, d]

    @classmethod
    def from_modules(cls, qkv: list, o) -> LowRankLayer:
        """From the :class:`~.modules.LowRankProjection` modules of one layer (one fused, or q, k, v)."""
        def parts(module):
            return [(_numpy(getattr(module, f"a_{j}")), _numpy(getattr(module, f"b_{j}")))
                    for j in range(module.num_parts)]

        return cls([part for module in qkv for part in parts(module)], parts(o)[0])

    def stored(self) -> tuple[list[StoredGroup], StoredGroup]:
        """One group per Q/K/V matrix and the output's, each ``x @ a @ b``."""
        return [low_rank_group(a, b) for a, b in self.qkv], low_rank_group(*self.o)


def graft_attention(model, sites: list[AttentionSite], layers: list[LatentLayer | LowRankLayer]) -> list[str]:
    """Replace every site's projection nodes by its layer's compressed subgraph, in place.

    The new nodes take the place of the removed ones (the graph stays topologically sorted) and
    write the same output names; initializers used only by the removed nodes are dropped. Returns
    the names of the new weight ``MatMul`` nodes.
    """
    if len(sites) != len(layers):
        raise GraphMappingError(f"{len(sites)} attention sites in the graph but {len(layers)} compressed layers")
    graph = model.graph
    replaced: dict[str, list] = {}
    weight_matmuls: list[str] = []
    for site, layer in zip(sites, layers):
        prefix = site.o_node.rsplit("/", 2)[0] + "/lestd"
        qkv = _Builder(prefix + "/qkv", f"lestd.layers.{site.layer}.qkv")
        out = _Builder(prefix + "/o", f"lestd.layers.{site.layer}.o")
        qkv_groups, o_group = layer.stored()
        outs = [o for i, group in enumerate(qkv_groups) for o in _emit(qkv, site.qkv_input, group, f"g{i}_")]
        _write_qkv(qkv, outs, [w for group in qkv_groups for w in group.widths], site)
        if o_group is not None:
            _emit(out, site.o_input, o_group, "", site.o_output)
        for name in site.qkv_nodes[:-1]:
            replaced[name] = []
        replaced[site.qkv_nodes[-1]] = qkv.nodes
        if out.nodes:
            replaced[site.o_node] = out.nodes
        graph.initializer.extend(qkv.initializers + out.initializers)
        weight_matmuls += qkv.weight_matmuls + out.weight_matmuls
    missing = set(replaced) - {node.name for node in graph.node}
    if missing:
        raise GraphMappingError(f"nodes {sorted(missing)[:3]} are not in the graph")
    replace_nodes(graph, replaced)
    return weight_matmuls


@dataclass
class MlpFactors:
    """One layer's compressed MLP as stored (row-vector convention): the input members' shared basis
    ``[d, r]`` and each member's expansion ``[r, n_j]`` (by registry path), the output weight's pair."""

    basis: np.ndarray
    expands: dict[str, np.ndarray]
    output: tuple[np.ndarray, np.ndarray]  # [f, r'], [r', d]

    @classmethod
    def from_layer(cls, layer_module, spec) -> MlpFactors | None:
        """The factors of a layer whose MLP ``compress`` replaced by FactoredLinear modules (else None)."""
        from .modules import FactoredLinear

        members = [layer_module.get_submodule(path) for path in (*spec.mlp_in, spec.mlp_out)]
        if not all(isinstance(m, FactoredLinear) for m in members):
            return None
        *inputs, output = members
        return cls(_numpy(inputs[0].basis.weight).T, {p: _numpy(m.expand.weight).T for p, m in zip(spec.mlp_in, inputs)},
                   (_numpy(output.basis.weight).T, _numpy(output.expand.weight).T))


@dataclass
class TTFactors:
    """One MLP weight stored as a two-core TT-matrix (``compress --mlp-method tt|saten``), as
    :class:`~.modules.TTLinear` computes it: ``first [k2, r n2]``, ``second [k1 r, n1]``, ``modes (k1, k2, n1, n2)``
    and the sparse residual's flat int32 ``index`` and ``values``."""

    first: np.ndarray
    second: np.ndarray
    modes: tuple[int, int, int, int]
    index: np.ndarray
    values: np.ndarray

    @classmethod
    def from_module(cls, module) -> TTFactors:
        return cls(_numpy(module.first.weight).T, _numpy(module.second.weight).T, tuple(module.modes),
                   module.sparse_index.numpy().astype(np.int32), _numpy(module.sparse_values))

    @classmethod
    def from_layer(cls, layer_module, spec) -> dict[str, TTFactors] | None:
        """Each MLP weight's factors (by registry path) of a layer whose MLP is TT (else None)."""
        from .modules import TTLinear

        members = {path: layer_module.get_submodule(path) for path in (*spec.mlp_in, spec.mlp_out)}
        if not all(isinstance(m, TTLinear) for m in members.values()):
            return None
        return {path: cls.from_module(m) for path, m in members.items()}


def tt_product(node, prefix: str, factors: TTFactors) -> tuple[list, dict[str, np.ndarray]]:
    """Nodes computing what the weight node ``node`` computes, with ``x @ W`` as :class:`~.modules.TTLinear` does
    (two weight MatMuls between reshapes, the sparse residual by Gather and ScatterElements(add)), its output names
    kept; and the initializers they read (named under ``prefix``)."""
    from onnx import helper

    from .quantize_graph import bias_of

    k1, k2, n1, n2 = factors.modes
    rank = factors.first.shape[1] // n2
    name = node.name
    x = node.input[0]
    tensors = {f"{prefix}.first": factors.first.astype(np.float32),
               f"{prefix}.second": factors.second.astype(np.float32)}
    shapes = {"rows_k2": [-1, k2], "split": [-1, k1, rank, n2], "rows_k1r": [-1, k1 * rank], "out": [-1, n2, n1],
              "width": [n1 * n2]}
    tensors.update({f"{prefix}.shape.{key}": np.array(value, dtype=np.int64) for key, value in shapes.items()})

    def t(key: str) -> str:
        return f"{name}/tt/{key}"

    nodes = [helper.make_node("Reshape", [x, f"{prefix}.shape.rows_k2"], [t("x")], name=t("reshape_in")),
             helper.make_node("MatMul", [t("x"), f"{prefix}.first"], [t("first")], name=t("first")),
             helper.make_node("Reshape", [t("first"), f"{prefix}.shape.split"], [t("split")], name=t("split")),
             helper.make_node("Transpose", [t("split")], [t("swapped")], name=t("swap"), perm=[0, 3, 1, 2]),
             helper.make_node("Reshape", [t("swapped"), f"{prefix}.shape.rows_k1r"], [t("rows")], name=t("rows")),
             helper.make_node("MatMul", [t("rows"), f"{prefix}.second"], [t("second")], name=t("second")),
             helper.make_node("Reshape", [t("second"), f"{prefix}.shape.out"], [t("out")], name=t("out")),
             helper.make_node("Transpose", [t("out")], [t("ordered")], name=t("order"), perm=[0, 2, 1]),
             helper.make_node("Shape", [x], [t("lead")], name=t("lead"), end=-1),
             helper.make_node("Concat", [t("lead"), f"{prefix}.shape.width"], [t("shape")], name=t("shape"), axis=0)]
    bias = bias_of(node)
    product = t("product") if bias or factors.index.size else node.output[0]
    nodes.append(helper.make_node("Reshape", [t("ordered"), t("shape")], [product], name=t("reshape_out")))
    if factors.index.size:  # y[..., col] += x[..., row] * v per entry; row, col from the flat index into [K, N]
        tensors.update({f"{prefix}.sparse_index": factors.index.astype(np.int32),
                        f"{prefix}.sparse_values": factors.values.astype(np.float32),
                        f"{prefix}.width": np.array(n1 * n2, dtype=np.int32)})
        summed = t("summed") if bias else node.output[0]
        nodes += [helper.make_node("Div", [f"{prefix}.sparse_index", f"{prefix}.width"], [t("sparse_rows")],
                                   name=t("sparse_rows")),
                  helper.make_node("Mod", [f"{prefix}.sparse_index", f"{prefix}.width"], [t("sparse_cols")],
                                   name=t("sparse_cols")),
                  helper.make_node("Gather", [x, t("sparse_rows")], [t("picked")], name=t("pick"), axis=-1),
                  helper.make_node("Mul", [t("picked"), f"{prefix}.sparse_values"], [t("updates")], name=t("scale")),
                  helper.make_node("Shape", [t("updates")], [t("updates_shape")], name=t("updates_shape")),
                  helper.make_node("Expand", [t("sparse_cols"), t("updates_shape")], [t("columns")],
                                   name=t("columns")),
                  helper.make_node("ScatterElements", [product, t("columns"), t("updates")], [summed],
                                   name=t("scatter"), axis=-1, reduction="add")]
        product = summed
    if bias:
        nodes.append(helper.make_node("Add", [product, bias], list(node.output), name=f"{name}/bias"))
    return nodes, tensors


def factored_product(node, a: str | None, b: str, x: str | None = None) -> list:
    """Nodes computing what the weight node ``node`` (a MatMul or Gemm of
    :func:`~.quantize_graph.weight_matmuls`) computes, with ``x @ W`` as ``(x @ A) @ B`` (initializers
    ``a``, ``b``) and its output names kept (a Gemm's bias becomes an ``Add``). With ``a`` None, ``x`` is
    ``x @ A`` computed elsewhere (a shared basis)."""
    from onnx import helper

    from .quantize_graph import bias_of

    nodes = []
    if a is not None:
        x = f"{node.name}/basis_output"
        nodes.append(helper.make_node("MatMul", [node.input[0], a], [x], name=f"{node.name}/basis"))
    bias = bias_of(node)
    product = f"{node.name}/product" if bias else node.output[0]
    nodes.append(helper.make_node("MatMul", [x, b], [product], name=f"{node.name}/expand"))
    if bias:
        nodes.append(helper.make_node("Add", [product, bias], list(node.output), name=f"{node.name}/bias"))
    return nodes


def mlp_nodes(model, spec) -> dict[tuple[int, str], object]:
    """The weight node of every MLP member ``(layer, registry path)``: by optimum's module-path names or the
    genai builder's (``/model/layers.{i}/mlp/gate_proj/MatMul``)."""
    import re

    from .quantize_graph import weight_matmuls
    from .registry import optimum_node_pattern

    patterns = {path: (re.compile(optimum_node_pattern(spec, path)),
                       re.compile(r"^/model/layers\.(\d+)/" + re.escape(path.replace(".", "/")) + "/"))
                for path in (*spec.mlp_in, spec.mlp_out)}
    found = {}
    for node in weight_matmuls(model):
        for path, rules in patterns.items():
            match = next((m for rule in rules if (m := rule.match(node.name))), None)
            if match:
                found[(int(match.group(1)), path)] = node
                break
    return found


def graft_mlp(model, spec, layers: list) -> list[str]:
    """Replace every layer's MLP weight nodes by its factors (:class:`MlpFactors`, or a dict of :class:`TTFactors` by
    registry path), in place (initializers only the removed nodes read are dropped). Returns the new weight MatMul
    nodes' names."""
    from onnx import numpy_helper

    found = mlp_nodes(model, spec)
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    replaced: dict[str, list] = {}
    for i, factors in enumerate(layers):
        missing = [p for p in (*spec.mlp_in, spec.mlp_out) if (i, p) not in found]
        if missing:
            raise GraphMappingError(f"layer {i}: no weight node for {', '.join(missing)} in the graph")
        prefix = f"lestd.layers.{i}.mlp"
        if isinstance(factors, dict):  # TT-matrix weights, each on its own
            for path, member in factors.items():
                replaced[found[(i, path)].name], tensors = tt_product(found[(i, path)], f"{prefix}.{path}", member)
                model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in tensors.items())
            continue
        tensors = {f"{prefix}.in.basis": factors.basis, f"{prefix}.out.basis": factors.output[0],
                   f"{prefix}.out.expand": factors.output[1],
                   **{f"{prefix}.{p}.expand": e for p, e in factors.expands.items()}}
        model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k)
                                       for k, v in tensors.items())
        inputs = sorted(spec.mlp_in, key=lambda p: order[found[(i, p)].name])  # the basis before its first reader
        shared = None
        for path in inputs:
            node = found[(i, path)]
            if node.input[0] != found[(i, inputs[0])].input[0]:
                raise GraphMappingError(f"layer {i}: {path} does not read the MLP input that {inputs[0]} reads")
            replaced[node.name] = factored_product(node, None if shared else f"{prefix}.in.basis",
                                                   f"{prefix}.{path}.expand", shared)
            shared = shared or replaced[node.name][0].output[0]
        node = found[(i, spec.mlp_out)]
        replaced[node.name] = factored_product(node, f"{prefix}.out.basis", f"{prefix}.out.expand")
    replace_nodes(model.graph, replaced)
    return [n.name for nodes in replaced.values() for n in nodes if n.op_type == "MatMul"]


@dataclass
class EmbeddingFactors:
    """A factored token table as stored (row-vector convention): ``table [V, r]`` and ``expand [r, d]`` with
    ``E ~ table @ expand``; ``head``: an untied lm_head's pair (``[d, r']``, ``[r', V]``), None when tied."""

    table: np.ndarray
    expand: np.ndarray
    head: tuple[np.ndarray, np.ndarray] | None

    @property
    def product(self) -> np.ndarray:
        return self.table @ self.expand  # [V, d]

    @classmethod
    def from_model(cls, model) -> EmbeddingFactors | None:
        """The factors of a model whose token table ``compress`` factored (else None)."""
        from .modules import FactoredEmbedding, FactoredLinear

        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if not isinstance(embedding, FactoredEmbedding):
            return None
        untied = (_numpy(head.basis.weight).T, _numpy(head.expand.weight).T) if isinstance(head, FactoredLinear) \
            else None
        return cls(_numpy(embedding.table.weight), _numpy(embedding.expand.weight).T, untied)


def token_lookup(model, product: np.ndarray) -> tuple:
    """``(Gather, Transpose or None)`` of the lookup in the token table whose values are ``product [V, d]``."""
    from onnx import numpy_helper

    from .quantize_graph import token_tables

    initializers = {init.name: init for init in model.graph.initializer}
    for gather, transpose, name in token_tables(model):
        table = numpy_helper.to_array(initializers[name])
        table = table.T if transpose is not None else table
        if table.shape == product.shape and np.allclose(table, product, rtol=1e-5, atol=1e-6):
            return gather, transpose
    raise GraphMappingError(f"no lookup in a {product.shape[0]} x {product.shape[1]} token table in the graph")


def head_node(model):
    """The one weight node (:func:`~.quantize_graph.weight_matmuls`) that writes the logits: the lm_head."""
    from .quantize_graph import head_weights, weight_matmuls

    matmuls = weight_matmuls(model)
    names = head_weights(model, matmuls)
    heads = [m for m in matmuls if m.input[1] in names]
    if len(heads) != 1:
        raise GraphMappingError(f"expected one lm_head weight node writing the logits, found {len(heads)}")
    return heads[0]


@dataclass
class EmbeddingSites:
    """Where a dense graph reads its token table: the lookup ``Gather`` (through the ``Transpose`` of the builder's
    tied ``[d, V]`` weight, else None) and the lm_head's weight node."""

    gather: object
    transpose: object
    head: object

    @classmethod
    def locate(cls, model, table: np.ndarray) -> EmbeddingSites:
        """The sites of the table whose values are ``table [V, d]``."""
        return cls(*token_lookup(model, table), head_node(model))

    @property
    def node_names(self) -> set[str]:
        return {self.gather.name, self.head.name, *([self.transpose.name] if self.transpose is not None else [])}


def graft_embedding(model, sites: EmbeddingSites, factors: EmbeddingFactors) -> list[str]:
    """Replace the token lookup and the lm_head of a dense graph (``sites``, of the table holding
    ``factors.product``) by the factors, in place. Returns the new weight nodes' names."""
    from onnx import helper, numpy_helper

    gather, transpose, head = sites.gather, sites.transpose, sites.head
    prefix = "lestd.embedding"
    tensors = {f"{prefix}.table": factors.table, f"{prefix}.expand": factors.expand}
    if factors.head is None:
        tensors[f"{prefix}.head_basis"] = factors.expand.T  # [d, r]: h @ B^T as a plain MatMul
    else:
        tensors[f"{prefix}.head.basis"], tensors[f"{prefix}.head.expand"] = factors.head
    model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k)
                                   for k, v in tensors.items())
    lookup = f"{gather.name}/factored_rows"
    replaced = {gather.name: [
        helper.make_node("Gather", [f"{prefix}.table", gather.input[1]], [lookup], name=f"{gather.name}/factored"),
        helper.make_node("MatMul", [lookup, f"{prefix}.expand"], list(gather.output), name=f"{gather.name}/expand")]}
    if transpose is not None and all(n is gather for n in model.graph.node if transpose.output[0] in n.input):
        replaced[transpose.name] = []
    if factors.head is not None:
        replaced[head.name] = factored_product(head, f"{prefix}.head.basis", f"{prefix}.head.expand")
    else:
        latent = f"{head.name}/latent"
        replaced[head.name] = [
            helper.make_node("MatMul", [head.input[0], f"{prefix}.head_basis"], [latent], name=f"{head.name}/basis"),
            helper.make_node("FusedMatMul", [latent, f"{prefix}.table"], list(head.output), name=f"{head.name}/table",
                             domain="com.microsoft", transB=1)]
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    replace_nodes(model.graph, replaced)
    return [n.name for nodes in replaced.values() for n in nodes if n.op_type in ("MatMul", "FusedMatMul")]
