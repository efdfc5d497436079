"""The ``export`` verb: ONNX with a KV cache in Optimum's text-generation-with-past format, validated.

The compressed modules are written so that tracing them yields exactly the compressed-domain graph
(MatMul with U1; per head group a MatMul with its dense core, or a leading-axis Gather of Z^T and
Gemm(transA) with its kept rows; on the way out a MatMul, a ScatterND for pruned rows, and U1^T read
through FusedMatMul/Gemm), and their weights are stored in the layout they are used in, so no
weight-only subgraph exists for constant folding to densify or duplicate.
Optimum's exporter does the tracing, the cache I/O naming and ``config.json``; we validate
against PyTorch ourselves (left-padded batch, prefill and cached decode) and write a report.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from .checkpoint import COMPRESSION_KEY
from .errors import ExportValidationError, InvalidConfigError
from .hf import LoadedModel
from .io import atomic_output_dir, write_json
from .registry import spec_for

DEFAULT_OPSET = 18
MIN_OPSET = 16
REPORT_FILE = "export_report.json"
ONNX_FILE = "model.onnx"


def check_opset(opset: int) -> None:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as max_opset

    if not MIN_OPSET <= opset <= max_opset:
        raise InvalidConfigError(f"opset {opset} is not supported: use {MIN_OPSET}..{max_opset} "
                                 f"(default {DEFAULT_OPSET})")


class _SharedFactorNotices(logging.Filter):
    """Drops optimum's tied-weight notices about ``U1``: one parameter used by two modules, exported
    once on purpose, which optimum reports in four lines per layer. Its other notices pass, their
    header re-attached to their first line."""

    def __init__(self):
        super().__init__()
        self.header: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Found different candidate ONNX initializers"):
            self.header = message
            return False
        if ".u1" in message and message.startswith(("\t", "Could not find ONNX initializer")):
            return False
        if self.header is not None and message.startswith("\t"):
            record.msg, record.args, self.header = f"{self.header}\n{message}", (), None
        return True


@contextlib.contextmanager
def quiet_tracing():
    """Silences what tracing a Hugging Face model always prints and a user cannot act on: torch's
    TracerWarnings (Python branches on traced shapes, which optimum's dynamic axes cover) and the
    exporter's note on advanced indexing, plus optimum's notices about the shared ``U1``. Errors and
    other warnings pass."""
    import warnings

    import torch
    from optimum.onnx import transformations_utils

    notices = _SharedFactorNotices()
    transformations_utils.logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            yield
    finally:
        transformations_utils.logger.removeFilter(notices)


@contextlib.contextmanager
def tied_head_reads_embedding(model):
    """While exporting, a tied bias-free ``lm_head`` is a :class:`~lestd_export.modules.TiedOutputEmbedding`:
    the graph then reads the one stored embedding, which ONNX Runtime cannot fold into a transposed copy."""
    from torch import nn

    from .modules import TiedOutputEmbedding

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = (isinstance(head, nn.Linear) and head.bias is None and isinstance(embedding, nn.Embedding)
            and head.weight is embedding.weight)
    if not tied:
        yield
        return
    model.set_output_embeddings(TiedOutputEmbedding(embedding))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def export_model(loaded: LoadedModel, out_dir: Path, *, opset: int = DEFAULT_OPSET, validate: bool = True,
                 optimize: bool = False, overwrite: bool = False, tolerance: float = 1e-3,
                 decode_steps: int = 8) -> dict:
    """Export ``loaded.model`` (compressed or dense) to ``out_dir``; returns the export report.

    With ``validate``, a parity failure raises :class:`ExportValidationError` and leaves nothing behind.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    check_opset(opset)
    started = time.perf_counter()
    with atomic_output_dir(Path(out_dir), overwrite) as staging:
        with quiet_tracing(), tied_head_reads_embedding(loaded.model):
            onnx_export_from_model(loaded.model, staging, task="text-generation-with-past", opset=opset,
                                   do_validation=False,
                                   preprocessors=[loaded.tokenizer] if loaded.tokenizer else None)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        fusions = optimize_graph(staging / ONNX_FILE) if optimize else None
        report = describe_export(staging, loaded.model)
        report.update(opset=opset, fusions=fusions, export_seconds=time.perf_counter() - started)
        if validate:
            from .runtime import OrtCausalLM

            parity = check_parity(loaded.model, OrtCausalLM(staging), steps=decode_steps)
            report["parity"] = parity
            if not parity["passed"] or parity["max_relative_error"] > tolerance:
                raise ExportValidationError(
                    f"ONNX Runtime disagrees with PyTorch: relative logit error {parity['max_relative_error']:.2e} "
                    f"(tolerance {tolerance:.0e}), greedy tokens equal: {parity['greedy_tokens_equal']}. "
                    "Re-run with --no-validate to keep the export for inspection")
        write_json(staging / REPORT_FILE, report)
    return report


def optimize_graph(path: Path) -> dict[str, int]:
    """onnxscript's ONNX Runtime fusions (RMSNorm, rotary, attention...), in place; returns what fired."""
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.serde.deserialize_model(onnx.load(str(path)))
    model, fused = optimize_for_ort(model)
    onnx.save(ir.serde.serialize_model(model), str(path))
    return {name: count for name, count in fused.items() if count}


def initializer_sizes(model) -> dict[str, int]:
    from onnx import helper

    return {init.name: int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            for init in model.graph.initializer}


def model_files_bytes(model_file: Path, graph_model=None) -> int:
    """Bytes of an ``.onnx`` file plus the external-data files it names (not other files beside it,
    such as cached quantised copies). ``graph_model``: the file already loaded without external data."""
    import onnx

    model_file = Path(model_file)
    graph_model = graph_model or onnx.load(str(model_file), load_external_data=False)
    locations = {entry.value for tensor in graph_model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return model_file.stat().st_size + sum((model_file.parent / name).stat().st_size for name in locations
                                           if (model_file.parent / name).is_file())


def describe_export(export_dir: Path, model) -> dict:
    """Bytes, the largest initializer, the op histogram of the first attention block, the size fraction."""
    import onnx

    path = Path(export_dir) / ONNX_FILE
    graph_model = onnx.load(str(path), load_external_data=False)
    sizes = initializer_sizes(graph_model)
    spec = spec_for(model.config)
    block = f"/{spec.layers_path.rsplit('.', 1)[-1]}.0/{spec.attention}/"  # node names follow module paths
    histogram = collections.Counter(n.op_type for n in graph_model.graph.node if block in n.name)
    largest = max(sizes, key=sizes.get)
    compression = getattr(model.config, COMPRESSION_KEY, None)
    return {
        "model_bytes": model_files_bytes(path, graph_model),
        "initializer_bytes": sum(sizes.values()),
        "largest_initializer": {"name": largest, "bytes": sizes[largest]},
        "attention_block_ops": dict(sorted(histogram.items())),
        "compressed": compression is not None,
        "method": compression["method"] if compression else "dense",
        "size_fraction": compression["size_fraction"] if compression else
        {"requested": None, "values_only": 1.0, "with_indices": 1.0},
        "inputs": [i.name for i in graph_model.graph.input],
        "outputs": [o.name for o in graph_model.graph.output],
    }


def constant_bytes(model) -> int:
    """Bytes of all initializers plus Constant-node tensors (ONNX Runtime turns the latter into initializers)."""
    from onnx import numpy_helper

    constants = sum(numpy_helper.to_array(a.t).nbytes for n in model.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value")
    return sum(initializer_sizes(model).values()) + constants


def ort_optimized_sizes(export_dir: Path, work_dir: Path) -> dict[str, int]:
    """Initializer sizes (bytes) after ONNX Runtime's ORT_ENABLE_ALL optimisation, saved to disk and re-read."""
    import onnx
    import onnxruntime as ort

    from .runtime import session_options

    optimized = Path(work_dir) / "optimized.onnx"
    options = session_options(optimization="all")
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(Path(export_dir) / ONNX_FILE), sess_options=options, providers=["CPUExecutionProvider"])
    return initializer_sizes(onnx.load(str(optimized)))


def parity_inputs(vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A batch of two prompts of different lengths, the shorter one left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids.astype(np.int64), mask.astype(np.int64)


def check_parity(model, runtime, steps: int = 8, seed: int = 0) -> dict:
    """Compare ONNX Runtime with PyTorch on a left-padded batch: prefill, then ``steps`` cached decode steps.

    Both are fed the PyTorch greedy token at every step; reports the largest relative logit error
    (``||ort - torch|| / ||torch||`` per step, over real positions) and whether the greedy tokens agree.
    """
    import torch

    from .runtime import position_ids

    ids, mask = parity_inputs(model.config.vocab_size, seed)
    errors, max_abs, agree, total, tokens_equal = [], 0.0, 0, 0, True
    past_torch, past_ort, step_ids = None, None, ids
    with torch.inference_mode():
        for step in range(steps + 1):
            kwargs = {"attention_mask": torch.from_numpy(mask), "past_key_values": past_torch, "use_cache": True}
            if runtime.uses_position_ids:
                kwargs["position_ids"] = torch.from_numpy(position_ids(mask)[:, -step_ids.shape[1]:])
            out = model(torch.from_numpy(step_ids), **kwargs)
            expected = out.logits.float().numpy()
            result = runtime.step(step_ids, mask, past_ort)
            real = mask[:, -step_ids.shape[1]:].astype(bool)  # compare only non-padding positions
            a, b = result.logits[real], expected[real]
            errors.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
            max_abs = max(max_abs, float(np.abs(a - b).max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            next_torch, next_ort = expected[:, -1].argmax(-1), result.logits[:, -1].argmax(-1)
            tokens_equal &= bool(np.array_equal(next_torch, next_ort))
            past_torch, past_ort = out.past_key_values, result.past
            step_ids = next_torch[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    return {"max_relative_error": max(errors), "max_abs_error": max_abs, "top1_agreement": agree / total,
            "greedy_tokens_equal": tokens_equal, "decode_steps": steps, "batch": 2, "left_padding": True,
            "passed": tokens_equal}


def load_for_export(model_arg: str | None, config, dense: bool, default=None) -> tuple[LoadedModel, dict | None]:
    """Load the model argument; a compressed checkpoint is exported as it is, ``dense`` exports the
    original model, anything else is compressed with ``config`` (``None``: ``default``, or the
    calibrated default config)."""
    from .compress import compress_model
    from .config import CompressionConfig
    from .loading import load_model

    if dense and config is not None:
        raise InvalidConfigError("--dense exports the original model: drop the compression flags")
    loaded = load_model(model_arg)
    if loaded.compressed:
        if dense or config is not None:
            raise InvalidConfigError(f"{model_arg} is a compressed checkpoint: it is exported as it is, "
                                     "without --dense or compression flags")
        return loaded, None
    if dense:
        return loaded, None
    return loaded, compress_model(loaded.model, config or default or CompressionConfig(calibration="default"),
                                  tokenizer=loaded.tokenizer, source=loaded.source)
