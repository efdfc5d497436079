"""``compress --modules embedding``: the token table (and lm_head) as low-rank factors, a tied pair stored once; exact
at full rank for every architecture, at the requested fraction, reloaded exactly, and ONNX Runtime equal to PyTorch in
every format (optimum fp32 for every registered architecture; genai and quantised optimum by graft)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from lestd_export.compress import EMBEDDING_RANK_STEP, compress_model, embedding_rank
from lestd_export.config import CompressionConfig
from lestd_export.errors import InvalidConfigError
from lestd_export.export import export_model
from lestd_export.healing import stored_parameters
from lestd_export.loading import LoadedModel
from lestd_export.modules import FactoredEmbedding, FactoredLinear, FactoredOutputEmbedding
from lestd_export.numerics.lowrank import svd_layers
from lestd_export.surgery import install_embedding, read_embedding
from tiny import TINY_CONFIGS, assert_rewrite_keeps_logits, reloaded_exactly, tiny_model

NAMES = sorted(TINY_CONFIGS)
EMBEDDING = CompressionConfig(modules=("embedding",), embedding_fraction=0.9)


@pytest.mark.parametrize("name", NAMES)
def test_full_rank_factors_reproduce_the_model(name):
    """Rung 1: at full rank the factored table (and head, tied or not; Gemma 3's scaled lookup) is the dense model."""
    model = tiny_model(name)
    weights = read_embedding(model)

    def factor(model):
        [[table]] = svd_layers([[weights.table]], 1.0, rank=10**6)
        head = None if weights.tied else svd_layers([[weights.head]], 1.0, rank=10**6)[0][0]
        install_embedding(model, (table.a, table.b), None if head is None else (head.a, head.b), weights,
                          torch.float32)

    assert_rewrite_keeps_logits(model, factor, atol=5e-5)
    assert isinstance(model.get_input_embeddings(), FactoredEmbedding)
    assert isinstance(model.get_output_embeddings(), FactoredOutputEmbedding if weights.tied else FactoredLinear)


def test_rank_is_a_whole_block_and_holds_the_fraction():
    """The rank's factors hold at most the fraction of the table (one 32-block less would be too few)."""
    for vocab, width, fraction in ((49152, 576, 0.9), (151936, 896, 0.5), (128, 64, 0.9)):
        rank = embedding_rank(vocab, width, fraction)
        assert rank % EMBEDDING_RANK_STEP == 0
        assert rank * (vocab + width) <= fraction * vocab * width < (rank + EMBEDDING_RANK_STEP) * (vocab + width)
    assert embedding_rank(128, 64, 0.1) == EMBEDDING_RANK_STEP  # never below one block


def table_entries(graph, model) -> int:
    """Entries of the initializers holding one of the factored table's or head's factors (in either layout)."""
    from onnx import numpy_helper

    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    factors = [p.detach().numpy() for m in modules for p in m.parameters()]
    found = 0
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if value.ndim == 2 and any(value.shape == f.shape and np.array_equal(value, f) or
                                   value.shape == f.T.shape and np.array_equal(value, f.T) for f in factors):
            found += value.size
    return found


@pytest.mark.parametrize("name", NAMES)
def test_ort_equals_pytorch_with_the_table_factored(tmp_path, name):
    """Rung 4, every architecture: the optimum export of a model whose token table (and head) is factored equals
    PyTorch through prefill and cached decode, and stores exactly the entries the report counts (tied: once)."""
    model = tiny_model(name)
    report = compress_model(model, EMBEDDING, progress=False)["embedding"]
    assert report["tied"] == (report["head_rank"] is None) and report["fraction"]["stored"] <= 0.9
    export = export_model(LoadedModel(model, None, name), tmp_path / name)
    assert export["parity"]["max_relative_error"] < 1e-4 and export["parity"]["greedy_tokens_equal"]
    graph = onnx.load(str(tmp_path / name / "model.onnx")).graph
    assert table_entries(graph, model) == report["params"]["stored"]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gemma3_text"])
def test_checkpoint_with_the_table_factored_reloads_exactly(tmp_path, name):
    model = tiny_model(name)
    config = CompressionConfig(modules=("attention", "mlp", "embedding"), size_fraction=0.6, mlp_fraction=0.5,
                               embedding_fraction=0.9)
    report = compress_model(model, config, progress=False)
    reloaded = reloaded_exactly(model, report, tmp_path)
    if report["embedding"]["tied"]:  # the head reads the table's own factors
        assert reloaded.get_output_embeddings()._embedding[0] is reloaded.get_input_embeddings()


def test_healing_trains_the_table_factors_once():
    model = tiny_model("gpt2")  # tied: the head adds no parameter of its own
    compress_model(model, EMBEDDING, progress=False)
    table = model.get_input_embeddings()
    assert {id(p) for p in stored_parameters(model)} == {id(table.table.weight), id(table.expand.weight)}


def test_calibrated_table_is_whitened_by_the_head_input():
    """SVD-LLM on the lm_head: with calibration the truncation minimises the logits' error on the head's inputs, so
    at the same rank that error is lower than the plain SVD's."""
    from lestd_export.calibration import CalibrationData, collect_input_grams
    from lestd_export.compress import compress_embedding

    data = CalibrationData(source="test", sequences=np.random.default_rng(0).integers(3, 128, size=(4, 32)),
                           seconds=0.0)
    errors = {}
    for calibrated in (False, True):
        model = tiny_model("gpt2")
        [gram] = collect_input_grams(model, [model.get_output_embeddings()], data, desc="head", progress=False)
        dense = read_embedding(model)
        compress_embedding(model, EMBEDDING, dense, gram if calibrated else None)
        factored = model.get_input_embeddings()
        e = dense.table - (factored.table.weight @ factored.expand.weight.T).double().numpy()  # [V, d]
        errors[calibrated] = float(np.einsum("vd,vd->", e, e @ gram))
    assert errors[True] < errors[False]


def genai_model(tied: bool):
    from test_evaluate import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model, tiny_tokenizer()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("storage", ["fp32", "int4"])
def test_factored_table_grafts_into_genai(tmp_path, tied, storage):
    """The builder's graph with the lookup as ``Gather(A) @ B`` and the head as ``(h @ B^T) @ A^T`` (tied) or its own
    factors: equal to PyTorch in fp32; at int4 the tied table's codes are shared by the lookup and the head, and no
    fp32 weight product is left."""
    pytest.importorskip("onnxruntime_genai")
    from lestd_export.export_genai import export_genai

    model, tokenizer = genai_model(tied)
    report = compress_model(model, CompressionConfig(modules=("embedding",), storage=storage), progress=False)
    exported = export_genai(LoadedModel(model, tokenizer, "tiny"), tmp_path / "genai", storage=storage)
    graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    rank = report["embedding"]["rank"]
    if storage == "fp32":
        assert exported["parity"]["max_relative_error"] < 1e-5
        extra = 0 if not tied else rank * model.config.hidden_size  # the head's B^T beside the lookup's B
        assert exported["embedding_bytes"]["compressed"] == 4 * (report["embedding"]["params"]["stored"] + extra)
        return
    assert exported["parity_fp32"]["max_relative_error"] < 1e-3
    assert exported["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4
    weight_products = [n for n in graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")
                       and n.input[1] in initializers]
    assert not weight_products
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name and "basis" not in n.name)
    reshaped = next(n for n in graph.node if n.output[0] == lookup.input[0])
    assert (reshaped.input[0] == head.input[1]) == tied  # one set of int4 codes for the tied table


def test_quantised_optimum_export_quantises_the_table_factors(tmp_path):
    from lestd_export.export_genai import export_optimum_quantized

    model, tokenizer = genai_model(tied=False)
    compress_model(model, CompressionConfig(modules=("embedding", "mlp"), storage="int4"), progress=False)
    report = export_optimum_quantized(LoadedModel(model, tokenizer, "tiny"), tmp_path / "q", storage="int4", opset=18)
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 1
    assert report["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4


def test_embedding_settings_are_validated(tmp_path, capsys):
    from lestd_export.cli import main

    with pytest.raises(InvalidConfigError, match="add embedding"):
        CompressionConfig(embedding_fraction=0.5)
    with pytest.raises(InvalidConfigError, match="embedding-fraction"):
        CompressionConfig(modules=("embedding",), embedding_fraction=1.5)
    config = CompressionConfig(modules=("embedding", "mlp"))
    assert config.modules == ("mlp", "embedding") and config.embedding_fraction == 0.9
    assert CompressionConfig.from_dict(config.to_dict()) == config
    assert main(["compress", "-o", str(tmp_path / "out"), "--embedding-fraction", "0.5"]) == 2
    assert "add embedding" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_model_without_a_factorable_table_is_refused():
    from lestd_export.errors import UnsupportedArchitectureError

    model = tiny_model("llama-gqa")
    model.set_output_embeddings(copy.deepcopy(model.get_input_embeddings()))  # not an nn.Linear head
    with pytest.raises(UnsupportedArchitectureError, match="embedding"):
        compress_model(model, EMBEDDING, progress=False)
