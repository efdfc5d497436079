"""Ladder rung 4: ONNX Runtime equals PyTorch, for every registered architecture, dense and compressed."""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lestd_export.cli import main
from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.errors import CheckpointError
from lestd_export.export import initializer_sizes, check_parity, constant_bytes, export_model, ort_optimized_sizes
from lestd_export.loading import LoadedModel
from lestd_export.runtime import OrtCausalLM
from tiny import TINY_CONFIGS, assert_same_greedy, tiny_model

ROW_PRUNED = CompressionConfig(ranks=(48, 16), size_fraction=0.5)  # pruned rows in every group
LOW_R2 = CompressionConfig(ranks=(40, 12), size_fraction=0.5)  # llama-gqa: R2 < d_h = 24, U2 not folded


def export_tiny(tmp_path, name, config=None, **kwargs):
    model = tiny_model(name)
    if config is not None:
        compress_model(model, config, progress=False)
    out = tmp_path / f"{name}-{'dense' if config is None else config.method}"
    report = export_model(LoadedModel(model, None, name), out, **kwargs)
    return model, out, report


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "lestd"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_ort_equals_pytorch(tmp_path, name, compressed):
    model, out, report = export_tiny(tmp_path, name, ROW_PRUNED if compressed else None)
    parity = report["parity"]
    assert parity["max_relative_error"] < 1e-4
    assert parity["greedy_tokens_equal"] and parity["decode_steps"] == 8
    assert {"input_ids", "attention_mask", "past_key_values.0.key"} <= set(report["inputs"])
    assert {"logits", "present.0.key", "present.0.value"} <= set(report["outputs"])
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["parity"] == parity
    if compressed:
        ops = report["attention_block_ops"]
        # pruned groups: a leading-axis Gather + Gemm(transA) each; the output: one ScatterND + Gemm
        assert ops.get("Gather", 0) >= 1 and ops.get("ScatterND", 0) == 1 and ops.get("Gemm", 0) >= 2


@pytest.mark.parametrize("config", [ROW_PRUNED, LOW_R2], ids=["r2-full", "r2-low"])
def test_compressed_graph_has_no_dense_weight_even_after_ort_optimisation(tmp_path, config):
    model, out, report = export_tiny(tmp_path, "llama-gqa", config)
    assert report["parity"]["passed"]
    graph = onnx.load(str(out / "model.onnx"))
    attention = [int(np.prod(i.dims)) for i in graph.graph.initializer if "self_attn" in i.name]
    dense_qkv = 64 * (4 + 2 + 2) * 24  # d x (h + 2 h_kv) d_h: what a densified Q/K/V would hold
    assert attention and max(attention) < dense_qkv / 2
    optimized = ort_optimized_sizes(out, tmp_path)
    assert sum(optimized.values()) <= constant_bytes(graph)  # nothing densified or duplicated
    attention_optimized = [size for name, size in optimized.items() if "self_attn" in name]
    assert max(attention_optimized) <= 4 * max(attention)  # bytes: ORT made nothing larger than stored
    # layout: a stored weight is never the left operand of a MatMul (that runs as a slow batched GEMV)
    stored = {i.name for i in graph.graph.initializer}
    assert not [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[0] in stored]


def tiny_tied_model():
    """qwen2 (GQA) with its lm_head tied to the input embedding, as in SmolLM2 and the small Qwen2 models
    (not llama-gqa: optimum's ORTModelForCausalLM assumes head_dim = hidden / heads)."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["qwen2"]()
    config.tie_word_embeddings = True
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("config", [None, ROW_PRUNED], ids=["dense", "lestd"])
def test_tied_embedding_is_stored_and_read_once_even_after_ort_optimisation(tmp_path, config):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = tiny_tied_model()
    if config is not None:
        compress_model(model, config, progress=False)
    out = tmp_path / "tied"
    report = export_model(LoadedModel(model, None, "tied"), out)
    assert report["parity"]["max_relative_error"] < 1e-4 and report["parity"]["greedy_tokens_equal"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the export-time head was swapped back
    graph = onnx.load(str(out / "model.onnx"))
    head = next(n for n in graph.graph.node if "logits" in n.output)
    assert head.op_type == "FusedMatMul" and "model.embed_tokens.weight" in head.input
    assert graph.graph.output[0].type.tensor_type.shape.dim[-1].dim_value == model.config.vocab_size
    # a MatMul(h, Transpose(E)) head would be folded into a second, transposed copy of E here
    assert sum(ort_optimized_sizes(out, tmp_path).values()) <= constant_bytes(graph)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    optimum_model = ORTModelForCausalLM.from_pretrained(out)
    assert_same_greedy(optimum_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), expected, model)


def test_full_rank_export_reproduces_the_original_model(tmp_path):
    original = tiny_model("qwen3")
    _, out, _ = export_tiny(tmp_path, "qwen3", CompressionConfig(ranks=(None, None), core_density=1.0))
    parity = check_parity(original, OrtCausalLM(out))
    assert parity["max_relative_error"] < 1e-4 and parity["greedy_tokens_equal"]


@pytest.mark.parametrize("config", [ROW_PRUNED, LOW_R2], ids=["r2-full", "r2-low"])
def test_weights_shrink_by_what_the_report_predicts(tmp_path, config):
    """On a tiny model the graph's own protobuf overhead dominates the file, so compare stored weights here;
    tests/test_default_model_export.py checks whole-file bytes on the default model."""
    _, dense_dir, _ = export_tiny(tmp_path, "llama-gqa", None, validate=False)
    model = tiny_model("llama-gqa")
    report = compress_model(model, config, progress=False)
    export_model(LoadedModel(model, None, "tiny"), tmp_path / "c", validate=False)
    dense_bytes = sum(initializer_sizes(onnx.load(str(dense_dir / "model.onnx"))).values())
    compressed_bytes = sum(initializer_sizes(onnx.load(str(tmp_path / "c" / "model.onnx"))).values())
    predicted = 4 * (report["params"]["dense_attention"] - report["params"]["stored"])
    assert abs((dense_bytes - compressed_bytes) - predicted) <= 0.02 * predicted


def test_runtime_generates_greedy_and_sampled_with_stop_tokens(tmp_path):
    model, out, _ = export_tiny(tmp_path, "llama-gqa", ROW_PRUNED, validate=False)
    runtime = OrtCausalLM(out)
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = (ids != 0).astype(np.int64)
    greedy = runtime.generate(ids, mask, max_new_tokens=5)
    assert greedy.shape == (2, 9)
    import torch

    with torch.no_grad():
        reference = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
    assert_same_greedy(greedy, reference.numpy(), model, mask)
    stop = int(greedy[0, 4])
    stopped = runtime.generate(ids[:1], mask[:1], max_new_tokens=5, eos_token_id=stop)
    assert stopped.shape == (1, 5)
    sampled = runtime.generate(ids, mask, max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9, seed=1)
    assert sampled.shape == (2, 8) and np.array_equal(
        sampled, runtime.generate(ids, mask, max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9, seed=1))


def test_runtime_handles_an_export_without_kv_cache(tmp_path):
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    model = tiny_model("llama-gqa")
    onnx_export_from_model(model, tmp_path / "no-cache", task="text-generation", do_validation=False)
    runtime = OrtCausalLM(tmp_path / "no-cache")
    assert runtime.past_names == []
    ids = np.array([[5, 6, 7, 8]])
    with torch.no_grad():
        reference = model.generate(torch.from_numpy(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert_same_greedy(runtime.generate(ids, max_new_tokens=4), reference.numpy(), model)


def test_runtime_refuses_a_graph_that_is_not_a_causal_lm(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (tmp_path / "other").mkdir()
    onnx.save(helper.make_model(graph), str(tmp_path / "other" / "model.onnx"))
    with pytest.raises(CheckpointError, match="text-generation convention"):
        OrtCausalLM(tmp_path / "other")


def test_cli_export_errors(tmp_path, capsys):
    tiny = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(tiny)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "-o", str(tmp_path / "a")]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["export", str(tiny), "-o", str(tmp_path / "b"), "--opset", "99"]) == 2
    assert "opset 99 is not supported" in capsys.readouterr().err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["export", str(tiny), "-o", str(existing), "--dense"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        code = main(["export", str(tiny), "-o", str(readonly / "out"), "--dense"])
        import os

        if os.geteuid() != 0:  # root ignores permission bits
            assert code == 2 and "cannot write" in capsys.readouterr().err
    finally:
        readonly.chmod(0o755)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_truncated_onnx_is_a_typed_error(tmp_path):
    from lestd_export.errors import CheckpointError

    _, out, _ = export_tiny(tmp_path, "gpt2", None, validate=False)
    data = (out / "model.onnx").read_bytes()
    (out / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="onnxruntime cannot load"):
        OrtCausalLM(out)


def test_optional_graph_optimisation_keeps_parity(tmp_path):
    _, _, report = export_tiny(tmp_path, "llama-gqa", ROW_PRUNED, optimize=True)
    assert isinstance(report["fusions"], dict)  # the fusions that fired (none may fire on small graphs)
    assert report["parity"]["max_relative_error"] < 1e-4 and report["parity"]["greedy_tokens_equal"]


def test_cli_prints_a_short_summary_and_no_tracer_noise(tmp_path, capsys):
    tiny = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(tiny)
    out = tmp_path / "onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(tiny), "-o", str(out), "--dense"]) == 0
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    printed = capsys.readouterr().out
    assert "{" not in printed and len(printed.splitlines()) <= 8
    assert "max relative logit error" in printed and "greedy tokens equal" in printed
    assert f"lestd-export eval {out} --backend onnxruntime" in printed and str(out / "export_report.json") in printed
    assert main(["export", str(tiny), "-o", str(out), "--dense", "--no-validate", "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "export_report.json").read_text())
    checkpoint = tmp_path / "svd"
    assert main(["compress", str(tiny), "-o", str(checkpoint), "--method", "svd", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "{" not in printed and "relative weight error" in printed and f"lestd-export export {checkpoint}" in printed
