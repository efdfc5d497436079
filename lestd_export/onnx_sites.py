"""Where a decoder ONNX graph computes each layer's attention projections (DESIGN.md 3.1).

An :class:`AttentionSite` names the projection nodes of one layer, the tensors they read and the
tensors they write. Grafting (:mod:`.graft`) replaces those nodes by a compressed subgraph that
writes the *same* output names, so attention, rotary, norm nodes and the runtime configs stay valid.

Sites are found by the known producers' node names (:func:`locate_by_name`) or, where the names do
not match, by the graph's structure (:func:`locate_by_structure`: from each layer's ``present`` key
and value outputs back to the nearest MatMul with a 2-D initializer, then forward from the queries to
the output projection). :func:`locate` does both and checks every weight's shape against the head
counts (:func:`head_counts`: genai_config.json, config.json and the graph, which must agree);
:func:`read_site_weights` returns a site's dense Q, K, V, O as float64 ``[in, out]`` matrices.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from .errors import LestdError
from .registry import ONNX_NAMES, REGISTRY, ArchSpec, AttentionShape, optimum_node_pattern


class GraphMappingError(LestdError):
    """The graph's attention projections could not be located or do not have the expected shapes."""


class NotADecoderError(GraphMappingError):
    """The graph is not a decoder with a KV cache (no input_ids, logits or present key/value tensors)."""


class QuantisedGraphError(GraphMappingError):
    """The attention projections are already quantised (MatMulNBits, MatMulInteger, ...)."""


QUANTISED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                           "MatMulIntegerToFloat", "MatMulFpQ4", "MatMulBnb4", "DequantizeLinear",
                           "GatherBlockQuantized"})
QUANTISED_HINT = ("compress the fp32 model (e.g. the onnxruntime-genai builder's -p fp32 output, or the dense "
                  "lestd-export export), then quantise with --quantize")
ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention"})  # (query, key, value, ...) -> (out, k, v)
SHAPE_OPS = frozenset({"Shape", "Size"})  # their outputs do not depend on values: never traced through
DEFAULT_PRESENT = ("present.%d.key", "present.%d.value")
DEFAULT_PAST = ("past_key_values.%d.key", "past_key_values.%d.value")


@dataclass(frozen=True)
class AttentionSite:
    """One decoder layer's projections in a graph (all names are graph names).

    ``qkv_nodes`` are the MatMul node(s) computing Q, K and V from ``qkv_input`` (the normed hidden
    states ``[B, T, d]``): one node for a packed ``qkv_proj`` (``qkv_outputs`` then holds one tensor
    ``[B, T, (h + 2 h_kv) d_h]``, columns Q|K|V head-major) or three (q, k, v order). ``o_node`` maps
    the heads ``o_input [B, T, h d_h]`` to ``o_output [B, T, d]``. Bias ``Add`` nodes, when a model
    has them, follow these MatMuls and are left in place.
    """

    layer: int
    qkv_nodes: tuple[str, ...]
    qkv_input: str
    qkv_outputs: tuple[str, ...]
    o_node: str
    o_input: str
    o_output: str

    @property
    def packed(self) -> bool:
        return len(self.qkv_nodes) == 1


def name_rules(spec: ArchSpec | None = None) -> dict[str, tuple[str, str | None, tuple[str, ...], str]]:
    """Per producer: ``(layer pattern, packed qkv, separate q/k/v, output projection)`` node names, from the
    registry (:data:`~.registry.ONNX_NAMES` for the genai builder; the architecture's module paths for
    optimum, a Llama-style layout when the architecture is not known). The pattern's group 1 is the layer."""
    qkv, out = ONNX_NAMES["attention.qkv"], ONNX_NAMES["attention.o"]  # qkv: packed, then q, k, v
    spec = spec or REGISTRY["llama"]
    members = [f"{m}/MatMul" for m in ((spec.fused_qkv,) if spec.fused_qkv else (spec.q, spec.k, spec.v))]
    attn = qkv[0].split("/")[0] + "/"  # the builder's attention scope, "attn/"
    return {"onnxruntime-genai": (r"^/model/layers\.(\d+)/" + attn, qkv[0].removeprefix(attn) + "/MatMul",
                                  tuple(n.removeprefix(attn) + "/MatMul" for n in qkv[1:4]),
                                  out[0].removeprefix(attn) + "/MatMul"),
            "optimum": (optimum_node_pattern(spec, spec.attention), members[0] if spec.fused_qkv else None,
                        () if spec.fused_qkv else tuple(members), f"{spec.o}/MatMul")}


def locate_by_name(model, quantised_ok: bool = False, spec: ArchSpec | None = None
                   ) -> tuple[str, list[AttentionSite]]:
    """Sites found by the known producers' node names: ``(producer, sites in layer order)``.

    Raises :class:`GraphMappingError` when no producer's rules match every layer, or when a matched
    node is quantised (``MatMulNBits``: compress the fp32 model, then quantise) unless
    ``quantised_ok`` (grafting into a builder's int4/int8 model whose dense weights are not read).
    ``spec``: the architecture, whose module paths are optimum's node names (:func:`name_rules`).
    """
    nodes = {}
    for node in model.graph.node:  # the builder names its quantised nodes ".../MatMul_Q4" or "_Q8"
        name = re.sub(r"/MatMul_Q\d+$", "/MatMul", node.name) if quantised_ok else node.name
        nodes[name] = node
    for producer, (prefix, packed, separate, out) in name_rules(spec).items():
        bases = {int(m.group(1)): m.group(0) for name in nodes if (m := re.match(prefix, name))}
        if not bases:
            continue
        sites = []
        for layer, base in sorted(bases.items()):
            if not quantised_ok:
                _refuse_quantised(nodes, base)
            qkv = (base + packed,) if packed and base + packed in nodes else tuple(base + n for n in separate)
            if not qkv or not all(name in nodes for name in (*qkv, base + out)):
                break
            inputs = {nodes[name].input[0] for name in qkv}
            if len(inputs) != 1:
                raise GraphMappingError(f"layer {layer}: the q/k/v projections read different tensors {sorted(inputs)}")
            o = nodes[base + out]
            sites.append(AttentionSite(layer, tuple(nodes[name].name for name in qkv), inputs.pop(),
                                       tuple(nodes[name].output[0] for name in qkv), o.name, o.input[0], o.output[0]))
        else:
            if sites:
                return producer, sites
    raise GraphMappingError("found no attention projections by the onnxruntime-genai or optimum node names")


def _refuse_quantised(nodes: dict, base: str) -> None:
    quantised = [name for name, node in nodes.items() if name.startswith(base) and node.op_type in QUANTISED_OPS]
    if quantised:
        raise QuantisedGraphError(f"{quantised[0]} is already quantised ({nodes[quantised[0]].op_type}): "
                                  + QUANTISED_HINT)


# ------------------------------------------------------------------------------------- head counts


def _pattern_regex(pattern: str) -> re.Pattern:
    """``"present.%d.key"`` -> a regex matching it with the layer number as group 1."""
    return re.compile("^" + re.escape(pattern).replace("%d", r"(\d+)") + "$")


@dataclass(frozen=True)
class DecoderIO:
    """The decoder's cache tensors by layer: ``past[i] = (key, value)`` inputs, ``present[i]`` outputs."""

    past: dict[int, tuple[str, str]]
    present: dict[int, tuple[str, str]]

    @property
    def layers(self) -> list[int]:
        return sorted(self.present)


def decoder_io(model, genai_decoder: dict | None = None) -> DecoderIO:
    """The KV-cache inputs and outputs of a decoder graph (names from genai_config.json when given).

    Raises :class:`NotADecoderError` when the graph has no ``input_ids`` input, no ``logits`` output
    or no per-layer present key/value outputs.
    """
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    names_in = dict(genai_decoder.get("inputs", {})) if genai_decoder else {}
    names_out = dict(genai_decoder.get("outputs", {})) if genai_decoder else {}
    ids, logits = names_in.get("input_ids", "input_ids"), names_out.get("logits", "logits")
    present_patterns = (names_out.get("present_key_names", DEFAULT_PRESENT[0]),
                        names_out.get("present_value_names", DEFAULT_PRESENT[1]))
    past_patterns = (names_in.get("past_key_names", DEFAULT_PAST[0]), names_in.get("past_value_names", DEFAULT_PAST[1]))

    def by_layer(names, patterns):
        found = {}
        for kind, pattern in enumerate(patterns):
            regex = _pattern_regex(pattern)
            for name in names:
                if m := regex.match(name):
                    found.setdefault(int(m.group(1)), [None, None])[kind] = name
        return {i: tuple(pair) for i, pair in found.items() if None not in pair}

    present, past = by_layer(outputs, present_patterns), by_layer(inputs, past_patterns)
    missing = [what for what, ok in ((f"an {ids} input", ids in inputs), (f"a {logits} output", logits in outputs),
                                     ("present key/value outputs", bool(present))) if not ok]
    if missing:
        raise NotADecoderError(f"the graph is not a decoder with a KV cache (it has no {', no '.join(missing)}): "
                               "give an onnxruntime-genai build or an optimum text-generation-with-past export")
    if sorted(present) != list(range(len(present))):
        raise NotADecoderError(f"present key/value outputs for layers {sorted(present)}: "
                               f"expected 0..{len(present) - 1}")
    return DecoderIO(past, present)


def _first(mapping: dict, *keys):
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            return value
    return None


def config_head_counts(config: dict, genai: bool) -> dict:
    """``hidden``, ``heads``, ``kv_heads``, ``head_dim``, ``layers`` and ``max_positions`` from a
    genai_config.json (``genai=True``) or a Hugging Face config.json (missing entries are None)."""
    if genai:
        model = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
        decoder = model.get("decoder", {}) if isinstance(model.get("decoder"), dict) else {}
        counts = {"hidden": decoder.get("hidden_size"), "heads": decoder.get("num_attention_heads"),
                  "kv_heads": decoder.get("num_key_value_heads"), "head_dim": decoder.get("head_size"),
                  "layers": decoder.get("num_hidden_layers"), "max_positions": model.get("context_length")}
    else:
        source = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        heads = _first(source, "num_attention_heads", "n_head", "num_heads")
        hidden = _first(source, "hidden_size", "n_embd", "d_model")
        kv = _first(source, "num_key_value_heads", "num_kv_heads", "n_head_kv")
        if kv is None and source.get("multi_query"):
            kv = 1
        head_dim = _first(source, "head_dim")
        if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
            head_dim = hidden // heads
        counts = {"hidden": hidden, "heads": heads, "kv_heads": kv if kv is not None else heads, "head_dim": head_dim,
                  "layers": _first(source, "num_hidden_layers", "n_layer", "num_layers"),
                  "max_positions": _first(source, "max_position_embeddings", "n_positions", "n_ctx")}
    return {k: (int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None) for k, v in counts.items()}


def graph_head_counts(model, io: DecoderIO) -> dict:
    """What the graph itself says: ``kv_heads``/``head_dim`` from a static past input ``[B, Hkv, S, D]``,
    ``heads``/``kv_heads`` from GroupQueryAttention/MultiHeadAttention attributes (entries may be None)."""
    counts: dict = {"heads": None, "kv_heads": None, "head_dim": None, "layers": len(io.present)}
    if io.past:
        key = io.past[min(io.past)][0]
        for value in model.graph.input:
            if value.name == key:
                dims = value.type.tensor_type.shape.dim
                if len(dims) == 4:
                    if dims[1].HasField("dim_value"):
                        counts["kv_heads"] = int(dims[1].dim_value)
                    if dims[3].HasField("dim_value"):
                        counts["head_dim"] = int(dims[3].dim_value)
    for node in model.graph.node:
        if node.op_type in ATTENTION_OPS:
            attributes = {a.name: a.i for a in node.attribute}
            counts["heads"] = attributes.get("num_heads") or None
            counts["kv_heads"] = attributes.get("kv_num_heads") or counts["kv_heads"] or counts["heads"]
            break
    return counts


def head_counts(config: dict, genai: bool, model, io: DecoderIO, config_name: str = "the config") -> AttentionShape:
    """The attention shape from the config, checked against the graph; a :class:`GraphMappingError`
    names any disagreement or a count that neither gives."""
    from_config = config_head_counts(config, genai)
    from_graph = graph_head_counts(model, io)
    for key in ("heads", "kv_heads", "head_dim", "layers"):
        a, b = from_config.get(key), from_graph.get(key)
        if a is not None and b is not None and a != b:
            raise GraphMappingError(f"{config_name} says {key} = {a} but the graph has {b}: the config does not "
                                    "belong to this model")
    merged = {k: from_config.get(k) if from_config.get(k) is not None else from_graph.get(k)
              for k in ("hidden", "heads", "kv_heads", "head_dim")}
    missing = [k for k, v in merged.items() if not v]
    if missing:
        raise GraphMappingError(f"{config_name} gives no {', '.join(missing)} and the graph does not tell: "
                                "add them to the config")
    if merged["heads"] % merged["kv_heads"]:
        raise GraphMappingError(f"{merged['heads']} attention heads are not a multiple of {merged['kv_heads']} "
                                "key/value heads")
    return AttentionShape(hidden=merged["hidden"], heads=merged["heads"], kv_heads=merged["kv_heads"],
                          head_dim=merged["head_dim"])


def replace_nodes(graph, replaced: dict[str, list]) -> None:
    """Put ``replaced[name]`` (nodes, possibly none) in the place of each named node, so the graph stays
    topologically sorted, and drop the initializers that only the removed nodes read."""
    removed_inputs = {i for node in graph.node if node.name in replaced for i in node.input}
    nodes = []
    for node in graph.node:
        nodes += replaced.get(node.name, [node])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name not in removed_inputs or init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ---------------------------------------------------------------------------------- structural rule


class _Graph:
    """Producers, consumers and 2-D initializers of a graph, for tracing."""

    def __init__(self, model):
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def weight(self, node):
        """The 2-D initializer a ``MatMul`` multiplies by on the right, or None."""
        if node.op_type != "MatMul" or len(node.input) < 2:
            return None
        init = self.initializers.get(node.input[1])
        return init if init is not None and len(init.dims) == 2 else None

    def back(self, tensor: str, want: str) -> tuple[list, list]:
        """Weight MatMuls (and quantised projections) nearest upstream of ``tensor``, not crossing
        them or shape ops; at a fused attention op only its ``want`` ("key"/"value") input is followed."""
        found, quantised, seen, queue = [], [], set(), deque([tensor])
        while queue:
            name = queue.popleft()
            node = self.producer.get(name)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if self.weight(node) is not None:
                found.append(node)
                continue
            if node.op_type in QUANTISED_OPS:
                quantised.append(node)
                continue
            if node.op_type in SHAPE_OPS:
                continue
            inputs = list(node.input)
            if node.op_type in ATTENTION_OPS:
                index = {"key": 1, "value": 2}[want]
                inputs = [inputs[index] if len(inputs) > index and inputs[index] else inputs[0]]
            queue.extend(i for i in inputs if i)
        return found, quantised

    def forward(self, tensor: str) -> list:
        """Weight MatMuls nearest downstream of ``tensor`` (not crossing them or shape ops)."""
        found, seen, queue = [], set(), deque([tensor])
        while queue:
            for node in self.consumers.get(queue.popleft(), []):
                if node.name in seen:
                    continue
                seen.add(node.name)
                if self.weight(node) is not None:
                    found.append(node)
                elif node.op_type not in SHAPE_OPS:
                    queue.extend(o for o in node.output if o)
        return found


def _one(nodes: list, what: str, layer: int):
    unique = {node.name: node for node in nodes}
    if len(unique) != 1:
        names = ", ".join(sorted(unique)[:4]) or "none"
        raise GraphMappingError(f"layer {layer}: expected one {what} projection, found {names}")
    return next(iter(unique.values()))


def locate_by_structure(model, io: DecoderIO, shape: AttentionShape) -> list[AttentionSite]:
    """Sites found from the graph's structure (any node names): for layer ``i``, the MatMuls with a 2-D
    initializer nearest upstream of ``present.i.key`` and ``present.i.value`` are the key and value
    projections (one packed node when they coincide); the query projection reads the same tensor with
    ``h d_h`` columns, and the output projection is the nearest weight MatMul downstream of the queries."""
    graph = _Graph(model)
    q_width = shape.heads * shape.head_dim
    sites = []
    for layer in io.layers:
        traced = {}
        for want, tensor in zip(("key", "value"), io.present[layer]):
            found, quantised = graph.back(tensor, want)
            if quantised:
                raise QuantisedGraphError(f"layer {layer}'s {want} projection {quantised[0].name} is already "
                                          f"quantised ({quantised[0].op_type}): " + QUANTISED_HINT)
            traced[want] = _one(found, want, layer)
        k, v = traced["key"], traced["value"]
        if k.input[0] != v.input[0]:
            raise GraphMappingError(f"layer {layer}: the key and value projections read different tensors")
        x = k.input[0]
        if k.name == v.name:
            qkv = (k,)
            start = k.output[0]
        else:
            queries = [n for n in graph.consumers.get(x, []) if n.name not in (k.name, v.name)
                       and graph.weight(n) is not None and graph.weight(n).dims[1] == q_width]
            q = _one(queries, f"query ({q_width}-column)", layer)
            qkv = (q, k, v)
            start = q.output[0]
        outputs = [n for n in graph.forward(start) if graph.weight(n).dims[0] == q_width]
        o = _one(outputs, f"output ({q_width}-row)", layer)
        sites.append(AttentionSite(layer, tuple(n.name for n in qkv), x, tuple(n.output[0] for n in qkv),
                                   o.name, o.input[0], o.output[0]))
    return sites


# -------------------------------------------------------------------------------- locate and check


def locate(model, io: DecoderIO, shape: AttentionShape, spec: ArchSpec | None = None
           ) -> tuple[str, list[AttentionSite]]:
    """``(producer, sites)``: by name rules where they match (``spec``: the architecture, when known), else by
    structure; shapes checked (:func:`check_sites`), one site per layer of the KV cache."""
    try:
        producer, sites = locate_by_name(model, spec=spec)
    except QuantisedGraphError:
        raise
    except GraphMappingError:
        producer, sites = "structure", locate_by_structure(model, io, shape)
    if [s.layer for s in sites] != io.layers:
        if producer == "structure":
            raise GraphMappingError(f"found attention projections for layers {[s.layer for s in sites]} but the "
                                    f"KV cache has layers {io.layers}")
        producer, sites = "structure", locate_by_structure(model, io, shape)
    check_sites(model, sites, shape)
    return producer, sites


def _site_weights(model, site: AttentionSite) -> tuple[list, object]:
    """The initializers of a site's Q/K/V nodes (in order) and of its output node."""
    graph = _Graph(model)
    nodes = {node.name: node for node in model.graph.node}
    found = []
    for name in (*site.qkv_nodes, site.o_node):
        node = nodes.get(name)
        if node is None:
            raise GraphMappingError(f"layer {site.layer}: node {name} is not in the graph")
        if node.op_type in QUANTISED_OPS:
            raise QuantisedGraphError(f"{name} is already quantised ({node.op_type}): " + QUANTISED_HINT)
        weight = graph.weight(node)
        if weight is None:
            raise GraphMappingError(f"layer {site.layer}: {name} ({node.op_type}) does not multiply by a 2-D "
                                    "initializer: its weight cannot be read")
        found.append(weight)
    return found[:-1], found[-1]


def check_sites(model, sites: list[AttentionSite], shape: AttentionShape) -> None:
    """Every site's weights are fp32 2-D initializers of the shapes the head counts imply."""
    from onnx import TensorProto

    d, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    for site in sites:
        qkv, o = _site_weights(model, site)
        expected = [(d, q + 2 * kv)] if site.packed else [(d, q), (d, kv), (d, kv)]
        for init, want, what in zip([*qkv, o], [*expected, (q, d)], (["qkv"] if site.packed else ["q", "k", "v"])
                                    + ["o"]):
            if init.data_type != TensorProto.FLOAT:
                raise GraphMappingError(f"layer {site.layer}: the {what} weight {init.name} is "
                                        f"{TensorProto.DataType.Name(init.data_type)}, not FLOAT: give the fp32 model")
            if tuple(init.dims) != want:
                raise GraphMappingError(f"layer {site.layer}: the {what} weight {init.name} is {list(init.dims)}, "
                                        f"expected {list(want)} for d={d}, {shape.heads} heads, {shape.kv_heads} "
                                        f"key/value heads of {shape.head_dim} (is the model already compressed?)")


def read_site_weights(model, site: AttentionSite, shape: AttentionShape, base_dir: str = "") -> dict[str, np.ndarray]:
    """Dense ``q [d, h d_h]``, ``k``/``v [d, h_kv d_h]``, ``o [h d_h, d]`` (float64, ``y = x W``); a packed
    ``qkv`` is split by the head counts (columns Q|K|V, head-major). Raises on NaN/Inf."""
    from onnx import numpy_helper

    from .errors import NonFiniteWeightsError

    qkv, o = _site_weights(model, site)
    arrays = [numpy_helper.to_array(init, base_dir).astype(np.float64) for init in [*qkv, o]]
    if site.packed:
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        w = arrays[0]
        matrices = {"q": w[:, :q], "k": w[:, q:q + kv], "v": w[:, q + kv:q + 2 * kv]}
    else:
        matrices = dict(zip(("q", "k", "v"), arrays[:3]))
    matrices["o"] = arrays[-1]
    for name, w in matrices.items():
        if not np.isfinite(w).all():
            raise NonFiniteWeightsError(f"layer {site.layer} {name}-projection has NaN/Inf weights: the model file "
                                        "is corrupt")
    return matrices
