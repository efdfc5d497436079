"""Compress the attention of an existing decoder ONNX model (``lestd-export MODEL.onnx -o OUT``).

The ONNX counterpart of :func:`~lestd_export.compress.compress_model`, taking a ``model.onnx`` the way
ONNX Runtime's quantisers do: an onnxruntime-genai build (packed ``qkv_proj`` or separate q/k/v,
GroupQueryAttention) or an optimum text-generation-with-past export, or a directory holding one.

Pipeline: locate each layer's projections (:mod:`.onnx_sites`), read their dense fp32 weights as
float64 ``[in, out]`` matrices, stack them into the per-head slice tensors of
:meth:`.surgery.AttentionWeights.slice_tensor`, capture calibration statistics through ONNX Runtime
(each site's ``qkv_input`` and ``o_input`` added as outputs of a pruned copy of the graph, float64
Gram matrices accumulated batch by batch), run the same Stage I/II as ``compress``
(:func:`~.numerics.planner.compress_layers` with the same metrics), refit the kept values, graft the
compressed layers into the graph (:mod:`.graft`), optionally quantise, and write the directory.

Refit: as in ``compress`` (:func:`~.refit.sequential_refit`), layer by layer on the inputs of the
already-compressed model, replayed through ONNX Runtime (:func:`sequential_refit_onnx`: the graph is
cut at each layer's attention input and every layer runs as its own small session on the carried
state). Where a graph cannot be cut that way, the kept values are refit instead against the **dense
model's activations** (:func:`dense_refit`: ``Xc = Xd``, ``Hc = Hd``, the Gram matrices captured once;
upstream errors are then not compensated), and the report says so. ``--method svd`` (per-matrix
low rank, SVD-LLM whitening when calibrated) is grafted as ``compress`` computes it, without refit.
Healing and the ``fisher`` objective need a PyTorch model and are refused.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .config import CompressionConfig
from .errors import CheckpointError, InvalidConfigError
from .files import check_onnx, read_json
from .onnx_sites import AttentionSite, DecoderIO, GraphMappingError

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
REPORT_FILE = "compression_report.json"
STALE_FILES = ("export_report.json", REPORT_FILE)  # reports of the input model: they would describe another model
QUANTIZE_BITS = {"none": None, "int8": 8, "int4": 4}
EXTERNAL_DATA_BYTES = 1 << 30  # an input without external data is written inline below this size
CAPTURE_BATCH = 4  # calibration sequences per ONNX Runtime run


class OnnxInputError(CheckpointError):
    """The ONNX input path, its directory or its config cannot be used."""


@dataclass
class OnnxInput:
    """A decoder ONNX model read for compression: graph (with weights), config, sites, tokenizer."""

    directory: Path
    model_file: Path
    config: dict
    config_file: Path
    genai: bool
    model: object  # onnx.ModelProto, weights loaded
    io: DecoderIO
    shape: object  # registry.AttentionShape
    producer: str
    sites: list[AttentionSite]
    external_files: set[str]  # external data files of the input graph (relative to its directory)
    output_energies: list[float] | None = None  # per layer ||W_O||^2 (read with the weights)

    @property
    def model_type(self) -> str | None:
        if self.genai:
            return self.config.get("model", {}).get("type")
        return self.config.get("model_type")

    @property
    def max_positions(self) -> int | None:
        from .onnx_sites import config_head_counts

        return config_head_counts(self.config, self.genai)["max_positions"]

    @property
    def genai_decoder(self) -> dict | None:
        return self.config["model"]["decoder"] if self.genai else None

    def input_bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in {self.model_file.name, *self.external_files}
                   if (self.directory / name).is_file())


# ------------------------------------------------------------------------------------------- input


def is_onnx_input(path: str | Path) -> bool:
    """Whether ``path`` names an ``.onnx`` file or a directory holding an ONNX model (the CLI shorthand)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return True
    return path.is_dir() and ((path / GENAI_CONFIG).is_file() or any(path.glob("*.onnx")))


def resolve_input(path: str | Path) -> tuple[Path, Path]:
    """``(directory, model file)`` for an ``.onnx`` file or a directory holding one (the file that
    genai_config.json names, else ``model.onnx``, else its only ``.onnx`` file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise OnnxInputError(f"{path} does not exist: give a decoder .onnx file or the directory holding it")
    if path.is_file():
        if path.suffix != ".onnx":
            raise OnnxInputError(f"{path} is not an .onnx file: give a decoder .onnx file or its directory")
        return path.parent, path
    candidates = []
    if (path / GENAI_CONFIG).is_file():
        filename = read_json(path / GENAI_CONFIG, "re-create it with the onnxruntime-genai builder").get(
            "model", {}).get("decoder", {}).get("filename")
        if isinstance(filename, str):
            candidates.append(path / filename)
    candidates.append(path / "model.onnx")
    for candidate in candidates:
        if candidate.is_file():
            return path, candidate
    found = sorted(path.glob("*.onnx"))
    if len(found) == 1:
        return path, found[0]
    if not found:
        raise OnnxInputError(f"{path} holds no .onnx model: give a directory with model.onnx (an onnxruntime-genai "
                             "build or an optimum export); a Hugging Face model goes to `lestd-export compress`")
    raise OnnxInputError(f"{path} holds several .onnx files ({', '.join(f.name for f in found[:4])}): "
                         "give the decoder's file itself")


def read_config(directory: Path) -> tuple[dict, Path, bool]:
    """``(config, its file, is genai_config.json)``; the genai config wins when both exist."""
    for name, genai in ((GENAI_CONFIG, True), (HF_CONFIG, False)):
        file = directory / name
        if file.is_file():
            config = read_json(file, "restore it from the model's original files")
            if genai and not isinstance(config.get("model", {}).get("decoder"), dict):
                raise OnnxInputError(f"{file} has no model.decoder section: it is not an onnxruntime-genai config")
            return config, file, genai
    raise OnnxInputError(f"{directory} has neither {GENAI_CONFIG} nor {HF_CONFIG}: the head counts and the runtime "
                         "need them; put the model's config next to its .onnx file")


def _external_files(model) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    files = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            files.add(ExternalDataInfo(init).location)
    return files


def open_onnx_input(path: str | Path) -> OnnxInput:
    """Read, locate and check an ONNX decoder (typed errors; nothing is written)."""
    import onnx

    from .onnx_sites import decoder_io, head_counts, locate

    directory, model_file = resolve_input(path)
    fix = "re-create it (onnxruntime-genai builder, or lestd-export export --dense)"
    check_onnx(model_file, fix)
    config, config_file, genai = read_config(directory)
    header = onnx.load(str(model_file), load_external_data=False)
    external = _external_files(header)
    missing = [name for name in sorted(external) if not (directory / name).is_file()]
    if missing:
        raise OnnxInputError(f"{model_file} keeps its weights in {missing[0]}, which is not in {directory}")
    _refuse_compressed(header, config, model_file)
    io = decoder_io(header, config["model"]["decoder"] if genai else None)
    shape = head_counts(config, genai, header, io, str(config_file))
    producer, sites = locate(header, io, shape)  # before reading gigabytes of weights
    del header
    try:
        model = onnx.load(str(model_file))
    except Exception as error:  # noqa: BLE001 -- truncated external data: onnx raises several types
        raise OnnxInputError(f"cannot read the weights of {model_file} ({str(error).splitlines()[0][:200]}): "
                             f"{fix}") from None
    return OnnxInput(directory, model_file, config, config_file, genai, model, io, shape, producer, sites, external)


def _refuse_compressed(model, config: dict, model_file: Path) -> None:
    """A model that lestd-export already compressed (its export or its graft) is not compressed twice."""
    from .loading import COMPRESSION_KEY

    grafted = any("/lestd/" in node.name for node in model.graph.node)
    if grafted or COMPRESSION_KEY in config:
        raise OnnxInputError(f"{model_file} is already compressed by lestd-export: compress the dense model "
                             "(the onnxruntime-genai builder's -p fp32 output, or lestd-export export --dense)")


def read_weights(source: OnnxInput) -> list:
    """Per layer, :class:`~.surgery.AttentionWeights` (float64, ``y = x W``; biases stay in the graph)."""
    from .onnx_sites import read_site_weights
    from .surgery import AttentionWeights

    return [AttentionWeights(read_site_weights(source.model, site, source.shape, str(source.directory)),
                             dict.fromkeys(("q", "k", "v", "o")))
            for site in source.sites]


# ------------------------------------------------------------------------------------- calibration


STUB = "lestd-in-memory"  # external-data location of a stub initializer: its data is the source model's
STUB_BYTES = 1 << 16  # initializers from this size on are stubs in a subgraph


def _stub(init):
    """An initializer's name, type and shape, its data left in the source model (see :func:`_session`)."""
    from onnx import TensorProto

    stub = TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims))
    stub.data_location = TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", STUB
    return stub


def _is_stub(init) -> bool:
    return any(entry.key == "location" and entry.value == STUB for entry in init.external_data)


def subgraph_model(model, outputs: list[str], given: dict | None = None):
    """A model that computes only ``outputs`` of ``model``: the nodes they need, the initializers and
    graph inputs those read, nothing downstream (no logits, no lm_head). ``given`` (name -> numpy
    dtype) are tensors fed as inputs instead of computed (a cut through the graph). Output types are
    left to ONNX Runtime's inference. Large initializers are stubs whose data stays in ``model`` (no
    copy): run the result with :func:`_session` and ``model``'s initializers."""
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
        stack.extend(i for i in _node_inputs(graph.node[index]) if i)
    nodes = [graph.node[i] for i in sorted(keep)]
    initializers = [init if _is_stub(init) or len(init.raw_data) < STUB_BYTES else _stub(init)
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


def _node_inputs(node) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If/Loop/Scan) read."""
    names = list(node.input)
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                names.extend(_node_inputs(inner))
    return names


def _session(model, originals=None):
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
        if _is_stub(init):
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


def collect_onnx_statistics(source: OnnxInput, data, *, progress: bool = True) -> list:
    """Per layer :class:`~.calibration.LayerStatistics` (input and head Gram matrices, float64) over the
    calibration ``data``, captured through ONNX Runtime from the dense graph; memory is bounded by one
    batch of activations plus the Grams."""
    from tqdm.auto import tqdm

    from .calibration import LayerStatistics

    wanted = []
    for site in source.sites:
        wanted += [site.qkv_input, site.o_input]
    wanted = list(dict.fromkeys(wanted))
    session = _session(subgraph_model(source.model, wanted), source.model)
    totals = {name: None for name in wanted}
    count = 0
    with tqdm(total=data.tokens, desc="calibration statistics (onnxruntime)", unit="tok",
              disable=not progress) as bar:
        for start in range(0, len(data.sequences), CAPTURE_BATCH):
            batch = data.sequences[start:start + CAPTURE_BATCH]
            values = session.run(wanted, decoder_feed(session, source.io, source.shape, batch, source.genai_decoder))
            for name, value in zip(wanted, values):
                x = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
                product = x.T @ x
                totals[name] = product if totals[name] is None else totals[name] + product
            count += batch.size
            bar.update(batch.size)
    del session
    return [LayerStatistics(totals[site.qkv_input] / count, totals[site.o_input] / count, {}, count)
            for site in source.sites]


def load_onnx_calibration(source: OnnxInput, config: CompressionConfig):
    """Calibration token sequences for ``config.calibration`` with the input directory's tokenizer."""
    from .calibration import CalibrationError, load_calibration
    from .loading import load_tokenizer

    if config.calibration == "none":
        return None
    if config.calibration == "self":
        raise CalibrationError("--calibration self samples a PyTorch model: for an ONNX input calibrate on "
                               "default, a text file, or none")
    tokenizer = load_tokenizer(source.directory)
    if tokenizer is None:
        raise CalibrationError(f"{source.directory} has no tokenizer files (tokenizer.json, tokenizer_config.json) "
                               "to tokenise the calibration text: add them, or pass --calibration none")
    stub = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=source.max_positions))
    return load_calibration(config.calibration, stub, tokenizer, config.calibration_tokens)


# ------------------------------------------------------------------------------------------- refit


class LayerCuts:
    """Cuts through a decoder graph at each layer's attention input ``X_i``: ``ancestors[i]`` are the
    nodes ``X_i`` needs and ``live[i]`` the tensors they produce that later nodes read (the residual
    stream, masks, rotary tables...): the state from which layer ``i`` onwards can run on its own."""

    def __init__(self, model, sites: list[AttentionSite]):
        graph = model.graph
        producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
        consumers: dict[str, set[int]] = {}
        for i, node in enumerate(graph.node):
            for name in _node_inputs(node):
                consumers.setdefault(name, set()).add(i)
        self.ancestors, self.live = [], []
        for site in sites:
            nodes, stack = set(), [site.qkv_input]
            while stack:
                index = producer.get(stack.pop())
                if index is not None and index not in nodes:
                    nodes.add(index)
                    stack.extend(i for i in _node_inputs(graph.node[index]) if i)
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
    """The layer-by-layer refit of ``compress`` (:func:`~.refit.sequential_refit`), replayed through ONNX
    Runtime: the graph is cut at every layer's attention input (:class:`LayerCuts`), the cut's tensors
    are carried from layer to layer for each calibration batch, and layer ``i`` runs as its own small
    session: Q/K/V refit on its compressed-stream input ``Xc``, the layer grafted and run to the output
    projection's input (``Hc``, from the refit Q/K/V), O refit on ``Hc``, then the finished layer run
    to the next cut. ``target`` ``layer`` fits the dense weights on the compressed stream (``Xc W``);
    ``model`` fits the dense model's outputs (``Xd W``, a dense stream carried alongside); ``bits`` rounds
    Q/K/V's ``U1`` columns to their int grid first (as ``sequential_refit``). Returns per layer and group the
    relative calibration output error before and after (against that target)."""
    from tqdm.auto import tqdm

    from .graft import LatentLayer, graft_attention
    from .refit import refit_output, refit_qkv

    model, sites = source.model, source.sites
    cuts = cuts or LayerCuts(model, sites)
    batches = [data.sequences[start:start + CAPTURE_BATCH] for start in range(0, len(data.sequences), CAPTURE_BATCH)]

    originals = {init.name: init for init in model.graph.initializer}

    def run(part, outputs: list[str], states: list[dict]) -> list[dict]:
        session = _session(part, originals)
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
        originals.update((init.name, init) for init in copy.graph.initializer if not _is_stub(init))
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
    from .refit import refit_output, refit_qkv

    errors = []
    for core, dense, stats in zip(cores, tensors, statistics):
        x, h = stats.x_gram, stats.h_gram
        record = refit_qkv(core, dense, groups, x, x, x, damping, bits)
        if "o" in core.groups:  # unless the output projection stays dense
            record["o"] = refit_output(core, dense, groups, h, h, h, damping)
        errors.append(record)
    return errors


# ---------------------------------------------------------------------------------------- compress


def check_config(config: CompressionConfig) -> CompressionConfig:
    """Refuse what needs a PyTorch model; the graft's layout is the plain one (every weight a MatMul)."""
    if config.heal:
        raise InvalidConfigError("--heal distils a PyTorch model: it is not available for an ONNX input")
    if config.objective == "fisher":
        raise InvalidConfigError("the fisher objective needs loss gradients of a PyTorch model: use balanced or "
                                 "frobenius for an ONNX input")
    if config.granularity == "element":
        raise InvalidConfigError("element pruning is not grafted into ONNX graphs: use --granularity row")
    if config.input_whitening is None:  # p > 0: the full-rank refit is exact on calibration-like text only (README)
        config = replace(config, input_whitening=0.0)
    return config if config.layout == "plain" else replace(config, layout="plain")


def _storage(config: CompressionConfig, quantize: str | None) -> tuple[CompressionConfig, str]:
    """One precision for the planner's costs (``config.storage``) and the quantiser (``quantize``, None:
    the config's)."""
    if quantize is None:
        quantize = "none" if config.storage == "fp32" else config.storage
    if quantize not in QUANTIZE_BITS:
        raise InvalidConfigError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANTIZE_BITS)}")
    wanted = "fp32" if quantize == "none" else quantize
    return (config if config.storage == wanted else replace(config, storage=wanted)), quantize


def plan_cores(source: OnnxInput, config: CompressionConfig, *,
               progress: bool = True) -> tuple[list, list[np.ndarray], object, list | None, list | None, str | None]:
    """Weights -> calibrated Stage I/II -> refit. Returns ``(cores, dense tensors, calibration data,
    statistics, relative output errors, how the refit ran)`` (the last four None without calibration)."""
    from tqdm.auto import tqdm

    from .compress import _check_ranks, layer_metrics, tucker_request
    from .numerics.planner import compress_layers, reconstruct_layer
    from .surgery import slice_groups

    config = check_config(config)  # the plain layout the graft writes
    shape = source.shape
    groups = slice_groups(shape, with_output=not config.dense_output)
    _check_ranks(config, shape.hidden, shape.head_dim)
    weights = read_weights(source)
    tensors = [w.slice_tensor(shape)[:groups.total] for w in weights]  # q, k, v slices first
    data, statistics = _calibrate(source, config, progress)
    metrics = layer_metrics(statistics, groups, shape, config)
    with tqdm(total=len(tensors), desc=f"{config.method}: decomposing layers", unit="layer",
              disable=not progress) as bar:
        try:
            cores = compress_layers(tensors, groups, tucker_request(config, shape), bar.update, metrics, None)
        except ValueError as error:
            raise InvalidConfigError(f"cannot meet the request: {error}") from None
    errors, refit = None, None
    if statistics is not None and config.refit:
        try:
            cuts, why = LayerCuts(source.model, source.sites), None
        except GraphMappingError as error:
            cuts, why = None, str(error)
        if cuts is not None:
            errors = sequential_refit_onnx(source, cores, tensors, data, groups, target=config.refit_target,
                                           bits=config.bits, progress=progress, cuts=cuts)
            refit = f"layer by layer through onnxruntime (target: {config.refit_target})"
        else:
            errors = dense_refit(cores, tensors, statistics, groups, bits=config.bits)
            refit = f"dense activations ({why})"
        for core, dense in zip(cores, tensors):  # the refit changed the values: recount the plain error
            core.kept_energy = core.energy - float(np.sum((dense - reconstruct_layer(core, groups)) ** 2))
    source.output_energies = [float(np.sum(w.matrices["o"] ** 2)) for w in weights]
    return cores, tensors, data, statistics, errors, refit


def plan_low_rank(source: OnnxInput, config: CompressionConfig, *,
                  progress: bool = True) -> tuple[list, list[dict], object]:
    """The per-matrix low-rank baseline (``--method svd``; SVD-LLM whitening when calibrated), as
    ``compress`` computes it: ``(graft layers, report entries, calibration data or None)``."""
    from .compress import _check_ranks, _svd_metrics
    from .graft import LowRankLayer
    from .numerics.lowrank import svd_layers

    shape = source.shape
    _check_ranks(config, shape.hidden, shape.head_dim)
    weights = read_weights(source)
    data, statistics = _calibrate(source, config, progress)
    lefts = None if statistics is None else [_svd_metrics(s, config.damping) for s in statistics]
    r1 = config.ranks[0] if config.ranks else None
    try:
        low_rank = svd_layers([[w.matrices[n] for n in ("q", "k", "v", "o")] for w in weights],
                              config.size_fraction or 1.0, config.budget,
                              rank=(r1 or shape.hidden) if config.ranks else None, lefts=lefts)
    except ValueError as error:
        raise InvalidConfigError(f"cannot meet the request: {error}") from None
    dense = shape.num_slices * shape.hidden * shape.head_dim
    layers, entries = [], []
    for factors in low_rank:
        named = dict(zip(("q", "k", "v", "o"), factors))
        stored = sum(f.entries for f in factors)
        entries.append({"ranks": {n: f.rank for n, f in named.items()}, "density": 1.0, "values": stored,
                        "indices": 0, "factors": stored, "dense": dense, "energy": sum(f.energy for f in factors),
                        "squared_error": max(sum(f.energy - f.kept_energy for f in factors), 0.0)})
        layers.append(LowRankLayer([(f.a, f.b) for f in factors[:3]], (factors[3].a, factors[3].b)))
    return layers, entries, data


def _entries(cores: list, shape, config: CompressionConfig, output_energies: list[float]) -> list[dict]:
    """Per layer what compress's report records (a dense output projection counted as stored, exact)."""
    from .compress import _stored_entries, dense_output_entries

    dense = shape.num_slices * shape.hidden * shape.head_dim
    output = dense_output_entries(shape, config)
    entries = []
    for core, energy in zip(cores, output_energies):
        entries.append({"ranks": list(core.ranks), "density": core.density(shape.num_slices),
                        "rows": {n: (None if g.rows is None else len(g.rows)) for n, g in core.groups.items()},
                        **_stored_entries(core, config, output), "dense": dense,
                        "energy": core.energy + (energy if config.dense_output else 0.0),
                        "squared_error": core.squared_error})
    return entries


def _weight_matmuls(model, exclude: set[str]) -> list[str]:
    """Names of the MatMul nodes (outside ``exclude``) whose right operand is a 2-D fp32 initializer."""
    from onnx import TensorProto

    initializers = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        init = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        plain = init is not None and len(init.dims) == 2 and init.data_type == TensorProto.FLOAT
        if plain and node.name not in exclude:
            names.append(node.name)
    return names


def compare_logits(reference: Path, candidate: Path, source: OnnxInput, *, batch: int = 2, length: int = 16,
                   seed: int = 0, ids: np.ndarray | None = None) -> dict:
    """Prefill logits of two decoder files on the same tokens (``ids [B, T]``, else random ones): max
    absolute and relative difference, top-1 agreement (the candidate against the reference)."""
    import onnxruntime as ort

    from .runtime import session_options

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


def _copy_directory_files(source: OnnxInput, staging: Path) -> list[str]:
    """Everything in the input directory but the model file, its external data and stale reports."""
    skip = {source.model_file.name, *source.external_files, *STALE_FILES}
    copied = []
    for item in sorted(source.directory.iterdir()):
        if item.name in skip or item.name.startswith(".") or item.resolve() == staging.resolve():
            continue
        if item.is_dir():
            continue  # sibling folders (other variants, caches) are not part of the model
        if item.is_file():
            shutil.copy2(item, staging / item.name)
            copied.append(item.name)
    return copied


def compress_onnx(path: str | Path, out_dir: str | Path, config: CompressionConfig, *, quantize: str | None = None,
                  overwrite: bool = False, progress: bool = True, validate: bool = True) -> dict:
    """Compress the attention of the decoder ONNX at ``path`` into ``out_dir``; returns the report.

    ``out_dir`` receives the input directory's other files (genai_config.json, config.json, tokenizer
    files...), the new model under the same file name (external data ``<name>.data`` when the input
    used external data or is large) and ``compression_report.json``; it is written into a staging
    directory renamed into place when complete. ``quantize`` (``int4``/``int8``) turns every weight
    MatMul of the result (compressed attention, MLP, lm_head) into MatMulNBits, as the genai builder
    does (None: as ``config.storage`` says). With ``validate`` the
    written model is loaded by ONNX Runtime and its logits compared with the input's (recorded; a
    model that does not load is an error and nothing is written).
    """
    import onnx

    from .compress import _report
    from .io import atomic_output_dir, check_output_dir, write_json

    config, quantize = _storage(check_config(config), quantize)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    source = open_onnx_input(path)
    if out_dir.resolve() == source.directory.resolve():
        raise InvalidConfigError(f"-o {out_dir} is the input directory: write the compressed model elsewhere")
    with atomic_output_dir(out_dir, overwrite) as staging:
        from .graft import LatentLayer, graft_attention

        if config.method == "svd":
            layers, entries, data = plan_low_rank(source, config, progress=progress)
            errors = refit = None
        else:
            cores, _, data, _, errors, refit = plan_cores(source, config, progress=progress)
            layers = [LatentLayer.from_core(core) for core in cores]
            entries = _entries(cores, source.shape, config, source.output_energies)
        model = source.model
        grafted = graft_attention(model, source.sites, layers)
        quantised = None
        if QUANTIZE_BITS[quantize] is not None:
            from .graft import quantize_nodes

            nodes = list(grafted) + _weight_matmuls(model, set(grafted))
            model = quantize_nodes(model, nodes, QUANTIZE_BITS[quantize])
            quantised = {"bits": QUANTIZE_BITS[quantize], "block_size": 32, "accuracy_level": 4,
                         "nodes": len(nodes), "attention_nodes": len(grafted)}
        copied = _copy_directory_files(source, staging)
        target = staging / source.model_file.name
        size = sum(len(init.raw_data) for init in model.graph.initializer)
        external = bool(source.external_files) or size >= EXTERNAL_DATA_BYTES
        location = source.model_file.name + ".data"
        if external:
            onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, size_threshold=1024)
        else:
            onnx.save_model(model, str(target))
        del model, source.model
        written = [target.name] + ([location] if external else [])
        umask = os.umask(0)
        os.umask(umask)
        for name in written:  # onnx creates external data files private (0600); make them like any new file
            (staging / name).chmod(0o666 & ~umask)
        output_bytes = sum((staging / name).stat().st_size for name in written)
        sample = None if data is None else data.sequences[:2, :64]  # real text where there is some
        vs_input = compare_logits(source.model_file, target, source, ids=sample) if validate else None
        report = _report(config, entries, source.model_type or "unknown", str(path),
                         time.perf_counter() - started)
        report["input"] = {"path": str(path), "model_file": source.model_file.name, "producer": source.producer,
                           "config": source.config_file.name, "layers": len(source.sites),
                           "packed_qkv": source.sites[0].packed, "bytes": source.input_bytes(),
                           "shape": {"hidden": source.shape.hidden, "heads": source.shape.heads,
                                     "kv_heads": source.shape.kv_heads, "head_dim": source.shape.head_dim}}
        report["output"] = {"files": written + copied, "model_bytes": output_bytes,
                            "bytes_fraction": output_bytes / max(source.input_bytes(), 1), "quantize": quantised,
                            "grafted_matmuls": len(grafted)}
        report["refit"] = refit
        if data is not None:
            report["calibration"] = data.record()
            if errors is not None:
                report["calibration"]["relative_output_error"] = errors
        if vs_input is not None:
            report["vs_input"] = vs_input
        report["seconds"] = time.perf_counter() - started
        write_json(staging / REPORT_FILE, report)
    return report


def _calibrate(source, config, progress: bool):
    """Calibration data and its per-layer statistics captured through ONNX Runtime (``(None, None)`` without)."""
    data = load_onnx_calibration(source, config)
    if data is None:
        return None, None
    started = time.perf_counter()
    statistics = collect_onnx_statistics(source, data, progress=progress)
    data.seconds += time.perf_counter() - started
    return data, statistics
