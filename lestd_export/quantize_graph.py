"""Quantise every weight of a decoder graph with our own rounding, in the onnxruntime-genai builder's layout.

Every ``MatMul`` whose right operand is a 2-D fp32 initializer (attention, MLP, lm_head, and grafted factors)
becomes ``MatMulNBits`` (symmetric, no zero points: the builder's bytes and fast kernel), and the token table
becomes ``GatherBlockQuantized``: over the lm_head's own codes when the two are tied (stored once, as the
builder's shared embedding), else over its own. The rounding (:data:`ROUNDINGS`) is ONNX Runtime's
round-to-nearest (``rtn``), or each block's scale chosen to minimise the activation-weighted rounding error
(``awq``: every row weighted by its mean squared input, from calibration; a grid search of clipping ratios, then
alternating least-squares refinement), or GPTQ's error-compensated
rounding on that grid (``gptq``); a calibrated rounding keeps round-to-nearest's codes for any column where
they have the lower output error on the calibration inputs, so it is never worse there. Calibrated roundings
also scale the input channels of the weights a normalisation feeds (Q/K/V, gate/up, a tied lm_head) where that
lowers the group's calibration output error, folding ``1/s`` into the normalisation's own scale
(:func:`scale_inputs`; a lookup in the tied table is then multiplied by ``1/s``). A table (and the head tied to
it) whose width the block does not divide is stored at the largest block that does (the builder's shared table
fails at run time there); only a width no block divides keeps it fp32, and the report says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import InvalidConfigError
from .onnx_sites import SHAPE_OPS, replace_nodes

ROUNDINGS = ("rtn", "awq", "gptq")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits' fast-path blocks


@dataclass(frozen=True)
class QuantizeConfig:
    """How every weight is stored: ``bits`` (2, 4 or 8), ``block_size`` along the reduction axis, the rounding;
    ``head_bits`` for the token table and the lm_head (None: ``bits``, 4 under 2-bit weights; 8 on the default
    model buys most of what int4 loses for 16% more bytes, see README)."""

    bits: int = 4
    block_size: int = 32
    rounding: str = "awq"
    head_bits: int | None = None
    damping: float = 0.1  # GPTQ: times the mean diagonal of the input Gram
    accuracy_level: int = 4  # MatMulNBits: int8 activations (the builder's CPU setting)

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise InvalidConfigError(f"--quantize stores 2, 4 or 8 bits, not {self.bits}")
        if self.head_bits not in (None, 4, 8):
            raise InvalidConfigError(f"--head-bits stores 4 or 8 bits, not {self.head_bits}")
        if self.block_size not in BLOCK_SIZES:
            raise InvalidConfigError(f"--block-size {self.block_size} is not one of MatMulNBits' "
                                     f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.rounding not in ROUNDINGS:
            raise InvalidConfigError(f"--rounding {self.rounding!r}: choose one of {', '.join(ROUNDINGS)}")

    @property
    def calibrated(self) -> bool:
        return self.rounding != "rtn"

    @property
    def head(self) -> QuantizeConfig:
        """The config of the token table and the lm_head."""
        from dataclasses import replace

        return replace(self, bits=self.head_bits or max(self.bits, 4), head_bits=None)  # tables: 4 or 8 bits

    def to_dict(self) -> dict:
        return asdict(self)


def round_codes(weight: np.ndarray, config: QuantizeConfig, gram: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Signed codes ``[K, N]`` and scales ``[blocks, N]`` of ``x @ weight`` (``weight [K, N]``); ``gram`` is the
    input's ``X^T X / N`` ``[K, K]`` (needed by ``awq`` and ``gptq``; without it they round to nearest)."""
    from .numerics.quantize import codes, gptq, max_abs_scales, refine_scales, search_scales

    bits, block = config.bits, config.block_size
    if config.rounding == "rtn" or gram is None:
        scales = max_abs_scales(weight, bits, block)
        return codes(weight, scales, bits, block), scales
    importance = np.diag(gram)
    scales = refine_scales(weight, search_scales(weight, bits, block, importance=importance), bits, block, importance)
    target = gptq(weight, gram, scales, bits, block, config.damping) if config.rounding == "gptq" else weight
    q = codes(target, scales, bits, block)
    nearest = max_abs_scales(weight, bits, block)
    q_nearest = codes(weight, nearest, bits, block)
    # per column (the output error separates by column), keep whichever has the lower calibration output error
    # e^T C e: never worse than round-to-nearest on the calibration inputs
    worse = _output_error(weight, q, scales, gram, block) > _output_error(weight, q_nearest, nearest, gram, block)
    return np.where(worse[None, :], q_nearest, q), np.where(worse[None, :], nearest, scales)


def _output_error(weight: np.ndarray, q: np.ndarray, scales: np.ndarray, gram: np.ndarray, block: int) -> np.ndarray:
    """Per column ``n``, ``e_n^T C e_n`` with ``e = weight - dequantised codes`` (the mean squared output error)."""
    from .numerics.quantize import dequantize

    error = weight - dequantize(q, scales, block)  # [K, N]
    return np.einsum("kn,kn->n", error, gram @ error)


def _fp32_matrices(model) -> set[str]:
    """Names of the 2-D fp32 initializers (the weights and tables that can be quantised)."""
    from onnx import TensorProto

    return {i.name for i in model.graph.initializer if len(i.dims) == 2 and i.data_type == TensorProto.FLOAT}


def weight_matmuls(model) -> list:
    """The nodes ``x @ W`` whose ``W`` is a 2-D fp32 initializer (what is quantised): ``MatMul``; the
    ``FusedMatMul(x, E, transB=1)`` that reads a tied token table as the lm_head (this package's optimum export); and
    ``Gemm(x, W, bias)`` with unit ``alpha``/``beta`` (optimum's GPT-2 ``Conv1D`` and OPT ``fc1``/``fc2``)."""
    from onnx import helper

    floats = _fp32_matrices(model)
    found = []
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in floats:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        neutral = {k: v for k, v in attributes.items() if (k, v) in (("transA", 0), ("alpha", 1.0), ("beta", 1.0),
                                                                     ("transBatchA", 0), ("transBatchB", 0))}
        fused = node.op_type == "FusedMatMul" and attributes == {"transB": 1} | neutral
        gemm = node.op_type == "Gemm" and set(attributes) - set(neutral) <= {"transB"}
        if node.op_type == "MatMul" or fused or gemm:
            found.append(node)
    return found


def transposed(node) -> bool:
    """Whether a node of :func:`weight_matmuls` reads its weight initializer as ``W^T`` (``transB=1``)."""
    from onnx import helper

    return node.op_type != "MatMul" and any(a.name == "transB" and helper.get_attribute_value(a) == 1
                                            for a in node.attribute)


def bias_of(node) -> str | None:
    """The bias a ``Gemm`` of :func:`weight_matmuls` adds (None for a MatMul): kept as an ``Add`` after the weight."""
    return node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None


def reduction_size(node, initializers: dict) -> int:
    """``K`` of the weight ``W [K, N]`` a node from :func:`weight_matmuls` multiplies by (its input's width)."""
    dims = initializers[node.input[1]].dims
    return int(dims[1] if transposed(node) else dims[0])


def weight_of(node, initializers: dict) -> np.ndarray:
    """``W [K, N]`` (float64) of a node from :func:`weight_matmuls`."""
    from onnx import numpy_helper

    weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    return weight.T if transposed(node) else weight


def token_tables(model) -> list[tuple]:
    """``(Gather, Transpose or None, table initializer name)`` for each lookup in a 2-D fp32 initializer table,
    directly or through a ``Transpose`` of the lm_head's ``[d, vocab]`` weight (the genai builder's tied fp32
    model)."""
    from onnx import helper

    floats = _fp32_matrices(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        if node.input[0] in floats:
            found.append((node, None, node.input[0]))
            continue
        transpose = producer.get(node.input[0])
        perm = [] if transpose is None else [helper.get_attribute_value(a) for a in transpose.attribute
                                             if a.name == "perm"]
        if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in floats \
                and perm in ([], [[1, 0]]):
            found.append((node, transpose, transpose.input[0]))
    return found


def quantize_graph(model, config: QuantizeConfig, grams: dict[str, np.ndarray] | None = None, *,
                   progress: bool = True, stored: dict | None = None,
                   configs: dict[str, QuantizeConfig] | None = None) -> dict:
    """Quantise ``model`` (an ``onnx.ModelProto`` with its weights loaded) in place; ``grams`` maps a MatMul's
    input tensor to its Gram ``[K, K]``; ``configs`` the storage of particular weights (by initializer name; a
    whole-file plan, :mod:`~lestd_export.onnx_input.budget`), ``config`` the rest's. Returns a report: nodes
    quantised, the table's storage, bytes.
    ``stored`` (when given) receives, per replaced fp32 initializer, where its stored values are
    (:func:`stored_value_simulation` reads it)."""
    from onnx import helper, numpy_helper
    from tqdm.auto import tqdm

    from .numerics.quantize import pack_matmulnbits

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    matmuls = weight_matmuls(model)
    tables = token_tables(model)
    replaced, new_initializers, packed_of = {}, [], {}
    own_config = {name: config.head for name in head_weights(model, matmuls)}  # an untied lm_head
    own_config.update({name: table_config(initializers[name], transpose is None, config.head)
                       for _, transpose, name in tables})  # a table and the head that reads it
    own_config.update(configs or {})
    row_scales = {} if not config.calibrated or not grams else scale_inputs(model, matmuls, grams, config,
                                                                             initializers, own_config)
    for node in tqdm(matmuls, desc=f"int{config.bits} {config.rounding} rounding", unit="weight",
                     disable=not progress):
        weight = weight_of(node, initializers)  # [K, N]
        k, n = weight.shape
        name = node.input[1]
        if name not in packed_of:  # a weight two MatMuls read is stored once (rounded for the first reader)
            gram = (grams or {}).get(node.input[0])
            if node.input[0] in row_scales:  # x @ W = (x / s) @ (s W): the norm before it now writes x / s
                s = row_scales[node.input[0]]
                weight, gram = weight * s[:, None], gram / np.outer(s, s)
            own = own_config.get(name, config)
            q, scales = round_codes(weight, own, gram)
            data, flat_scales = pack_matmulnbits(q, scales, own.bits, own.block_size)
            packed_of[name] = (_fresh(f"{name}_Q{own.bits}", initializers), _fresh(f"{name}_scales", initializers),
                               own)
            new_initializers += [numpy_helper.from_array(data, packed_of[name][0]),
                                 numpy_helper.from_array(flat_scales, packed_of[name][1])]
            if stored is not None:  # the initializer holds W [K, N], or W^T for the transposed (tied) head
                stored[name] = {"data": packed_of[name][0], "scales": packed_of[name][1], "k": k, "bits": own.bits,
                                "block": own.block_size, "transposed": transposed(node),
                                "row_scale": row_scales.get(node.input[0])}
        bias = bias_of(node)
        product = f"{node.output[0]}/product" if bias else node.output[0]
        replaced[node.name] = [helper.make_node(
            "MatMulNBits", [node.input[0], *packed_of[name][:2]], [product], name=f"{node.name}_Q{packed_of[name][2].bits}",
            domain="com.microsoft", K=k, N=n, bits=packed_of[name][2].bits, block_size=packed_of[name][2].block_size,
            accuracy_level=config.accuracy_level)]
        if bias:
            replaced[node.name].append(helper.make_node("Add", [product, bias], list(node.output),
                                                        name=f"{node.name}/bias"))
    table_storage = []
    for node, transpose, table in tables:
        replaced[node.name], storage, extra = _quantized_table(node, transpose, table, initializers, matmuls,
                                                               packed_of, row_scales, own_config[table], stored)
        if transpose is not None and replaced[node.name] != [node]:
            replaced[transpose.name] = []  # the lookup reads the lm_head's codes, not a transposed copy
        new_initializers += extra
        table_storage.append(storage)
    graph.initializer.extend(new_initializers)
    replace_nodes(graph, replaced)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {**config.to_dict(), "weight_matmuls": len(matmuls), "token_table": table_storage,
            "calibrated": bool(grams) and config.calibrated, "scaled_inputs": len(row_scales)}


SCALE_POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)  # s = diag(C)^(a/2): a = 0 is no scaling
SCALE_SEARCH_COLUMNS = 65536  # output columns the choice of s is made on (an untied 151,936-wide head: 1 in 3)


def _scale_site(tensor: str, producer: dict, consumers: dict, members: set[str], initializers: dict
                ) -> list[tuple[str, str]] | None:
    """``(input name, initializer name)`` of the scale (and the bias, if any) of the normalisation (or ``Mul``)
    that writes ``tensor``, when only the weight MatMuls ``members`` read it: dividing them by ``s`` makes it
    write ``x / s``. An input may reach its initializer through ``Identity`` (an export's deduplicated copy)."""
    node = producer.get(tensor)
    readers = {c.name for c in consumers.get(tensor, []) if c.op_type not in SHAPE_OPS}  # shapes ignore values
    if node is None or node.output[0] != tensor or readers != members:
        return None

    def source(name: str) -> str | None:
        while name not in initializers and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name if name in initializers else None

    index = {"SimplifiedLayerNormalization": 1, "LayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
             "SkipLayerNormalization": 2}.get(node.op_type)
    if index is not None:
        names = [(name, source(name)) for name in node.input[index:index + 2] if name]  # scale, LayerNorm's bias
        return names if all(init for _, init in names) else None
    if node.op_type == "Mul":
        vectors = [(name, source(name)) for name in node.input if source(name)
                   and len(initializers[source(name)].dims) == 1]
        return vectors[:1] or None
    return None


def input_scale(weights: list[np.ndarray], gram: np.ndarray, config: QuantizeConfig,
                powers: tuple[float, ...] | None = None) -> np.ndarray:
    """AWQ's input-channel scale ``s [K]`` for weights ``[K, N_i]`` that read one input of Gram ``gram``:
    ``s = diag(C)^(a/2)`` (geometric mean 1, ``a`` in ``powers``, default :data:`SCALE_POWERS`) whose rounding of
    ``s W`` (:func:`round_codes`) gives the least calibration output error over all the weights (``a = 0``: none),
    judged on at most :data:`SCALE_SEARCH_COLUMNS` evenly spaced output columns (the error separates by column)."""
    diag = np.maximum(np.diag(gram), 1e-12)
    columns = sum(w.shape[1] for w in weights)
    if columns > SCALE_SEARCH_COLUMNS:  # a vocabulary-wide head: decide on evenly spaced columns (every 1 in step)
        step = -(-columns // SCALE_SEARCH_COLUMNS)
        weights = [w[:, ::step] for w in weights]
    best, best_error = None, np.inf
    for power in powers or SCALE_POWERS:
        s = diag ** (power / 2)
        s /= np.exp(np.mean(np.log(s)))
        scaled_gram = gram / np.outer(s, s)  # (s W - Q)^T C' (s W - Q) = (W - Q / s)^T C (W - Q / s)
        error = 0.0
        for w in weights:
            q, scales = round_codes(w * s[:, None], config, scaled_gram)
            error += float(_output_error(w * s[:, None], q, scales, scaled_gram, config.block_size).sum())
        if error < best_error:
            best, best_error = s, error
    return best


def scale_inputs(model, matmuls: list, grams: dict, config: QuantizeConfig, initializers: dict,
                 own_config: dict | None = None, powers: tuple[float, ...] | None = None) -> dict[str, np.ndarray]:
    """Activation-aware scaling (AWQ, Lin et al. 2024) where a normalisation feeds a group of weights (Q/K/V,
    gate/up, a tied lm_head): per group the :func:`input_scale` of its weights (rounded as ``own_config`` says
    for a weight it names, else as ``config``); the normalisation's scale (and bias) initializers are divided by
    ``s`` in place (copied first where something else reads them). Returns
    ``{input tensor: s}`` (groups whose best ``s`` is 1 are left out)."""
    from onnx import numpy_helper

    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    groups: dict[str, list] = {}
    for node in matmuls:
        groups.setdefault(node.input[0], []).append(node)
    chosen = {}
    for tensor, members in groups.items():
        site = _scale_site(tensor, producer, consumers, {m.name for m in members}, initializers)
        shared = any({c.name for c in consumers[m.input[1]] if c.op_type in ("MatMul", "FusedMatMul", "Gemm")}
                     - {m.name for m in members} for m in members)  # a weight another input also reads
        if site is None or shared or tensor not in grams:
            continue
        rounding = (own_config or {}).get(members[0].input[1], config)  # the head's bits for a tied head
        best = input_scale([weight_of(m, initializers) for m in members], grams[tensor], rounding, powers)
        if np.allclose(best, 1.0):
            continue
        node = producer[tensor]
        for name, init in site:
            target = initializers[init]
            values = numpy_helper.to_array(target) / best.astype(np.float32)
            if name != init or {c.name for c in consumers.get(init, [])} != {node.name}:
                target = _own_copy(model, node, name, target)  # shared: this node gets its own copy
                initializers[target.name] = target
            target.CopyFrom(numpy_helper.from_array(values.astype(np.float32), target.name))
        chosen[tensor] = best
    return chosen


def _own_copy(model, node, name: str, initializer):
    """Make ``node`` read its own copy of ``initializer`` in place of its input ``name``; returns the copy."""
    duplicate = model.graph.initializer.add()
    duplicate.CopyFrom(initializer)
    duplicate.name = f"{initializer.name}/{node.name.strip('/').replace('/', '.')}"
    node.input[list(node.input).index(name)] = duplicate.name
    return duplicate


def _fresh(name: str, initializers: dict) -> str:
    """``name``, or ``name`` with a numbered suffix where an initializer has it (a graph another quantiser already
    wrote: ONNX Runtime's names its packed weights ``<weight>_Q4`` too); reserved in ``initializers``."""
    candidate, number = name, 1
    while candidate in initializers:
        candidate, number = f"{name}_{number}", number + 1
    initializers[candidate] = None  # reserved: the caller adds the initializer
    return candidate


def head_weights(model, matmuls: list) -> set[str]:
    """The weights of the MatMuls that write the logits (the lm_head), through at most a few elementwise or
    shape ops (a bias Add, a Cast, a Reshape)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    weights = {m.name: m.input[1] for m in matmuls}
    found = set()
    for output in model.graph.output:
        if "logits" not in output.name:
            continue
        node = producer.get(output.name)
        for _ in range(4):
            if node is None or node.name in weights:
                break
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.name in weights:
            found.add(weights[node.name])
    return found


def table_config(table, vocab_first: bool, config: QuantizeConfig) -> QuantizeConfig:
    """``config`` for a token table (and a head tied to it) of initializer ``table``: at the largest MatMulNBits
    block that divides its width when ``config.block_size`` does not (GatherBlockQuantized needs whole blocks)."""
    from dataclasses import replace

    width = int(table.dims[1] if vocab_first else table.dims[0])
    fitting = [b for b in BLOCK_SIZES if b <= config.block_size and width % b == 0]
    return config if width % config.block_size == 0 or not fitting else replace(config, block_size=max(fitting))


def _quantized_table(node, transpose, name: str, initializers: dict, matmuls: list, packed_of: dict,
                     row_scales: dict, config: QuantizeConfig, stored: dict | None):
    """``(nodes, storage, new initializers)`` replacing a token-table ``Gather`` (reading initializer ``name``,
    through ``transpose`` when given): GatherBlockQuantized over the tied lm_head's codes (whose columns are
    scaled by ``s`` when the lm_head's input is, so the lookup is multiplied by ``1/s``), or over the table's own
    (round to nearest: a lookup has no input to weigh)."""
    from onnx import helper, numpy_helper

    from .numerics.quantize import codes, max_abs_scales, pack_matmulnbits

    table = numpy_helper.to_array(initializers[name])
    table = table.T if transpose is not None else table  # [vocab, d]
    vocab, width = table.shape
    if width % config.block_size:
        return [node], f"fp32 (no block of {', '.join(map(str, BLOCK_SIZES))} divides the width {width})", []
    tied = [m for m in matmuls if m.input[1] == name or tuple(initializers[m.input[1]].dims) == (width, vocab)
            and packed_of[m.input[1]][2].block_size == config.block_size
            and np.array_equal(numpy_helper.to_array(initializers[m.input[1]]), table.T)]
    extra, output = [], node.output[0]
    if tied and stored is not None and tied[0].input[1] != name:  # a separate copy of the lm_head's weight
        stored[name] = {"same_as": tied[0].input[1], "transposed": transpose is None}
    if tied:
        data_name, scales_name, _ = packed_of[tied[0].input[1]]
        storage = f"int{config.bits}, shared with the lm_head"
        if tied[0].input[0] in row_scales:  # the codes hold E diag(s)
            inverse = f"{node.name}/inverse_scale"
            extra.append(numpy_helper.from_array((1.0 / row_scales[tied[0].input[0]]).astype(np.float32), inverse))
            output = f"{node.name}/scaled_rows"
            storage += " (input-scaled)"
    else:
        scales = max_abs_scales(table.T.astype(np.float64), config.bits, config.block_size)
        data, flat_scales = pack_matmulnbits(codes(table.T.astype(np.float64), scales, config.bits,
                                                   config.block_size), scales, config.bits, config.block_size)
        data_name, scales_name = _fresh(f"{name}_Q{config.bits}", initializers), _fresh(f"{name}_scales", initializers)
        extra = [numpy_helper.from_array(data, data_name), numpy_helper.from_array(flat_scales, scales_name)]
        if stored is not None:  # codes of table^T [width, vocab]
            stored[name] = {"data": data_name, "scales": scales_name, "k": width, "bits": config.bits,
                            "block": config.block_size, "transposed": transpose is None, "row_scale": None}
        storage = f"int{config.bits}"
    shape_name = f"{node.name}/table_shape"
    extra.append(numpy_helper.from_array(np.array([vocab, width * config.bits // 8], dtype=np.int64), shape_name))
    flat = f"{node.name}/table_flat"
    nodes = [helper.make_node("Reshape", [data_name, shape_name], [flat], name=f"{node.name}/Reshape"),
             helper.make_node("GatherBlockQuantized", [flat, node.input[1], scales_name], [output],
                              name=f"{node.name}/GatherBlockQuantized", domain="com.microsoft", bits=config.bits,
                              block_size=config.block_size, gather_axis=0, quantize_axis=1)]
    if output != node.output[0]:
        nodes.append(helper.make_node("Mul", [output, inverse], [node.output[0]], name=f"{node.name}/Unscale"))
    return nodes, storage, extra


def stored_value_simulation(fp32_model, quantized_model, stored: dict):
    """``fp32_model`` (the graph before :func:`quantize_graph`, a copy; changed in place and returned) with every
    quantised weight replaced by the values the quantised file multiplies by, ``Q / s`` where input scaling folded
    ``s`` into a normalisation (which keeps its fp32 scale here), and every quantised table by its looked-up
    values: the float simulation of the very values the file stores, against which the file is checked."""
    from onnx import numpy_helper

    from .numerics.quantize import unpack_matmulnbits

    packed = {init.name: init for init in quantized_model.graph.initializer}

    def values(entry: dict) -> np.ndarray:  # [K, N]
        matrix = unpack_matmulnbits(numpy_helper.to_array(packed[entry["data"]]),
                                    numpy_helper.to_array(packed[entry["scales"]]), entry["k"], entry["bits"],
                                    entry["block"])
        return matrix if entry["row_scale"] is None else matrix / entry["row_scale"][:, None]

    for init in fp32_model.graph.initializer:
        entry = stored.get(init.name)
        if entry is None:
            continue
        source = stored[entry["same_as"]] if "same_as" in entry else entry
        matrix = values(source)
        if source["transposed"]:  # the source initializer holds W^T
            matrix = matrix.T
        if "same_as" in entry and entry["transposed"] != source["transposed"]:
            matrix = matrix.T
        init.CopyFrom(numpy_helper.from_array(matrix.astype(np.float32), init.name))
    return fp32_model


def with_accuracy_level(model, level: int):
    """A copy of ``model`` whose ``MatMulNBits`` compute at ``accuracy_level`` ``level`` (0: fp32 activations)."""
    import copy

    from onnx import helper

    copied = copy.deepcopy(model)
    for node in copied.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    return copied
