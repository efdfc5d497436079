"""ONNX Runtime sessions of parts of a decoder graph: :func:`subgraph_model` keeps what some outputs
need (optionally cut at given tensors), its large initializers stubs whose data stays in the source
model; :func:`subgraph_session` runs such a part without copying weights; :func:`decoder_feed` feeds a
prefill."""

from __future__ import annotations

import numpy as np

from ..onnx_sites import DecoderIO, GraphMappingError

STUB = "lestd-in-memory"  # external-data location of a stub initializer: its data is the source model's
STUB_BYTES = 1 << 16  # initializers from this size on are stubs in a subgraph


def _stub(init):
    """An initializer's name, type and shape, its data left in the source model (see :func:`subgraph_session`)."""
    from onnx import TensorProto

    stub = TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims))
    stub.data_location = TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", STUB
    return stub


def is_stub(init) -> bool:
    """Whether ``init`` is a stub of :func:`subgraph_model` (its data in the source model)."""
    return any(entry.key == "location" and entry.value == STUB for entry in init.external_data)


def subgraph_model(model, outputs: list[str], given: dict | None = None):
    """A model that computes only ``outputs`` of ``model``: the nodes they need, the initializers and
    graph inputs those read, nothing downstream (no logits, no lm_head). ``given`` (name -> numpy
    dtype) are tensors fed as inputs instead of computed (a cut through the graph). Output types are
    left to ONNX Runtime's inference. Large initializers are stubs whose data stays in ``model`` (no
    copy): run the result with :func:`subgraph_session` and ``model``'s initializers."""
    import onnx
    from onnx import helper

    given = given or {}
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    keep, stack, seen = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if name in given or index is None or index in keep:
            continue
        keep.add(index)
        stack.extend(i for i in node_inputs(graph.node[index]) if i)
    nodes = [graph.node[i] for i in sorted(keep)]
    initializers = [init if is_stub(init) or len(init.raw_data) < STUB_BYTES else _stub(init)
                    for init in graph.initializer if init.name in seen and init.name not in given]
    inputs = [value for value in graph.input if value.name in seen and value.name not in given]
    inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
               for name, dtype in given.items() if name in seen]
    new_graph = helper.make_graph(nodes, graph.name + "-part", inputs, [onnx.ValueInfoProto(name=n) for n in outputs],
                                  initializer=initializers)
    part = helper.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    for entry in model.metadata_props:
        part.metadata_props.append(entry)
    return part


def node_inputs(node) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If/Loop/Scan) read."""
    names = list(node.input)
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                names.extend(node_inputs(inner))
    return names


def subgraph_session(model, originals=None):
    """An ONNX Runtime CPU session of an in-memory model whose stub initializers (:func:`subgraph_model`)
    take their data from ``originals`` (a model, or name -> initializer) as external initializers: the
    weights are neither copied into a second model nor serialised."""
    import onnxruntime as ort
    from onnx import numpy_helper

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    if originals is not None and not isinstance(originals, dict):
        originals = {init.name: init for init in originals.graph.initializer}
    names, arrays = [], []
    for init in model.graph.initializer:
        if is_stub(init):
            names.append(init.name)
            arrays.append(np.ascontiguousarray(numpy_helper.to_array(originals[init.name])))
    if names:
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 -- onnxruntime raises its own untyped errors
        raise GraphMappingError(f"onnxruntime cannot run the calibration copy of the graph "
                                f"({str(error).splitlines()[0][:200]})") from None
    session.lestd_arrays = arrays  # the session reads them in place: keep them alive with it
    return session


def decoder_feed(session, io: DecoderIO, shape, ids: np.ndarray, genai_decoder: dict | None = None,
                 known: dict | None = None) -> dict:
    """Inputs for a prefill of ``ids [B, T]`` (no padding, empty cache) of a session's graph inputs;
    ``known`` values (a cut's tensors) are fed as they are."""
    names = dict(genai_decoder.get("inputs", {})) if genai_decoder else {}
    batch, length = ids.shape
    past = {name: pair for pair in io.past.values() for name in pair}
    known = known or {}
    feed = {}
    for value in session.get_inputs():
        name = value.name
        if name in known:
            feed[name] = known[name]
        elif name == names.get("input_ids", "input_ids"):
            feed[name] = ids.astype(np.int64)
        elif name == names.get("attention_mask", "attention_mask"):
            feed[name] = np.ones((batch, length), dtype=np.int64)
        elif name == names.get("position_ids", "position_ids"):
            feed[name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif name in past:
            dtype = np.float16 if "float16" in value.type else np.float32
            feed[name] = np.zeros((batch, shape.kv_heads, 0, shape.head_dim), dtype=dtype)
        else:
            raise GraphMappingError(f"the graph has an input {name!r} that a decoder prefill does not know how to "
                                    "feed (expected input_ids, attention_mask, position_ids and the past key/values)")
    return feed


def compare_logits(reference: Path, candidate: Path, source: OnnxInput, *, batch: int = 2, length: int = 16,
                   seed: int = 0, ids: np.ndarray | None = None) -> dict:
    """Prefill logits of two decoder files on the same tokens (``ids [B, T]``, else random ones): max
    absolute and relative difference, top-1 agreement (the candidate against the reference)."""
    import onnxruntime as ort

    from ..runtime import session_options

    logits_name = (source.genai_decoder or {}).get("outputs", {}).get("logits", "logits")
    results, tokens = [], "calibration" if ids is not None else "random"
    for path in (reference, candidate):
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(None, "all"),
                                           providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 -- onnxruntime raises its own untyped errors
            raise GraphMappingError(f"onnxruntime cannot load {path} ({str(error).splitlines()[0][:200]})") from None
        if ids is None:
            vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == logits_name)
            ids = np.random.default_rng(seed).integers(0, vocab if isinstance(vocab, int) else 32, size=(batch, length))
        feed = decoder_feed(session, source.io, source.shape, ids, source.genai_decoder)
        results.append(session.run([logits_name], feed)[0].astype(np.float64))
        del session
    ref, new = results
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs_logit_difference": float(np.abs(new - ref).max()),
            "max_relative_logit_difference": float(np.abs(new - ref).max() / scale),
            "top1_agreement": float(np.mean(ref.argmax(-1) == new.argmax(-1))), "batch": int(ids.shape[0]),
            "length": int(ids.shape[1]), "tokens": tokens}
