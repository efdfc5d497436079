"""The compressed checkpoint: ``save_compressed``/``load_compressed`` write and reload a model that
``compress_model`` rewrote, without recomputing anything.

Layout: ``model.safetensors`` (shared factors stored once), ``config.json`` with a ``lestd_compression``
section (method, settings and the per-layer layout needed to rebuild the modules), ``generation_config.json``,
tokenizer files, and ``compression_report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .files import read_json
from .hf import LoadedModel, load_tokenizer
from .io import atomic_output_dir, write_json
from .registry import attention_shape, decoder_layers, spec_for

COMPRESSION_KEY = "lestd_compression"
FORMAT_VERSION = 2  # 2: rows shared by a group's heads, U2 folded into the blocks at R2 == d_h
REPORT_FILE = "compression_report.json"
WEIGHTS_FILE = "model.safetensors"


def is_compressed_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and COMPRESSION_KEY in read_json(config, "re-create the directory")


def save_compressed(loaded: LoadedModel, report: dict, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write a reloadable checkpoint atomically (staging directory, then rename)."""
    from safetensors.torch import save_model

    model = loaded.model
    if getattr(model.config, COMPRESSION_KEY, None) is None:
        raise CheckpointError("the model is not compressed: call compress_model first")
    with atomic_output_dir(Path(out_dir), overwrite) as staging:
        save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        write_json(staging / REPORT_FILE, report)
    return Path(out_dir)


def apply_layout(model, compression: dict) -> None:
    """Swap in empty compressed modules of the recorded shapes (weights are loaded afterwards)."""
    from .numerics.lowrank import LowRankMatrix
    from .numerics.pruning import CoreGroup, LayerCore
    from .surgery import install_core_attention, install_low_rank, read_attention, slice_groups

    spec = spec_for(model.config)
    if compression.get("mlp"):
        _apply_mlp_layout(model, spec, compression["mlp"])
    if compression.get("embedding"):
        _apply_embedding_layout(model, compression["embedding"])
    if "attention" not in compression["config"].get("modules", ["attention"]):
        return
    shape = attention_shape(model.config)
    groups = slice_groups(shape, with_output=not compression["config"].get("dense_output", False))
    dtype = next(model.parameters()).dtype
    layers = decoder_layers(model, spec)
    if len(layers) != len(compression["layers"]):
        raise CheckpointError(f"config records {len(compression['layers'])} compressed layers, model has {len(layers)}")
    for i, (layer, entry) in enumerate(zip(layers, compression["layers"])):
        biases = read_attention(getattr(layer, spec.attention), spec, shape, i).biases
        if compression["method"] == "svd":
            sizes = {"q": (shape.hidden, shape.heads * shape.head_dim),
                     "k": (shape.hidden, shape.kv_heads * shape.head_dim),
                     "v": (shape.hidden, shape.kv_heads * shape.head_dim),
                     "o": (shape.heads * shape.head_dim, shape.hidden)}
            factors = {n: LowRankMatrix(np.zeros((a, entry["ranks"][n])), np.zeros((entry["ranks"][n], b)), 0.0, 0.0)
                       for n, (a, b) in sizes.items()}
            install_low_rank(layer, spec, factors, biases, dtype)
            continue
        r1, r2 = entry["ranks"]
        kept = {}
        for name, size in zip(groups.names, groups.sizes):
            k = entry["rows"][name]
            kept[name] = CoreGroup(rows=None if k is None else np.zeros(k, dtype=np.int32),
                                   block=np.zeros((size, r1 if k is None else k, r2)))
        core = LayerCore(np.zeros((shape.hidden, r1)), np.zeros((shape.head_dim, r2)), kept, 0.0, 0.0)
        summary = {"ranks": entry["ranks"], "density": entry["density"],
                   "stored": entry["values"] + entry["indices"], "dense": entry["dense"]}
        install_core_attention(layer, spec, core, biases, dtype, summary,
                               shared_rows=compression["config"].get("layout") == "plain")


def _apply_mlp_layout(model, spec, layout: dict) -> None:
    """Empty compressed MLPs of the recorded ranks per layer: :class:`~.modules.FactoredLinear` (input basis, output
    weight) or, for ``tt``/``saten``, a :class:`~.modules.TTLinear` per weight (and its sparse entries)."""
    from .numerics.tt import TTWeight, balanced_modes
    from .surgery import install_mlp, install_mlp_tt, mlp_members, read_mlp

    dtype = next(model.parameters()).dtype
    layers = decoder_layers(model, spec)
    ranks = layout["ranks"]
    if len(layers) != len(ranks):
        raise CheckpointError(f"config records {len(ranks)} compressed MLPs, model has {len(layers)}")
    for i, (layer, layer_ranks) in enumerate(zip(layers, ranks)):
        weights = read_mlp(layer, spec, i)
        if layout.get("method") in ("tt", "saten"):
            factors = {}
            for (path, member), r, nnz in zip(mlp_members(weights, spec).items(), layer_ranks, layout["sparse"][i]):
                (k1, k2), (n1, n2) = balanced_modes(member.shape[0], 2), balanced_modes(member.shape[1], 2)
                factors[path] = TTWeight([np.zeros((1, k1, n1, r)), np.zeros((r, k2, n2, 1))], (k1, k2), (n1, n2),
                                         np.zeros(nnz, dtype=np.int32), np.zeros(nnz), 0.0, 0.0)
            install_mlp_tt(layer, spec, factors, weights, dtype)
            continue
        (d, n), (f, _), (r_in, r_out) = weights.inputs.shape, weights.output.shape, layer_ranks
        install_mlp(layer, spec, (np.zeros((d, r_in)), np.zeros((r_in, n))), (np.zeros((f, r_out)),
                                                                             np.zeros((r_out, d))), weights, dtype)


def _apply_embedding_layout(model, layout: dict) -> None:
    """An empty factored token table (and lm_head) of the recorded ranks."""
    from .surgery import install_embedding, read_embedding

    weights = read_embedding(model)
    (vocab, width), r = weights.table.shape, layout["rank"]
    head = None if weights.tied else (np.zeros((width, layout["head_rank"])), np.zeros((layout["head_rank"], vocab)))
    install_embedding(model, (np.zeros((vocab, r)), np.zeros((r, width))), head, weights,
                      next(model.parameters()).dtype)


def load_compressed(path: Path) -> LoadedModel:
    """Rebuild a compressed model from a checkpoint directory; nothing is recomputed."""
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}: it is not a complete compressed checkpoint")
    config = AutoConfig.from_pretrained(path)
    compression = getattr(config, COMPRESSION_KEY, None)
    if not compression or compression.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}/config.json has no {COMPRESSION_KEY} section of format {FORMAT_VERSION}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_layout(model, compression)
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    model.eval()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), source=str(path), compressed=True)


def read_report(path: Path) -> dict:
    return json.loads((Path(path) / REPORT_FILE).read_text())
