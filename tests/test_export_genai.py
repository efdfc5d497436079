"""``export --format genai`` and ``--quantize``: the builder's graph with the compressed attention grafted in equals the
PyTorch compressed model, runs in the genai runtime, and after int4/int8 no fp32 weight product is left in the attention;
the planner's budget holds for the plain layout at the storage precision."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

from lestd_export.compress import compress_model  # noqa: E402
from lestd_export.config import CompressionConfig  # noqa: E402
from lestd_export.export_genai import _latent_layers, export_genai, genai_logits  # noqa: E402
from lestd_export.graft import LatentLayer  # noqa: E402
from lestd_export.numerics.stored import equalize  # noqa: E402
from lestd_export.numerics.quantize import blockwise_round  # noqa: E402
from lestd_export.loading import LoadedModel  # noqa: E402

from test_evaluate import tiny_llama, tiny_tokenizer  # noqa: E402

PRUNED = {"core_density": 0.5}  # full ranks, half the core rows: every q/k/v/o group gathers its rows
LOW_R2 = {"ranks": (None, 8), "core_density": 0.6}  # R2 < d_h: U2 is stored, heads mapped through it
SMALL = {"ranks": (32, None), "core_density": 0.6}  # R1 = d / 2 and pruned rows: fewer bytes than the dense attention


def compressed(settings: dict, storage: str = "fp32") -> LoadedModel:
    model = tiny_llama()
    compress_model(model, CompressionConfig(storage=storage, layout="plain", **settings), progress=False)
    return LoadedModel(model, tiny_tokenizer(), source="tiny")


@pytest.mark.parametrize("settings", [PRUNED, LOW_R2], ids=["pruned", "r2-below-head-dim"])
def test_grafted_genai_model_equals_pytorch(settings, tmp_path):
    loaded = compressed(settings)
    report = export_genai(loaded, tmp_path / "genai", storage="fp32")
    assert report["grafted_layers"] == 2 and report["parity"]["max_relative_error"] < 1e-5
    ids = np.random.default_rng(1).integers(3, 128, size=(2, 12))  # a batch of 2, other tokens than the check's
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(genai_logits(tmp_path / "genai", ids), expected, atol=1e-4, rtol=1e-4)
    assert len(report["runtime"]["generated"]) == 4  # the genai runtime loads the directory and generates
    assert json.loads((tmp_path / "genai" / "export_report.json").read_text())["format"] == "onnxruntime-genai"
    from lestd_export.evaluate import size_fraction_of_dir, size_fraction_of_model

    assert size_fraction_of_dir(tmp_path / "genai") == size_fraction_of_model(loaded.model) < 1  # eval reports it


@pytest.mark.parametrize("storage,op", [("int4", "MatMulNBits"), ("int8", "MatMulNBits")])
def test_quantised_graft_leaves_no_fp32_weight_product(storage, op, tmp_path):
    loaded = compressed(SMALL, storage)
    report = export_genai(loaded, tmp_path / "genai", storage=storage)
    model = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    grafted = [n for n in model.graph.node if "/lestd/" in n.name]
    weight_products = [n for n in grafted if n.op_type in ("MatMul", "Gemm", "FusedMatMul", op)
                       and any(i in initializers for i in n.input[1:2])]
    assert weight_products and all(n.op_type == op for n in weight_products)
    bits = {int(a.i) for n in weight_products for a in n.attribute if a.name == "bits"}
    assert bits == {int(storage[3:])}
    assert report["attention_bytes"]["compressed"] < report["attention_bytes"]["dense"]
    ids = np.random.default_rng(1).integers(3, 128, size=(1, 16))
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(ids)).logits.numpy().ravel()
    correlation = np.corrcoef(genai_logits(tmp_path / "genai", ids).ravel(), expected)[0, 1]
    assert correlation > 0.8  # int4 noise on a random tiny model (the builder's own dense int4: 0.93), not a wrong graph
    # the tight check: the fp32 graft equals PyTorch, and the file computes with the values it stores
    assert report["parity_fp32"]["max_relative_error"] < 1e-3
    assert report["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4


def test_equalised_factor_pairs_keep_the_product_and_share_their_ranges():
    """Cross-layer equalisation of ``x @ F @ S``: the product is unchanged, column j of F and row j of S end up
    with the same largest entry (rows of zeros stay), and the rounding error of blockwise int4 along S's rows
    (what MatMulNBits does) drops when the rows' scales differ as a whitened basis makes them."""
    rng = np.random.default_rng(0)
    first = np.linalg.qr(rng.standard_normal((64, 8)))[0]  # orthonormal columns, like U1
    second = rng.standard_normal((8, 48)) * np.array([30.0, 8.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.0])[:, None]
    equalised, scale = equalize(first, second)
    balanced = second / scale[:, None]
    np.testing.assert_allclose(equalised @ balanced, first @ second, atol=1e-10)
    np.testing.assert_allclose(np.abs(equalised).max(0)[:7], np.abs(balanced).max(1)[:7], rtol=1e-12)
    assert np.all(balanced[7] == 0)

    def int4_rows(w):  # symmetric int4 in blocks of 8 rows per column, the largest |entry| -> 8 steps
        blocks = w.reshape(-1, 8, w.shape[1])
        step = np.abs(blocks).max(1, keepdims=True) / 8
        return (np.round(blocks / np.where(step > 0, step, 1)) * step).reshape(w.shape)

    x = rng.standard_normal((256, 64))
    errors = [np.linalg.norm(x @ f @ (s - int4_rows(s))) for f, s in ((first, second), (equalised, balanced))]
    assert errors[1] < 0.6 * errors[0]  # 0.53 here


def ort_quantized(model, bits: int):
    """ONNX Runtime's own quantiser (symmetric MatMulNBits, block 32, as the genai builder writes it)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_round_is_what_matmulnbits_computes_with(bits):
    """The simulated rounding equals ONNX Runtime's quantiser (K not a multiple of the block), and a column
    scaled by any positive factor stays on its grid (so the graft's equalisation keeps rounded values)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    k, n = 70, 5
    weight = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = ort_quantized(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    eye = np.eye(k, dtype=np.float32)  # one-hot rows pass accuracy level 4's input quantisation exactly
    stored = np.concatenate([session.run(None, {"x": eye[i:i + 1]})[0] for i in range(k)])
    rounded = blockwise_round(weight, bits)
    np.testing.assert_allclose(rounded, stored, atol=1e-6)
    assert np.abs(rounded - weight).max() > 1e-3  # it does round
    scale = rng.uniform(0.1, 10.0, n).astype(np.float32)
    np.testing.assert_allclose(blockwise_round(rounded * scale, bits), rounded * scale, rtol=1e-5, atol=1e-7)


def test_quantised_plain_checkpoint_refits_on_the_rounded_basis():
    """With int4 storage and calibration, the checkpoint's Q/K/V columns of U1 lie on the int4 grid (rounded before
    the refit, which fits the core to them), and stay on it after the graft's equalisation with its own ranges,
    so the grafted first MatMul stores exactly the values the refit saw."""
    model = tiny_llama()
    config = CompressionConfig(size_fraction=0.5, storage="int4", calibration="self", calibration_tokens=256)
    compress_model(model, config, progress=False)
    for layer in (LatentLayer.from_module(m) for m in _latent_layers(model)):
        first = layer.u1[:, layer.qkv_union]
        np.testing.assert_allclose(blockwise_round(first, 4), first, atol=1e-6)
        rows = layer.segments[0][1]  # plain layout: one block over the shared rows
        assert len(layer.segments) == 1 and (rows is None or np.array_equal(rows, layer.qkv_union))
        equalised = equalize(first, layer.segments[0][0])[0]  # what numerics.stored.latent_input_group writes for one segment
        np.testing.assert_allclose(blockwise_round(equalised, 4), equalised, rtol=1e-5, atol=1e-6)


def test_plain_layout_budget_counts_what_the_graft_stores():
    """Plain layout (int4 storage): Q/K/V share their rows, every kept row pays its U1 column on its side, no index
    is stored; the requested fraction holds for those entries, and the grafted file stores exactly them."""
    model = tiny_llama()
    report = compress_model(model, CompressionConfig(size_fraction=0.5, storage="int4"), progress=False)
    d = 64
    stored = 0
    for layer in report["layers"]:
        rows = layer["rows"]
        assert rows["q"] == rows["k"] == rows["v"] and layer["indices"] == 0
        kept_o = rows["o"] if rows["o"] is not None else layer["ranks"][0]
        assert layer["output_copy"] == d * kept_o
        stored += layer["values"] + layer["output_copy"]
    dense = report["params"]["dense_attention"]
    assert stored == report["params"]["stored"]
    assert 0.45 <= stored / dense <= 0.5 + 1e-9  # on a 64-wide model one output-head row is 1.1% of a layer
    assert report["size_fraction"]["storage"] == "int4" and report["size_fraction"]["layout"] == "plain"
    latent = [LatentLayer.from_module(m) for m in _latent_layers(model)]
    grafted = sum(x.u1[:, x.qkv_union].size + sum(w.size for w, _, _ in x.segments) + x.o_weight.size
                  + d * x.o_weight.shape[1] for x in latent)
    assert grafted == stored  # the graft's initializers (before quantisation), entry for entry


def test_dense_output_keeps_the_output_projection_and_the_budget(tmp_path):
    """--dense-output: Q/K/V carry the whole budget, O stays the original dense node in every format and reload."""
    from lestd_export.compress import load_compressed, save_compressed
    from lestd_export.export import export_model

    model = tiny_llama()
    report = compress_model(model, CompressionConfig(size_fraction=0.6, storage="int4", dense_output=True),
                            progress=False)
    assert all(set(layer["rows"]) == {"q", "k", "v"} for layer in report["layers"])
    assert 0.5 <= report["size_fraction"]["with_indices"] <= 0.6 + 1e-9  # the dense O (1/3 here) is counted
    loaded = LoadedModel(model, tiny_tokenizer(), source="tiny")
    save_compressed(loaded, report, tmp_path / "checkpoint")
    ids = np.random.default_rng(0).integers(3, 128, size=(2, 10))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
        reloaded = load_compressed(tmp_path / "checkpoint").model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_array_equal(reloaded, expected)
    genai_report = export_genai(loaded, tmp_path / "genai", storage="fp32")
    np.testing.assert_allclose(genai_logits(tmp_path / "genai", ids), expected, atol=1e-4, rtol=1e-4)
    graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False).graph
    assert sum(n.name.endswith("o_proj/MatMul") for n in graph.node) == 2  # the builder's own output projections
    assert genai_report["attention_bytes"]["compressed"] < genai_report["attention_bytes"]["dense"]
    assert export_model(loaded, tmp_path / "optimum")["parity"]["passed"]


def test_quantised_optimum_export_quantises_every_weight_product(tmp_path):
    """``export --quantize int4`` (optimum layout): the graft on the dense export, then MatMulNBits on every 2-D
    weight MatMul; the package's runtime runs it (the parity check: prefill and cached decode steps)."""
    from lestd_export.export_genai import export_optimum_quantized

    loaded = compressed(SMALL, "int4")
    report = export_optimum_quantized(loaded, tmp_path / "q", storage="int4", opset=18)
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    initializers = {i.name: len(i.dims) for i in graph.initializer}
    fp32_weight_products = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul")
                            and any(initializers.get(i) == 2 for i in n.input)]
    assert not fp32_weight_products
    assert sum("/lestd/" in n.name and n.op_type == "MatMulNBits" for n in graph.node) == 8  # 2 layers x 4
    assert report["storage"] == "int4" and report["parity"]["decode_steps"] == 8
    assert report["parity"]["max_relative_error"] < 1.0  # int4 noise on a random tiny model, not a wrong graph
    assert report["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4  # the tight check


def test_svd_baseline_grafts_into_genai(tmp_path):
    """The per-matrix SVD baseline (SVD-LLM when calibrated) exports to genai too: x @ a @ b per projection."""
    model = tiny_llama()
    compress_model(model, CompressionConfig(method="svd", size_fraction=0.5, layout="plain"), progress=False)
    report = export_genai(LoadedModel(model, tiny_tokenizer(), source="tiny"), tmp_path / "genai", storage="fp32")
    assert report["grafted_layers"] == 2 and report["parity"]["max_relative_error"] < 1e-5


@pytest.mark.parametrize("bits, block", [(4, 32), (4, 16), (8, 32), (4, 64)])
def test_our_codes_are_what_matmulnbits_computes_with(bits, block):
    """Codes on any grid (here a searched one) packed by numerics.quantize run in ONNX Runtime's MatMulNBits as
    exactly the values the PyTorch simulation uses (K not a multiple of the block)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lestd_export.numerics.quantize import codes, dequantize, pack_matmulnbits, search_scales, unpack_matmulnbits

    rng = np.random.default_rng(bits + block)
    k, n = 70, 6
    weight = rng.standard_normal((k, n)).astype(np.float32)
    scales = search_scales(weight, bits, block)
    q = codes(weight, scales, bits, block)
    packed, flat_scales = pack_matmulnbits(q, scales, bits, block)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(flat_scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    eye = np.eye(k, dtype=np.float32)
    stored = np.concatenate([session.run(None, {"x": eye[i:i + 1]})[0] for i in range(k)])
    np.testing.assert_allclose(stored, dequantize(q, scales, block), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(unpack_matmulnbits(packed, flat_scales, k, bits, block), dequantize(q, scales, block),
                               rtol=1e-6)  # the stored-value check reads the file back exactly


@pytest.mark.parametrize("storage", ["fp32", "int4"])
def test_compressed_mlp_grafts_into_genai(storage, tmp_path):
    """``--modules attention,mlp``: the builder's graph with the attention and the MLP factors grafted in equals
    PyTorch (fp32), stores the MLP in the counted bytes, and at int4 keeps no fp32 weight product in the MLP."""
    model = tiny_llama()
    config = CompressionConfig(modules=("attention", "mlp"), mlp_fraction=0.6, layout="plain", storage=storage, **SMALL)
    report = compress_model(model, config, progress=False)
    loaded = LoadedModel(model, tiny_tokenizer(), source="tiny")
    exported = export_genai(loaded, tmp_path / "genai", storage=storage)
    assert exported["mlp_bytes"]["compressed"] == 4 * report["mlp"]["params"]["stored"]  # fp32 factor entries
    graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False).graph
    mlp = [n for n in graph.node if "/mlp/" in n.name and n.op_type in ("MatMul", "MatMulNBits")]
    initializers = {i.name for i in graph.initializer}
    weight_products = [n for n in mlp if n.input[1] in initializers]
    assert len(weight_products) == 2 * 5  # per layer: shared basis, gate, up, down's two factors
    if storage == "fp32":
        assert exported["parity"]["max_relative_error"] < 1e-5
    else:
        assert {n.op_type for n in weight_products} == {"MatMulNBits"}
        assert exported["parity_fp32"]["max_relative_error"] < 1e-3
        assert exported["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4


def test_quantised_optimum_export_quantises_the_mlp_factors(tmp_path):
    from lestd_export.export_genai import export_optimum_quantized

    model = tiny_llama()
    compress_model(model, CompressionConfig(modules=("mlp",), mlp_fraction=0.6, storage="int4"), progress=False)
    report = export_optimum_quantized(LoadedModel(model, tiny_tokenizer(), source="tiny"), tmp_path / "q",
                                      storage="int4", opset=18)
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    assert sum("/mlp/" in n.name and n.op_type == "MatMulNBits" for n in graph.node) == 2 * 5
    assert report["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4


@pytest.mark.parametrize("method", ["tt", "saten"])
@pytest.mark.parametrize("storage", ["fp32", "int4"])
def test_tt_mlp_grafts_into_genai(storage, method, tmp_path):
    """``--mlp-method tt|saten``: each MLP weight node becomes the TT cores' two MatMuls between reshapes (and the
    sparse residual's Gather/ScatterElements); equal to PyTorch in fp32, the counted entries stored (a sparse index
    one int32); at int4 both cores of every weight in MatMulNBits, and the file computes with what it stores."""
    model = tiny_llama()
    config = CompressionConfig(modules=("mlp",), mlp_fraction=0.6, mlp_method=method, storage=storage)
    report = compress_model(model, config, progress=False)["mlp"]
    exported = export_genai(LoadedModel(model, tiny_tokenizer(), source="tiny"), tmp_path / "genai", storage=storage)
    graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    cores = [n for n in graph.node if "/tt/" in n.name and n.op_type in ("MatMul", "MatMulNBits")
             and n.input[1] in initializers]
    assert len(cores) == 2 * 3 * 2  # layers x weights x cores
    assert sum(n.op_type == "ScatterElements" for n in graph.node) == (6 if method == "saten" else 0)
    if storage == "fp32":
        assert exported["parity"]["max_relative_error"] < 1e-5
        shapes = 6 * (2 + 4 + 2 + 3 + 1) * 8 + (6 * 4 if method == "saten" else 0)  # reshape targets, widths
        assert exported["mlp_bytes"]["compressed"] == 4 * report["params"]["stored"] + shapes
    else:
        assert {n.op_type for n in cores} == {"MatMulNBits"}
        assert exported["parity_fp32"]["max_relative_error"] < 1e-3
        assert exported["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4


def test_wide_weight_inputs_are_rounded_without_a_gram(monkeypatch, tmp_path):
    """A weight whose input is wider than MAX_GRAM_WIDTH (a TT core's k r) gets no Gram: its capture would not fit in
    memory. The others keep theirs, and the file still computes with what it stores."""
    import lestd_export.onnx_input.quantized as quantized

    captured = []
    real = quantized.capture_grams
    monkeypatch.setattr(quantized, "MAX_GRAM_WIDTH", 64)  # the tiny model's MLP down_proj reads 96 wide
    monkeypatch.setattr(quantized, "capture_grams", lambda source, tensors, *a, **k: captured.append(tensors)
                        or real(source, tensors, *a, **k))
    loaded = compressed(SMALL, "int4")
    report = export_genai(loaded, tmp_path / "genai", storage="int4")
    [tensors] = captured  # gate/up read the norm's output (64 wide); down_proj reads the MLP's product (96)
    assert any("post_attention_layernorm" in t for t in tensors) and not any("/mlp/" in t for t in tensors)
    assert report["quantization"]["stored_values"]["max_relative_logit_difference"] < 1e-4
