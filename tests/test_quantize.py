"""`lestd-export quantize`: our rounding of every weight in the builder's int4 layout (issue 18).

Ladder: the calibrated rounding's output error on calibration inputs is at most round-to-nearest's for every
weight; the written file computes exactly the PyTorch simulation of the values it stores (fp32 activations);
the token table is stored once when tied; bad settings are typed errors.
"""

import numpy as np
import onnx
import pytest
import torch

from lestd_export.cli import main
from lestd_export.errors import InvalidConfigError
from lestd_export.numerics.quantize import blockwise_round, dequantize
from lestd_export.quantize_graph import QuantizeConfig, round_codes, weight_matmuls
from tiny import COMMON


def output_error(weight, values, gram):
    error = weight - values
    return float(np.trace(error.T @ gram @ error))


@pytest.mark.parametrize("rounding", ["awq", "gptq"])
def test_calibrated_rounding_never_loses_to_round_to_nearest(rounding):
    rng = np.random.default_rng(0)
    for k, n, block in ((64, 24, 32), (80, 16, 16), (96, 8, 64)):
        x = rng.standard_normal((512, k)) * np.exp(rng.standard_normal(k))  # channels of very different scale
        gram = x.T @ x / len(x)
        weight = rng.standard_normal((k, n))
        config = QuantizeConfig(block_size=block, rounding=rounding)
        q, scales = round_codes(weight, config, gram)
        ours = output_error(weight, dequantize(q, scales, block), gram)
        nearest = output_error(weight, blockwise_round(weight, 4, block), gram)
        assert ours <= nearest * (1 + 1e-12)
        assert ours < 0.9 * nearest  # and it does help on skewed inputs


def test_refined_scales_never_raise_the_weighted_rounding_error():
    from lestd_export.numerics.quantize import _block_codes, _blocks, refine_scales, search_scales

    rng = np.random.default_rng(4)
    weight = rng.standard_normal((96, 40)) * np.exp(rng.standard_normal((96, 1)))
    importance = np.exp(rng.standard_normal(96))
    blocks, rows = _blocks(weight, 32), _blocks(importance[:, None], 32)

    def error(scales):
        return np.sum(rows * (blocks - _block_codes(blocks, scales, 4) * scales[:, None, :]) ** 2, axis=1)

    searched = search_scales(weight, 4, 32, importance=importance)
    refined = refine_scales(weight, searched, 4, 32, importance)
    assert np.all(error(refined) <= error(searched)) and error(refined).sum() < 0.99 * error(searched).sum()


def test_bad_settings_are_typed_errors(capsys):
    for bad in (dict(bits=3), dict(block_size=48), dict(rounding="hqq")):
        with pytest.raises(InvalidConfigError):
            QuantizeConfig(**bad)
    with pytest.raises(SystemExit):
        main(["quantize", "x.onnx", "-o", "out", "--block-size", "48"])
    assert "invalid choice: 48" in capsys.readouterr().err


def prefill_logits(source, model, ids):
    """Logits of an in-memory decoder ``model`` fed like ``source`` (an OnnxInput of the same graph)."""
    import onnxruntime as ort

    from lestd_export.onnx_input import decoder_feed

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], decoder_feed(session, source.io, source.shape, ids))[0]


@pytest.fixture()
def tied_hf(tmp_path):
    """A tiny Llama with tied embeddings saved as a Hugging Face directory with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from test_cli_errors import word_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "tie_word_embeddings": True}, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    word_tokenizer().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def tied_export(tmp_path_factory):
    """A tiny Llama with tied embeddings, exported by optimum, with its PyTorch model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lestd_export.export import export_model
    from lestd_export.hf import LoadedModel
    from test_cli_errors import word_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "tie_word_embeddings": True}, num_key_value_heads=2)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    root = tmp_path_factory.mktemp("quantize")
    export_model(LoadedModel(model, word_tokenizer(), "tiny"), root / "fp32", validate=False)
    return root, model


def test_file_equals_the_simulation_and_stores_the_tied_table_once(tied_export):
    import onnxruntime as ort

    from lestd_export.inspect import inspect_model
    from lestd_export.onnx_input import decoder_feed, open_onnx_input
    from lestd_export.onnx_input.quantize import quantize_onnx

    root, model = tied_export
    report = quantize_onnx(root / "fp32", root / "rtn", QuantizeConfig(rounding="rtn", accuracy_level=0),
                           progress=False)
    assert report["token_table"] == ["int4, shared with the lm_head"] and report["weight_matmuls"] == 2 * 7 + 1
    written = onnx.load(str(root / "rtn" / "model.onnx"))
    large_fp32 = [i.name for i in written.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims
                  and np.prod(i.dims) >= 64 * 64]
    assert weight_matmuls(written) == [] and large_fp32 == []  # every weight and the table are int4
    found = inspect_model(str(root / "rtn"))
    assert [s.storage for s in found.sites if s.kind == "lm_head"] == ["tied to embedding"]  # stored once
    assert "int4 GatherBlockQuantized block 32" in found.storages()["embedding"]
    assert found.totals()["embedding"] == 128 * 64 // 2 + 128 * 2 * 4 + 2 * 8  # codes + scales + the Reshape shape
    simulated = AutoModel_simulation(model)
    source = open_onnx_input(root / "fp32")  # the same inputs and outputs
    session = ort.InferenceSession(str(root / "rtn" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(3, 120, size=(2, 10))
    logits = session.run(["logits"], decoder_feed(session, source.io, source.shape, ids))[0]
    with torch.no_grad():
        expected = simulated(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=2e-5 * np.abs(expected).max())


def AutoModel_simulation(model):
    """A copy of ``model`` whose every Linear (and the tied table, through the lm_head) holds the rounded values."""
    import copy

    simulated = copy.deepcopy(model)
    with torch.no_grad():
        for module in simulated.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(blockwise_round(module.weight.double().numpy().T, 4, 32).T))
    return simulated


def test_cli_quantizes_with_calibration(tied_export, capsys):
    root, _ = tied_export
    assert main(["quantize", str(root / "fp32"), "-o", str(root / "awq"), "--calibration-tokens", "256",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "15 weight MatMuls in int4 (block 32, awq, calibrated)" in out and "shared with the lm_head" in out
    assert main(["quantize", str(root / "fp32"), "-o", str(root / "awq")]) == 2  # exists: typed, nothing changed


def test_builder_fp32_build_quantises_to_the_builders_int4_bytes(tied_hf, tmp_path):
    """The genai builder's tied fp32 model (the table a Transpose of the lm_head weight) becomes the builder's own
    int4 layout: the table stored once in int4, the same bytes as the builder's int4 build."""
    pytest.importorskip("onnxruntime_genai")
    from lestd_export.genai import run_builder
    from lestd_export.inspect import inspect_model
    from lestd_export.onnx_input.quantize import quantize_onnx

    run_builder(tied_hf, tmp_path / "fp32", "fp32")
    run_builder(tied_hf, tmp_path / "int4", "int4")
    report = quantize_onnx(tmp_path / "fp32", tmp_path / "ours", QuantizeConfig(), calibration="none",
                           progress=False)
    assert report["token_table"] == ["int4, shared with the lm_head"]
    ours, builder = (inspect_model(str(tmp_path / name)) for name in ("ours", "int4"))
    assert ours.totals()["lm_head"] == builder.totals()["lm_head"] == 0  # the tied head reads the table's codes
    assert abs(ours.total_bytes - builder.total_bytes) <= 0.01 * builder.total_bytes  # the same weight bytes


def test_input_scaling_folds_exactly_into_the_normalisation(tied_export):
    """Dividing the normalisation's scale by s and multiplying the rows of the weights it feeds by s leaves the
    fp32 model unchanged (the activation-aware scaling is a free symmetry, DESIGN.md 2.6)."""
    from onnx import numpy_helper

    from lestd_export.onnx_input import open_onnx_input
    from lestd_export.onnx_input.capture import capture_grams
    from lestd_export.quantize_graph import scale_inputs

    root, _ = tied_export
    source = open_onnx_input(root / "fp32")
    ids = np.random.default_rng(2).integers(3, 120, size=(2, 16))

    before = prefill_logits(source, source.model, ids)
    matmuls = [m for m in weight_matmuls(source.model) if m.op_type == "MatMul"]  # not the tied head
    grams = capture_grams(source, [m.input[0] for m in matmuls], ids, progress=False)
    initializers = {init.name: init for init in source.model.graph.initializer}
    scales = scale_inputs(source.model, matmuls, grams, QuantizeConfig(), initializers, powers=(1.0,))
    assert scales  # layer 0's Q/K/V input at least (this export shares the random model's all-ones norm weights
    # between layers by other means, which the fold leaves alone)
    for node in matmuls:
        if node.input[0] in scales:
            init = initializers[node.input[1]]
            w = numpy_helper.to_array(init) * scales[node.input[0]][:, None].astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    after = prefill_logits(source, source.model, ids)
    assert np.abs(after - before).max() < 1e-4 * np.abs(before).max()


def test_a_model_that_fails_at_run_time_is_a_one_line_error(tied_hf, tmp_path, capsys):
    """The genai builder's tied int4 embedding at a block that does not divide the width loads but fails at run
    time: eval says so in one line (no traceback)."""
    pytest.importorskip("onnxruntime_genai")
    from lestd_export.genai import run_builder

    run_builder(tied_hf, tmp_path / "broken", "int4", extra_options={"int4_block_size": "128"})
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 60)
    assert main(["eval", str(tmp_path / "broken"), "--text-file", str(tmp_path / "text.txt"), "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lestd-export eval: error:")
    assert "fails running it" in err


def test_dense_genai_export_uses_our_rounding(tied_hf, tmp_path, capsys):
    """`export --dense --format genai --quantize int4` is the builder's fp32 graph with our calibrated rounding (the
    genai runtime generates from it); the builder's rounding at a block that does not divide a tied table's width
    (the builder's broken shared embedding) is a typed one-line error that writes nothing."""
    pytest.importorskip("onnxruntime_genai")
    import json

    out = tmp_path / "genai-int4"
    assert main(["export", str(tied_hf), "--dense", "--format", "genai", "--quantize", "int4",
                 "-o", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["quantization"]["rounding"] == "awq" and report["quantization"]["calibrated"]
    assert report["quantization"]["token_table"][0].startswith("int4, shared with the lm_head")
    assert report["runtime"]  # onnxruntime-genai loaded it and generated
    capsys.readouterr()
    assert main(["export", str(tied_hf), "--dense", "--format", "genai", "--quantize", "int4",
                 "--rounding", "rtn", "--block-size", "128", "-o", str(tmp_path / "broken")]) == 2
    assert "does not divide the hidden size 64" in capsys.readouterr().err and not (tmp_path / "broken").exists()


def test_cli_calibrates_lestd_and_svd_by_default():
    """`--method svd` without --calibration is SVD-LLM (issue 18, item 6: data-free SVD at 0.5 is a broken model)."""
    from lestd_export.cli import build_parser
    from lestd_export.commands.common import config_from_args

    parser = build_parser()
    for method, expected in (("lestd", "default"), ("svd", "default"), ("tensorllm", "none")):
        args = parser.parse_args(["compress", "-o", "out", "--method", method])
        assert config_from_args(args).calibration == expected
    args = parser.parse_args(["compress", "-o", "out", "--method", "svd", "--calibration", "none"])
    assert config_from_args(args).calibration == "none"


def test_scaled_tied_table_still_looks_up_the_same_rows(tied_export, monkeypatch):
    """With the tied lm_head's input scaled (forced here), the table's lookup is multiplied back by 1/s: at 8 bits
    the quantised model stays as close to fp32 as without scaling (a missing 1/s would scale every embedding)."""
    import lestd_export.quantize_graph as quantize_graph
    from lestd_export.onnx_input import open_onnx_input
    from lestd_export.onnx_input.capture import capture_grams

    monkeypatch.setattr(quantize_graph, "SCALE_POWERS", (1.0,))
    root, _ = tied_export
    source = open_onnx_input(root / "fp32")
    ids = np.random.default_rng(3).integers(3, 120, size=(2, 16))

    before = prefill_logits(source, source.model, ids)
    grams = capture_grams(source, [m.input[0] for m in weight_matmuls(source.model)], ids, progress=False)
    report = quantize_graph.quantize_graph(source.model, QuantizeConfig(bits=8, accuracy_level=0), grams,
                                           progress=False)
    assert report["token_table"] == ["int8, shared with the lm_head (input-scaled)"]
    after = prefill_logits(source, source.model, ids)
    # this random model at 8 bits: 5% unscaled, 6.6% scaled; a lookup left at E diag(s) (no 1/s): 85%
    assert np.abs(after - before).max() < 0.15 * np.abs(before).max()


@pytest.mark.parametrize("break_it", [None, "fold", "table"])
def test_a_file_must_compute_with_the_values_it_stores(tied_export, monkeypatch, break_it):
    """The stored-value gate: the quantised graph (fp32 arithmetic) equals the fp32 graph holding the values it
    stores, to fp32 rounding, with input scaling folded and the tied table shared; a graph fault (the norm's fold
    dropped, the table's 1/s dropped) is a typed error."""
    import lestd_export.quantize_graph as quantize_graph
    from lestd_export.errors import ExportValidationError
    from lestd_export.onnx_input import open_onnx_input
    from lestd_export.onnx_input.quantized import quantize_calibrated

    monkeypatch.setattr(quantize_graph, "SCALE_POWERS", (1.0,))  # force input scaling (tied head included)
    if break_it == "fold":  # the normalisation keeps its scale: the file computes with x, not x / s
        import copy

        scale_inputs = quantize_graph.scale_inputs

        def unfolded(model, matmuls, grams, config, initializers, *rest):
            return scale_inputs(copy.deepcopy(model), matmuls, grams, config, copy.deepcopy(initializers), *rest)

        monkeypatch.setattr(quantize_graph, "scale_inputs", unfolded)
    root, _ = tied_export
    source = open_onnx_input(root / "fp32")
    if break_it == "table":  # the lookup forgets the 1/s of the scaled tied head
        original = quantize_graph._quantized_table

        def no_unscale(*args):
            nodes, storage, extra = original(*args)
            if nodes[-1].op_type == "Mul":
                nodes[-2].output[0] = nodes[-1].output[0]
                nodes = nodes[:-1]
            return nodes, storage, extra

        monkeypatch.setattr(quantize_graph, "_quantized_table", no_unscale)
    ids = np.random.default_rng(5).integers(3, 120, size=(4, 32))
    config = QuantizeConfig(bits=8)
    if break_it is None:
        report = quantize_calibrated(source, config, ids, progress=False)
        assert report["scaled_inputs"] > 0 and report["token_table"] == ["int8, shared with the lm_head (input-scaled)"]
        assert report["stored_values"]["max_relative_logit_difference"] < 1e-5
    else:
        with pytest.raises(ExportValidationError, match="does not compute with the values it stores"):
            quantize_calibrated(source, config, ids, progress=False)


def test_a_block_wider_than_the_table_stores_the_tied_table_at_a_block_that_fits(tied_export, tmp_path):
    """Block 128 on a width-64 tied table: the table and its lm_head at block 64 (GatherBlockQuantized needs whole
    blocks; the builder's shared table fails at run time there), every other weight at 128; the file computes with
    the values it stores and runs."""
    from lestd_export.onnx_input.quantize import quantize_onnx

    root, _ = tied_export
    report = quantize_onnx(root / "fp32", tmp_path / "q", QuantizeConfig(block_size=128), calibration_tokens=256,
                           progress=False)
    assert report["token_table"] == ["int4, shared with the lm_head"]
    assert report["stored_values"]["max_relative_logit_difference"] < 1e-5
    blocks = {node.name: next(a.i for a in node.attribute if a.name == "block_size")
              for node in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node
              if node.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert {b for name, b in blocks.items() if "lm_head" in name or "Gather" in name} == {64}
    assert {b for name, b in blocks.items() if "lm_head" not in name and "Gather" not in name} == {128}


def test_head_bits_store_the_shared_table_and_lm_head_in_int8(tied_export, tmp_path):
    """--head-bits 8: the tied table and its lm_head in int8 (one copy, GatherBlockQuantized bits 8), the rest
    int4; it computes with the values it stores, and is closer to fp32 than int4 everywhere."""
    from lestd_export.onnx_input import open_onnx_input
    from lestd_export.onnx_input.quantize import quantize_onnx

    root, _ = tied_export
    reports = {bits: quantize_onnx(root / "fp32", tmp_path / f"head{bits}", QuantizeConfig(head_bits=bits),
                                   calibration_tokens=256, progress=False) for bits in (4, 8)}
    assert reports[8]["token_table"] == ["int8, shared with the lm_head"]
    assert reports[8]["stored_values"]["max_relative_logit_difference"] < 1e-5
    bits = {node.name: next(a.i for a in node.attribute if a.name == "bits")
            for node in onnx.load(str(tmp_path / "head8" / "model.onnx")).graph.node
            if node.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert {b for name, b in bits.items() if "lm_head" in name or "Gather" in name} == {8}
    assert {b for name, b in bits.items() if "lm_head" not in name and "Gather" not in name} == {4}
    extra = reports[8]["output"]["model_bytes"] - reports[4]["output"]["model_bytes"]
    assert extra == 128 * 64 // 2  # one more half byte per table entry, stored once
    source = open_onnx_input(root / "fp32")
    ids = np.random.default_rng(2).integers(3, 120, size=(2, 16))
    reference = prefill_logits(source, source.model, ids)
    errors = {}
    for b in (4, 8):
        model = onnx.load(str(tmp_path / f"head{b}" / "model.onnx"))
        errors[b] = np.abs(prefill_logits(source, model, ids) - reference).max()
    assert errors[8] < errors[4]


def test_an_export_failing_the_stored_value_check_leaves_nothing(tied_export, tmp_path, monkeypatch, capsys):
    """A quantised file that does not compute with its stored values (here: a fold forced to be dropped) is a typed
    one-line error and nothing is written; --no-validate writes it and says it was not checked."""
    import copy

    import lestd_export.quantize_graph as quantize_graph

    scale_inputs = quantize_graph.scale_inputs
    monkeypatch.setattr(quantize_graph, "SCALE_POWERS", (1.0,))
    monkeypatch.setattr(quantize_graph, "scale_inputs", lambda model, matmuls, grams, config, initializers, *rest:
                        scale_inputs(copy.deepcopy(model), matmuls, grams, config, copy.deepcopy(initializers), *rest))
    root, _ = tied_export
    args = ["quantize", str(root / "fp32"), "--calibration-tokens", "256", "--quiet", "-o"]
    assert main(args + [str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "does not compute with the values it stores" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".*"))
    assert main(args + [str(tmp_path / "kept"), "--no-validate"]) == 0
    assert "stored values: not checked (--no-validate)" in capsys.readouterr().out


def test_new_initializers_never_take_an_existing_name(tied_export):
    """A graph another quantiser touched may already hold ``<weight>_Q4`` (ONNX Runtime's name for its packed
    weights): ours get other names, so no initializer is defined twice."""
    from onnx import numpy_helper

    from lestd_export.onnx_input import open_onnx_input
    from lestd_export.quantize_graph import quantize_graph

    root, _ = tied_export
    model = open_onnx_input(root / "fp32").model
    taken = [f"{node.input[1]}_Q4" for node in weight_matmuls(model)]
    model.graph.initializer.extend(numpy_helper.from_array(np.zeros(3, np.float32), name) for name in taken)
    quantize_graph(model, QuantizeConfig(rounding="rtn"), progress=False)
    names = [init.name for init in model.graph.initializer]
    assert len(names) == len(set(names)) and set(taken) <= set(names)


def test_onnx_input_at_full_size_quantises_without_compressing(tied_export, tmp_path, capsys):
    """`lestd-export MODEL.onnx --size-fraction 1.0 --quantize int4` is `quantize` (the same file); without
    --quantize it is a typed error (nothing to do)."""
    root, _ = tied_export
    common = ["--calibration-tokens", "256", "--quiet"]
    assert main([str(root / "fp32"), "-o", str(tmp_path / "via-compress"), "--size-fraction", "1.0",
                 "--quantize", "int4", *common]) == 0
    assert "computes with the values it stores" in capsys.readouterr().out
    assert main(["quantize", str(root / "fp32"), "-o", str(tmp_path / "via-quantize"), *common]) == 0
    data = [(tmp_path / name / "model.onnx").read_bytes() for name in ("via-compress", "via-quantize")]
    assert data[0] == data[1]
    assert main([str(root / "fp32"), "-o", str(tmp_path / "nothing"), "--size-fraction", "1.0"]) == 2
    assert "leaves the model as it is" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
