"""The refit of an ONNX input's kept values through ONNX Runtime: layer by layer on the compressed model's
own inputs (:func:`sequential_refit_onnx`, where the graph can be cut at each layer's attention input,
:class:`LayerCuts`), else against the dense model's activations (:func:`dense_refit`)."""

from __future__ import annotations

import numpy as np

from ..onnx_sites import AttentionSite, GraphMappingError
from .capture import CAPTURE_BATCH
from .sessions import decoder_feed, is_stub, node_inputs, subgraph_model, subgraph_session
from .source import OnnxInput


class LayerCuts:
    """Cuts through a decoder graph at each layer's attention input ``X_i``: ``ancestors[i]`` are the
    nodes ``X_i`` needs and ``live[i]`` the tensors they produce that later nodes read (the residual
    stream, masks, rotary tables...): the state from which layer ``i`` onwards can run on its own."""

    def __init__(self, model, sites: list[AttentionSite]):
        graph = model.graph
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        consumers: dict[str, set[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node_inputs(node):
                consumers.setdefault(name, set()).add(i)
        self.ancestors, self.live = [], []
        for site in sites:
            nodes, stack = set(), [site.qkv_input]
            while stack:
                index = producer.get(stack.pop())
                if index is not None and index not in nodes:
                    nodes.add(index)
                    stack.extend(i for i in node_inputs(graph.node[index]) if i)
            if self.ancestors and not self.ancestors[-1] <= nodes:
                raise GraphMappingError(f"layer {site.layer}'s attention input does not depend on the layers "
                                        "before it: the graph cannot be replayed layer by layer")
            self.ancestors.append(nodes)
            self.live.append(sorted({out for i in nodes for out in graph.node[i].output
                                     if out and consumers.get(out, set()) - nodes}))


def _gram(xs: list[np.ndarray], ys: list[np.ndarray] | None = None) -> np.ndarray:
    """``sum_b x_b^T y_b / N`` (float64) over aligned lists of ``[..., a]`` and ``[..., b]`` arrays."""
    total, count = None, 0
    for j, x in enumerate(xs):
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        y = x if ys is None else np.asarray(ys[j], dtype=np.float64).reshape(-1, ys[j].shape[-1])
        product = x.T @ y
        total = product if total is None else total + product
        count += x.shape[0]
    return total / max(count, 1)


def sequential_refit_onnx(source: OnnxInput, cores: list, tensors: list[np.ndarray], data, groups, *,
                          target: str = "layer", damping: float = 1e-6, bits: int | None = None,
                          progress: bool = True, cuts: LayerCuts | None = None) -> list[dict]:
    """The layer-by-layer refit of ``compress`` (:func:`~lestd_export.refit.sequential_refit`), replayed through ONNX
    Runtime: the graph is cut at every layer's attention input (:class:`LayerCuts`), the cut's tensors
    are carried from layer to layer for each calibration batch, and layer ``i`` runs as its own small
    session: Q/K/V refit on its compressed-stream input ``Xc``, the layer grafted and run to the output
    projection's input (``Hc``, from the refit Q/K/V), O refit on ``Hc``, then the finished layer run
    to the next cut. ``target`` ``layer`` fits the dense weights on the compressed stream (``Xc W``);
    ``model`` fits the dense model's outputs (``Xd W``, a dense stream carried alongside); ``bits`` rounds
    Q/K/V's ``U1`` columns to their int grid first (as ``sequential_refit``). Returns per layer and group the
    relative calibration output error before and after (against that target)."""
    from tqdm.auto import tqdm

    from ..graft import LatentLayer, graft_attention
    from ..refit import refit_output, refit_qkv

    model, sites = source.model, source.sites
    cuts = cuts or LayerCuts(model, sites)
    batches = [data.sequences[start:start + CAPTURE_BATCH] for start in range(0, len(data.sequences), CAPTURE_BATCH)]

    originals = {init.name: init for init in model.graph.initializer}

    def run(part, outputs: list[str], states: list[dict]) -> list[dict]:
        session = subgraph_session(part, originals)
        results = [dict(zip(outputs, session.run(outputs, decoder_feed(session, source.io, source.shape, ids,
                                                                       source.genai_decoder, state))))
                   for ids, state in zip(batches, states)]
        del session
        return results

    def types(states: list[dict]) -> dict:
        return {name: value.dtype for name, value in states[0].items()}

    def grafted(part, core):
        import onnx

        copy = onnx.ModelProto()
        copy.CopyFrom(part)  # stubs: no weight data is copied
        graft_attention(copy, [site], [LatentLayer.from_core(core)])
        originals.update((init.name, init) for init in copy.graph.initializer if not is_stub(init))
        return copy

    def advance(layer, core, following, given, states):
        """The states at the next cut: ``layer`` (dense, or grafted with ``core``) run from the current one."""
        new = [t for t in following if t not in states[0]]
        part = layer if core is None else grafted(layer, core)
        outs = run(subgraph_model(part, new, given), new, states)
        return [{t: (state[t] if t in state else out[t]) for t in following} for state, out in zip(states, outs)]

    compressed = run(subgraph_model(model, cuts.live[0]), cuts.live[0], [{} for _ in batches])
    dense = compressed if target == "model" else None
    errors = []
    for i in tqdm(range(len(sites)), desc="refit (layer by layer, onnxruntime)", unit="layer", disable=not progress):
        site, core = sites[i], cores[i]
        last = i + 1 == len(sites)
        following = [site.o_output] if last else cuts.live[i + 1]
        xc = [state[site.qkv_input] for state in compressed]
        xd = xc if dense is None else [state[site.qkv_input] for state in dense]
        c_cc = _gram(xc)
        c_cd, c_dd = (c_cc, c_cc) if dense is None else (_gram(xc, xd), _gram(xd))
        record = refit_qkv(core, tensors[i], groups, c_cc, c_cd, c_dd, damping, bits)
        given = types(compressed)
        layer = subgraph_model(model, [site.o_input, *following], given)  # the dense layer from the cut on
        if "o" not in core.groups:  # the output projection stays dense: nothing more to refit in this layer
            errors.append(record)
            if not last:
                compressed = advance(layer, core, following, given, compressed)
                if dense is not None:
                    dense = advance(layer, None, following, given, dense)
            continue
        if dense is not None:
            new = [t for t in following if t not in dense[0]]
            dense_out = run(subgraph_model(layer, [site.o_input, *new], given), [site.o_input, *new], dense)
            hd = [out[site.o_input] for out in dense_out]
        hc = [out[site.o_input] for out in run(subgraph_model(grafted(layer, core), [site.o_input], given),
                                               [site.o_input], compressed)]
        if dense is None:
            hd = hc
        h_cc = _gram(hc)
        h_cd, h_dd = (h_cc, h_cc) if dense is None else (_gram(hc, hd), _gram(hd))
        record["o"] = refit_output(core, tensors[i], groups, h_cc, h_cd, h_dd, damping)
        errors.append(record)
        if last:
            break
        compressed = advance(layer, core, following, given, compressed)
        if dense is not None:
            dense = [{t: (state[t] if t in state else out[t]) for t in following}
                     for state, out in zip(dense, dense_out)]
    return errors


def dense_refit(cores: list, tensors: list[np.ndarray], statistics: list, groups, damping: float = 1e-6,
                bits: int | None = None) -> list[dict]:
    """Refit every layer's kept values against the dense model's activations (see the module doc):
    Q/K/V on the input Gram (``bits``: after rounding their ``U1`` columns to the int grid), O on the head
    Gram; a refit is kept only where it lowers the layer's calibration output error. Returns per layer and
    group the relative output error before and after."""
    from ..refit import refit_output, refit_qkv

    errors = []
    for core, dense, stats in zip(cores, tensors, statistics):
        x, h = stats.x_gram, stats.h_gram
        record = refit_qkv(core, dense, groups, x, x, x, damping, bits)
        if "o" in core.groups:  # unless the output projection stays dense
            record["o"] = refit_output(core, dense, groups, h, h, h, damping)
        errors.append(record)
    return errors
