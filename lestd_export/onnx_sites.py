"""Where a decoder ONNX graph computes each layer's attention projections (DESIGN.md 3.1).

An :class:`AttentionSite` names the projection nodes of one layer, the tensors they read and the
tensors they write. Grafting (:mod:`.graft`) replaces those nodes by a compressed subgraph that
writes the *same* output names, so attention, rotary, norm nodes and the runtime configs stay valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import LestdError


class GraphMappingError(LestdError):
    """The graph's attention projections could not be located or do not have the expected shapes."""


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


# name rules per producer: (layer pattern, packed qkv, separate q/k/v, output projection)
NAME_RULES = {
    "onnxruntime-genai": (r"^/model/layers\.(\d+)/attn/", "qkv_proj/MatMul", ("q_proj/MatMul", "k_proj/MatMul",
                                                                            "v_proj/MatMul"), "o_proj/MatMul"),
    "optimum": (r"^/model/layers\.(\d+)/self_attn/", None, ("q_proj/MatMul", "k_proj/MatMul", "v_proj/MatMul"),
                "o_proj/MatMul"),
}


def locate_by_name(model, quantised_ok: bool = False) -> tuple[str, list[AttentionSite]]:
    """Sites found by the known producers' node names: ``(producer, sites in layer order)``.

    Raises :class:`GraphMappingError` when no producer's rules match every layer, or when a matched
    node is quantised (``MatMulNBits``: compress the fp32 model, then quantise) unless
    ``quantised_ok`` (grafting into a builder's int4/int8 model whose dense weights are not read).
    """
    nodes = {}
    for node in model.graph.node:  # the builder names its quantised nodes ".../MatMul_Q4" or "_Q8"
        name = re.sub(r"/MatMul_Q\d+$", "/MatMul", node.name) if quantised_ok else node.name
        nodes[name] = node
    for producer, (prefix, packed, separate, out) in NAME_RULES.items():
        layers = sorted({int(m.group(1)) for name in nodes if (m := re.match(prefix, name))})
        if not layers:
            continue
        sites = []
        for layer in layers:
            base = prefix.replace(r"(\d+)", str(layer)).replace("\\", "").lstrip("^")
            if not quantised_ok:
                _refuse_quantised(nodes, base)
            qkv = (base + packed,) if packed and base + packed in nodes else tuple(base + n for n in separate)
            if not all(name in nodes for name in (*qkv, base + out)):
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
    quantised = [name for name, node in nodes.items() if name.startswith(base) and node.op_type == "MatMulNBits"]
    if quantised:
        raise GraphMappingError(f"{quantised[0]} is already quantised (MatMulNBits): compress the fp32 model "
                                "(e.g. the builder's -p fp32 output), then quantise with --quantize")
