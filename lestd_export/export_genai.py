"""Exports by grafting: ``export --format genai`` (an onnxruntime-genai model directory) and the
quantised optimum export (``export --quantize int8|int4``), both with the compressed attention grafted
into the dense model's graph.

The builder makes the dense graph (GroupQueryAttention, fused norms, its own int4/int8 MatMulNBits
for everything else); :mod:`.graft` then replaces each layer's q/k/v/o projections by the
compressed subgraph computed from the PyTorch model's stored factors and blocks, so calibration,
refit and healing carry over, and quantises the new weight MatMuls the way the builder quantises
its own (symmetric MatMulNBits, block 32, accuracy level 4). Everything but the attention
projections is byte-for-byte the builder's model of the same precision.

The quantised optimum export does the same on the package's own dense optimum export and quantises
every 2-D weight MatMul of the model (the attention's factors and blocks included) with MatMulNBits,
as ``bench --quantize int4`` does to a dense export.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .checkpoint import COMPRESSION_KEY
from .config import STORAGE_BITS
from .errors import InvalidConfigError
from .hf import LoadedModel
from .io import atomic_output_dir, write_json

STORAGES = ("fp32", "int8", "int4")  # also the builder's precision names
MODEL_FILE = "model.onnx"
REPORT_FILE = "export_report.json"


def _latent_layers(model) -> list:
    from .modules import LatentAttention

    return [m for m in model.modules() if isinstance(m, LatentAttention)]


def grafted_layers(model) -> list:
    """One :class:`~.graft.LatentLayer` or :class:`~.graft.LowRankLayer` per decoder layer of a compressed model
    (empty for a dense one)."""
    from .graft import LatentLayer, LowRankLayer
    from .modules import LowRankProjection
    from .registry import decoder_layers, spec_for

    latents = _latent_layers(model)
    if latents:
        return [LatentLayer.from_module(m) for m in latents]
    spec = spec_for(model.config)
    layers = []
    for layer in decoder_layers(model, spec):
        attention = getattr(layer, spec.attention)
        names = [spec.fused_qkv] if spec.fused_qkv else [spec.q, spec.k, spec.v]
        modules = [getattr(attention, name) for name in names]
        output = getattr(attention, spec.o)
        if not all(isinstance(m, LowRankProjection) for m in (*modules, output)):
            return []
        layers.append(LowRankLayer.from_modules(modules, output))
    return layers


def mlp_factors(model) -> list:
    """One :class:`~.graft.MlpFactors` (or dict of :class:`~.graft.TTFactors`) per decoder layer of a model whose MLP
    ``compress`` factored (else empty)."""
    from .graft import MlpFactors, TTFactors
    from .registry import decoder_layers, spec_for

    spec = spec_for(model.config)
    layers = [MlpFactors.from_layer(layer, spec) or TTFactors.from_layer(layer, spec)
              for layer in decoder_layers(model, spec)]
    return layers if layers and all(f is not None for f in layers) else []


def compressed_layers(model) -> tuple[list, list, object]:
    """A compressed model's per-layer attention (:func:`grafted_layers`), MLP factors (:func:`mlp_factors`) and
    token table factors (:class:`~.graft.EmbeddingFactors`, None when the table is dense)."""
    from .graft import EmbeddingFactors

    return grafted_layers(model), mlp_factors(model), EmbeddingFactors.from_model(model)


def graft_compressed(model, loaded_model, layers: tuple[list, list, object], quantised_ok: bool = False) -> dict:
    """Graft a compressed model's attention, MLP and token table factors (``layers``, from
    :func:`compressed_layers`) into its dense graph ``model`` (in place); returns the fp32 bytes each kind's weights
    had before and have after (``{"attention": {...}, "mlp": {...}, "embedding": {...}}``)."""
    from .export import initializer_sizes
    from .graft import EmbeddingSites, graft_attention, graft_embedding, graft_mlp, mlp_nodes
    from .onnx_sites import locate_by_name
    from .registry import spec_for

    spec = spec_for(loaded_model.config)
    bytes_by_kind = {}

    def grafted(kind: str, nodes: set[str], graft) -> None:
        dense = _node_weight_bytes(model, nodes)
        before = sum(initializer_sizes(model).values())
        graft()
        stored = dense + sum(initializer_sizes(model).values()) - before  # a weight left dense: kept
        bytes_by_kind[kind] = {"dense": dense, "compressed": stored, "fraction": stored / dense}

    latents, mlps, embedding = layers
    if latents:
        _, sites = locate_by_name(model, quantised_ok=quantised_ok, spec=spec)
        grafted("attention", {n for s in sites for n in (*s.qkv_nodes, s.o_node)},
                lambda: graft_attention(model, sites, latents))
        bytes_by_kind["attention"]["grafted_layers"] = len(sites)
    if mlps:
        grafted("mlp", {node.name for node in mlp_nodes(model, spec).values()}, lambda: graft_mlp(model, spec, mlps))
    if embedding is not None:
        sites = EmbeddingSites.locate(model, embedding.product)
        grafted("embedding", sites.node_names, lambda: graft_embedding(model, sites, embedding))
    return bytes_by_kind


def dense_model(model):
    """``model`` with dense-shaped weights: a compressed model's attention projections are left at their random
    initial values (a graft replaces them), a factored MLP weight, token table or lm_head holds the product of its
    factors (exact, and replaced by the graft); everything else (position embeddings, norms, q/k norms) is
    copied."""
    from transformers import AutoModelForCausalLM

    from .modules import FactoredEmbedding, FactoredLinear, TTLinear
    from .registry import spec_for

    if getattr(model.config, COMPRESSION_KEY, None):
        config = copy.deepcopy(model.config)
        delattr(config, COMPRESSION_KEY)
        dense = AutoModelForCausalLM.from_config(config).eval()
        spec = spec_for(model.config)
        wrapper = f".{spec.attention}."
        state = {key.replace(f"{wrapper}attention.", wrapper): value for key, value in model.state_dict().items()}
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if isinstance(module, FactoredEmbedding):
                state[f"{name}.weight"] = module.table.weight.detach() @ module.expand.weight.detach().T  # [V, d]
            if isinstance(module, (FactoredLinear, TTLinear)):
                product = module.dense_weight().T  # [out, in]
                in_out = spec.weight_in_out and module is not head  # a Conv1D's layout; an lm_head is nn.Linear
                state[f"{name}.weight"] = product.T.contiguous() if in_out else product
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach()
        target = dense.state_dict()
        dense.load_state_dict({k: v for k, v in state.items() if k in target and target[k].shape == v.shape},
                              strict=False)
        model = dense
    return model


def dense_hf_dir(loaded: LoadedModel, dest: Path) -> Path:
    """A Hugging Face directory the builder can read: :func:`dense_model` saved with the tokenizer."""
    dense_model(loaded.model).save_pretrained(dest)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(dest)
    return dest


def _node_weight_bytes(model, node_names: set[str]) -> int:
    """Bytes of the initializers the named nodes read."""
    from .export import initializer_sizes

    sizes = initializer_sizes(model)
    return sum(sizes[i] for i in {i for node in model.graph.node if node.name in node_names for i in node.input
                                  if i in sizes})


def quantize_export(model, directory: Path, loaded: LoadedModel, config, calibration: str, calibration_tokens: int,
                    *, validate: bool, progress: bool) -> dict:
    """Quantise an exported fp32 graph ``model`` (in memory, compressed factors included; its config files in
    ``directory``) with ``config`` (a :class:`~.quantize_graph.QuantizeConfig`), calibrated on ``calibration``
    tokenised by the model's tokenizer; with ``validate`` the result must compute with the values it stores
    (:func:`~.onnx_input.quantized.check_stored_values`). Returns the quantisation report."""
    from .calibration import load_calibration
    from .onnx_input.quantized import quantize_calibrated
    from .onnx_input.source import graph_input

    source = graph_input(model, directory)
    data = None
    if config.calibrated and calibration != "none":
        data = load_calibration(calibration, loaded.model, loaded.tokenizer, calibration_tokens)
    report = quantize_calibrated(source, config, None if data is None else data.sequences, validate=validate,
                                 progress=progress)
    report["calibration"] = None if data is None else data.record()
    return report


def export_genai(loaded: LoadedModel, out_dir: Path, *, storage: str = "fp32", overwrite: bool = False,
                 validate: bool = True, tolerance: float = 1e-3, block_size: int = 32, rounding: str = "awq",
                 head_bits: int | None = None, calibration: str = "default", calibration_tokens: int = 4096,
                 progress: bool = True) -> dict:
    """Write an onnxruntime-genai directory of ``loaded.model`` (compressed or dense) at ``storage``.

    The builder's fp32 graph, the compressed attention grafted in, then every weight quantised by our quantiser
    (:func:`quantize_export`: ``rounding`` calibrated on ``calibration``, blocks of ``block_size``, the table and
    lm_head at ``head_bits``); a dense model
    with ``rounding="rtn"`` is the builder's own int4/int8 build. Returns the export report (also in
    ``DIR/export_report.json``). With ``validate``, the fp32 graph's logits are compared with PyTorch (a relative
    error above ``tolerance`` raises :class:`~.errors.ExportValidationError` and leaves nothing behind), a quantised
    file must compute with the values it stores (same error), its distance from PyTorch fp32 is reported, and the
    genai runtime generates from the directory.
    """
    import onnx

    from .export import initializer_sizes
    from .genai import run_builder
    from .quantize_graph import QuantizeConfig

    if storage not in STORAGES:
        raise InvalidConfigError(f"unknown precision {storage!r}: choose one of {', '.join(STORAGES)}")
    layers = compressed_layers(loaded.model)
    compressed = any(layers)
    hidden = int(loaded.model.config.hidden_size)
    ours = storage in STORAGE_BITS and (compressed or rounding != "rtn")  # our rounding of every weight
    if storage == "int4" and not ours and hidden % block_size \
            and getattr(loaded.model.config, "tie_word_embeddings", False):
        raise InvalidConfigError(f"--block-size {block_size} does not divide the hidden size {hidden}: the genai "
                                 "builder's shared int4 embedding then fails at run time; use a block that divides "
                                 "it, or --rounding awq (our quantiser stores that table at a block that divides it)")
    started = time.perf_counter()
    with atomic_output_dir(Path(out_dir), overwrite) as staging:
        work = Path(tempfile.mkdtemp(prefix=".genai-work-", dir=staging.parent))
        try:
            options = {"int4_block_size": str(block_size)} if storage == "int4" and not ours else {}
            build = run_builder(dense_hf_dir(loaded, work / "hf"), work / "build", "fp32" if ours else storage,
                                extra_options=options)
            report = {"format": "onnxruntime-genai", "storage": storage, "compressed": compressed}
            model = onnx.load(str(build / MODEL_FILE))
            grafted = graft_compressed(model, loaded.model, layers, quantised_ok=True)
            if "attention" in grafted:
                report["attention_bytes"] = grafted["attention"]  # fp32 bytes
                report["grafted_layers"] = grafted["attention"].pop("grafted_layers")
            for kind in ("mlp", "embedding"):
                if kind in grafted:
                    report[f"{kind}_bytes"] = grafted[kind]
            if ours:
                if validate:  # the fp32 graph first: a broken graft never reaches the quantiser
                    _save(model, build, keep_in_memory=True)
                    report["parity_fp32"] = check_genai_parity(loaded.model, build, "fp32", tolerance)
                config = QuantizeConfig(bits=STORAGE_BITS[storage], block_size=block_size, rounding=rounding,
                                        head_bits=head_bits)
                before = sum(initializer_sizes(model).values())
                report["quantization"] = quantize_export(model, build, loaded, config, calibration,
                                                         calibration_tokens, validate=validate, progress=progress)
                report["quantization"]["bytes"] = {"fp32": before, "stored": sum(initializer_sizes(model).values())}
            _save(model, staging)
            for item in build.iterdir():
                if not item.name.startswith(MODEL_FILE):
                    shutil.copy2(item, staging / item.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report["model_bytes"] = sum(p.stat().st_size for p in staging.iterdir() if p.name.startswith(MODEL_FILE))
        compression = getattr(loaded.model.config, COMPRESSION_KEY, None)
        if compression:
            report["method"] = compression["method"]
            report["size_fraction"] = compression["size_fraction"]
        if validate:
            report["parity"] = check_genai_parity(loaded.model, staging, storage, tolerance)
            report["runtime"] = genai_generates(staging)
        report["export_seconds"] = time.perf_counter() - started
        write_json(staging / REPORT_FILE, report)
    return report


def _save(model, directory: Path, keep_in_memory: bool = False) -> None:
    """``directory/model.onnx`` with its weights in ``model.onnx.data`` (replacing what was there); saving moves the
    weights out of the proto, so with ``keep_in_memory`` they are read back for further use."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    for stale in (directory / MODEL_FILE, directory / (MODEL_FILE + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(directory / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=MODEL_FILE + ".data", size_threshold=1024)
    if keep_in_memory:
        load_external_data_for_model(model, str(directory))


def export_optimum_quantized(loaded: LoadedModel, out_dir: Path, *, storage: str, opset: int, overwrite: bool = False,
                             validate: bool = True, block_size: int = 32, rounding: str = "awq",
                             head_bits: int | None = None, calibration: str = "default",
                             calibration_tokens: int = 4096, progress: bool = True) -> dict:
    """Optimum layout at ``storage`` (int8/int4): the dense export, the graft, every weight quantised by
    :func:`quantize_export` (the token table stored once, a tied head included).

    Returns the export report; with ``validate`` the file must compute with the values it stores, and its
    ``parity`` against PyTorch fp32 is reported (quantisation moves the logits).
    """
    import onnx

    from .export import describe_export, export_model
    from .quantize_graph import QuantizeConfig

    if storage not in STORAGE_BITS:
        raise InvalidConfigError(f"quantised optimum export takes int8 or int4, not {storage!r}")
    started = time.perf_counter()
    with atomic_output_dir(Path(out_dir), overwrite) as staging:
        work = Path(tempfile.mkdtemp(prefix=".optimum-work-", dir=staging.parent))
        try:
            dense = LoadedModel(dense_model(loaded.model), loaded.tokenizer, loaded.source)
            export_model(dense, work / "dense", opset=opset, validate=False)
            model = onnx.load(str(work / "dense" / MODEL_FILE))
            graft_compressed(model, loaded.model, compressed_layers(loaded.model))
            config = QuantizeConfig(bits=STORAGE_BITS[storage], block_size=block_size, rounding=rounding,
                                        head_bits=head_bits)
            quantization = quantize_export(model, work / "dense", loaded, config, calibration, calibration_tokens,
                                           validate=validate, progress=progress)
            _save(model, staging)
            for item in (work / "dense").iterdir():
                if not item.name.startswith(MODEL_FILE) and item.name != REPORT_FILE:
                    shutil.copy2(item, staging / item.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        loaded.model.config.save_pretrained(staging)  # with its compression section
        report = describe_export(staging, loaded.model)
        report.update(opset=opset, storage=storage, quantized_matmuls=quantization["weight_matmuls"],
                      quantization=quantization)
        if validate:
            from .export import check_parity
            from .runtime import OrtCausalLM

            report["parity"] = check_parity(loaded.model, OrtCausalLM(staging))
            report["parity"]["checked_against"] = f"PyTorch fp32 (the file is {storage})"
        report["export_seconds"] = time.perf_counter() - started
        write_json(staging / REPORT_FILE, report)
    return report


def genai_logits(model_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    """Prefill logits ``[B, T, V]`` of a genai model through a plain ONNX Runtime session (empty cache)."""
    from .genai import open_genai_onnx

    runner = open_genai_onnx(Path(model_dir))
    return runner.step(input_ids.astype(np.int64), np.ones_like(input_ids, dtype=np.int64)).logits


def check_genai_parity(model, model_dir: Path, storage: str, tolerance: float, seed: int = 0) -> dict:
    """Prefill logits of the genai model against PyTorch on random tokens (batch 1, 16 tokens)."""
    import torch

    from .export import ExportValidationError

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.config.vocab_size, size=(1, 16))
    ours = genai_logits(model_dir, ids)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    error = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))
    top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    passed = error <= tolerance
    if storage == "fp32" and not passed:
        raise ExportValidationError(f"the grafted genai model disagrees with PyTorch: relative logit error "
                                    f"{error:.2e} (tolerance {tolerance:.0e}); re-run with --no-validate to keep it")
    parity = {"max_relative_error": error, "top1_agreement": top1, "tokens": int(ids.size)}
    if storage != "fp32":
        parity["checked_against"] = f"PyTorch fp32 (the file is {storage})"
    return parity


def genai_generates(model_dir: Path, new_tokens: int = 4) -> dict:
    """Load the directory with the onnxruntime-genai runtime and greedily generate a few tokens."""
    from .genai import GenaiRuntime, genai_version

    prompt = np.arange(1, 9)[None]  # [1, 8]
    tokens = GenaiRuntime(model_dir).generate(prompt, new_tokens)[0, prompt.shape[1]:]
    return {"runtime": f"onnxruntime-genai {genai_version()}", "generated": tokens.tolist()}
