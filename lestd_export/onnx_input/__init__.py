"""Compress the attention of an existing decoder ONNX model (``lestd-export MODEL.onnx -o OUT``).

The ONNX counterpart of :func:`~lestd_export.compress.compress_model`, taking a ``model.onnx`` the way
ONNX Runtime's quantisers do: an onnxruntime-genai build (packed ``qkv_proj`` or separate q/k/v,
GroupQueryAttention) or an optimum text-generation-with-past export, or a directory holding one.

Pipeline: locate each layer's projections (:mod:`~lestd_export.onnx_sites`), read their dense fp32 weights as
float64 ``[in, out]`` matrices, stack them into the per-head slice tensors of
:meth:`~lestd_export.surgery.AttentionWeights.slice_tensor`, capture calibration statistics through ONNX Runtime
(each site's ``qkv_input`` and ``o_input`` added as outputs of a pruned copy of the graph, float64
Gram matrices accumulated batch by batch), run the same Stage I/II as ``compress``
(:func:`~lestd_export.numerics.planner.compress_layers` with the same metrics), refit the kept values, graft the
compressed layers into the graph (:mod:`~lestd_export.graft`), optionally quantise, and write the directory.

Refit: as in ``compress`` (:func:`~lestd_export.refit.sequential_refit`), layer by layer on the inputs of
the already-compressed model, replayed through ONNX Runtime (:func:`sequential_refit_onnx`: the graph is
cut at each layer's attention input and every layer runs as its own small session on the carried
state). Where a graph cannot be cut that way, the kept values are refit instead against the **dense
model's activations** (:func:`dense_refit`: ``Xc = Xd``, ``Hc = Hd``, the Gram matrices captured once;
upstream errors are then not compensated), and the report says so. ``--method svd`` (per-matrix
low rank, SVD-LLM whitening when calibrated) is grafted as ``compress`` computes it, without refit.
Healing and the ``fisher`` objective need a PyTorch model and are refused.

Modules, each above the ones before it: :mod:`.source` (open and check the input, read its weights),
:mod:`.sessions` (ONNX Runtime sessions of parts of the graph), :mod:`.capture` (calibration tokens and
statistics), :mod:`.refit` (the refit through ONNX Runtime), :mod:`.plan` (Stage I/II and the refit, as
``compress`` plans) and :mod:`.driver` (:func:`compress_onnx`: graft, quantise, write, compare).
"""

from .capture import collect_onnx_statistics, load_onnx_calibration
from .driver import REPORT_FILE, compress_onnx
from .plan import check_config, plan_cores, plan_low_rank
from .refit import dense_refit, sequential_refit_onnx
from .sessions import compare_logits, decoder_feed, subgraph_model
from .source import OnnxInput, OnnxInputError, is_onnx_input, open_onnx_input, read_config, read_weights, resolve_input

__all__ = ["REPORT_FILE", "OnnxInput", "OnnxInputError", "check_config", "collect_onnx_statistics", "compare_logits",
           "compress_onnx", "decoder_feed", "dense_refit", "is_onnx_input", "load_onnx_calibration", "open_onnx_input",
           "plan_cores", "plan_low_rank", "read_config", "read_weights", "resolve_input", "sequential_refit_onnx",
           "subgraph_model"]
