"""ONNX in: `lestd-export MODEL.onnx -o DIR` compresses the attention of an existing decoder graph.

One tiny Llama (GQA, head dim 16: GroupQueryAttention's CPU kernel needs a multiple of 16) as an
onnxruntime-genai fp32 build (packed qkv_proj and separate q/k/v), an int4 build, and the repo's own
dense optimum export. Ladder: sites and weights equal the PyTorch model's, calibration statistics
through ONNX Runtime equal the PyTorch hooks', full ranks reproduce the input's logits, a pruned graft
equals PyTorch with the same cores installed, and bad inputs are one-line errors that write nothing.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from lestd_export.cli import build_parser, main
from lestd_export.config import CompressionConfig
from lestd_export.onnx_input import (compress_onnx, decoder_feed, load_onnx_calibration, open_onnx_input, plan_cores,
                                     read_weights, collect_onnx_statistics)
from lestd_export.onnx_sites import (GraphMappingError, NotADecoderError, QuantisedGraphError, locate_by_name,
                                     locate_by_structure)
from tiny import COMMON, assert_same_greedy

EXACT = ["--ranks", "full,full", "--core-density", "1", "--calibration-tokens", "256", "--quiet"]
INPUTS = ("genai", "genai-separate", "optimum")
TOKENS = 256


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**COMMON, num_key_value_heads=2)  # head_dim 64 / 4 = 16
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny Llama's Hugging Face directory and its ONNX builds (made once per module)."""
    pytest.importorskip("onnxruntime_genai")
    from lestd_export.export import export_model
    from lestd_export.genai import run_builder
    from lestd_export.loading import LoadedModel, load_tokenizer
    from test_cli_errors import word_tokenizer

    root = tmp_path_factory.mktemp("onnx-input")
    tiny_llama().save_pretrained(root / "hf")
    word_tokenizer().save_pretrained(root / "hf")
    run_builder(root / "hf", root / "genai", "fp32")
    run_builder(root / "hf", root / "genai-separate", "fp32", extra_options={"disable_qkv_fusion": "true"})
    run_builder(root / "hf", root / "genai-int4", "int4")
    export_model(LoadedModel(tiny_llama(), load_tokenizer(root / "hf"), "tiny"), root / "optimum", validate=False)
    assert main([str(root / "genai"), "-o", str(root / "genai-lestd"), "--size-fraction", "0.8", "--calibration",
                 "none", "--quiet"]) == 0
    return root


def torch_model(models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models / "hf", attn_implementation="eager").eval()


def logits(directory, ids, source):
    import onnxruntime as ort

    session = ort.InferenceSession(str(directory / source.model_file.name), providers=["CPUExecutionProvider"])
    return session.run(["logits"], decoder_feed(session, source.io, source.shape, ids, source.genai_decoder))[0]


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name]


# ----------------------------------------------------------------------------------- sites, weights


@pytest.mark.parametrize("kind", INPUTS)
def test_sites_and_weights_are_the_models(models, kind):
    from lestd_export.registry import attention_shape, spec_for
    from lestd_export.surgery import read_attention

    source = open_onnx_input(models / kind)
    assert source.producer == ("optimum" if kind == "optimum" else "onnxruntime-genai")
    assert [s.packed for s in source.sites] == [kind == "genai"] * 2
    assert (source.shape.hidden, source.shape.heads, source.shape.kv_heads, source.shape.head_dim) == (64, 4, 2, 16)
    assert locate_by_structure(source.model, source.io, source.shape) == locate_by_name(source.model)[1]
    model = torch_model(models)
    spec, shape = spec_for(model.config), attention_shape(model.config)
    for i, weights in enumerate(read_weights(source)):
        reference = read_attention(model.model.layers[i].self_attn, spec, shape, i)
        for name in "qkvo":
            np.testing.assert_array_equal(weights.matrices[name], reference.matrices[name])
        np.testing.assert_array_equal(weights.slice_tensor(shape), reference.slice_tensor(shape))


def test_structure_finds_renamed_projections(models, tmp_path):
    """Node names that match no producer's rules: the structural rule finds the same sites."""
    graph = onnx.load(str(models / "optimum" / "model.onnx"))
    for i, node in enumerate(graph.graph.node):
        node.name = f"n{i}"
    directory = tmp_path / "renamed"
    directory.mkdir()
    onnx.save(graph, str(directory / "model.onnx"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(models / "optimum" / name, directory / name)
    source = open_onnx_input(directory)
    assert source.producer == "structure" and len(source.sites) == 2
    original = open_onnx_input(models / "optimum")
    assert [s.qkv_input for s in source.sites] == [s.qkv_input for s in original.sites]
    assert [s.o_output for s in source.sites] == [s.o_output for s in original.sites]
    assert main([str(directory), "-o", str(tmp_path / "out"), *EXACT]) == 0


# -------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("kind", ["genai", "optimum"])
def test_onnxruntime_statistics_equal_pytorch_hooks(models, kind):
    from lestd_export.calibration import collect_statistics
    from lestd_export.registry import attention_shape, spec_for

    source = open_onnx_input(models / kind)
    data = load_onnx_calibration(source, CompressionConfig(calibration="default", calibration_tokens=TOKENS))
    assert data.tokens == TOKENS
    captured = collect_onnx_statistics(source, data, progress=False)
    model = torch_model(models)
    reference = collect_statistics(model, spec_for(model.config), attention_shape(model.config), data,
                                   gradients=False, progress=False)
    for ours, theirs in zip(captured, reference):
        assert ours.tokens == theirs.tokens == TOKENS
        for a, b in ((ours.x_gram, theirs.x_gram), (ours.h_gram, theirs.h_gram)):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


# ----------------------------------------------------------------------------------- compress + graft


@pytest.mark.parametrize("kind", INPUTS)
def test_full_rank_reproduces_the_input_logits(models, tmp_path, kind):
    out = tmp_path / "out"
    assert main([str(models / kind / "model.onnx" if kind == "optimum" else models / kind), "-o", str(out),
                 *EXACT]) == 0
    source = open_onnx_input(models / kind)
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 12))
    assert np.abs(logits(out, ids, source) - logits(models / kind, ids, source)).max() < 1e-4
    report = json.loads((out / "compression_report.json").read_text())
    assert report["input"]["producer"] == source.producer and report["ranks"] == [[64, 16], [64, 16]]
    assert report["calibration"]["tokens"] == TOKENS and report["refit"].startswith("layer by layer")
    assert report["vs_input"]["max_abs_logit_difference"] < 1e-4 and report["vs_input"]["top1_agreement"] == 1.0
    expected = {"genai_config.json"} if kind.startswith("genai") else {"config.json", "generation_config.json"}
    assert expected | {"tokenizer.json", "model.onnx", "compression_report.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "export_report.json").exists()  # the input's report would describe another model
    assert (out / "model.onnx.data").is_file() == kind.startswith("genai")  # external data as the input had it
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the data file is as readable as the files copied beside it
    names = {n.name for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert not any(name in names for site in source.sites for name in (*site.qkv_nodes, site.o_node))


def test_svd_at_full_rank_reproduces_the_input_logits(models, tmp_path):
    out = tmp_path / "svd"
    assert main([str(models / "genai"), "-o", str(out), "--method", "svd", "--ranks", "full", "--calibration", "none",
                 "--quiet"]) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["method"] == "svd" and report["vs_input"]["max_abs_logit_difference"] < 1e-4


@pytest.mark.parametrize("kind", ["genai", "optimum"])
def test_pruned_graft_equals_pytorch_with_the_same_cores(models, tmp_path, kind):
    from lestd_export.registry import spec_for
    from lestd_export.surgery import install_core_attention

    config = CompressionConfig(size_fraction=0.6, calibration="default", calibration_tokens=TOKENS)
    source = open_onnx_input(models / kind)
    cores, *_ = plan_cores(source, config, progress=False)
    assert any(g.rows is not None for core in cores for g in core.groups.values())  # rows really pruned
    model = torch_model(models)
    for layer, core in zip(model.model.layers, cores):
        install_core_attention(layer, spec_for(model.config), core, dict.fromkeys("qkvo"), torch.float32, {})
    report = compress_onnx(models / kind, tmp_path / "out", config, progress=False)
    assert report["size_fraction"]["requested"] == 0.6
    assert 0.55 <= report["size_fraction"]["with_indices"] <= 0.6  # within one allocation step (a row: d + values)
    ids = np.random.default_rng(2).integers(0, 128, size=(2, 12))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits(tmp_path / "out", ids, source) - expected).max() < 1e-4


@pytest.mark.parametrize("kind, target, dense_output, method, stubs, storage", [
    ("genai", "layer", False, "lestd", False, "fp32"), ("optimum", "layer", False, "lestd", False, "fp32"),
    ("genai", "model", False, "lestd", True, "fp32"), ("optimum", "model", True, "lestd", True, "fp32"),
    ("genai", "layer", False, "tensorllm", False, "fp32"), ("genai-separate", None, False, "svd", True, "fp32"),
    ("genai", "layer", False, "lestd", False, "int4")])  # int4: Q/K/V's U1 rounded to its grid before the refit
def test_onnx_input_equals_compress_on_the_pytorch_model(models, tmp_path, monkeypatch, kind, target, dense_output,
                                                         method, stubs, storage):
    """Same statistics, plan and layer-by-layer refit as `compress` (in the plain layout the graft stores):
    the refit's output errors, the report's sizes and the resulting logits agree with the PyTorch model
    that compress_model rewrote. ``stubs``: every initializer of the ONNX Runtime subgraphs is a stub
    (as the large ones of a real model are), the grafted ones included."""
    import lestd_export.onnx_input.sessions as onnx_input
    from lestd_export.compress import compress_model
    from lestd_export.loading import load_model

    if stubs:
        monkeypatch.setattr(onnx_input, "STUB_BYTES", 0)

    config = CompressionConfig(method=method, size_fraction=0.6, calibration="default", calibration_tokens=TOKENS,
                               refit_target=target or "layer", layout="plain", dense_output=dense_output,
                               input_whitening=1.0 if dense_output else 0.5,  # the plain layout's defaults,
                               storage=storage)  # explicit: an ONNX input's default is 0
    loaded = load_model(str(models / "hf"))
    expected = compress_model(loaded.model, config, tokenizer=loaded.tokenizer, progress=False)
    report = compress_onnx(models / kind, tmp_path / "out", config, progress=False)
    assert report["ranks"] == expected["ranks"] and report["params"] == expected["params"]
    assert report["size_fraction"] == expected["size_fraction"]
    assert report["relative_weight_error"]["overall"] == pytest.approx(expected["relative_weight_error"]["overall"],
                                                                       rel=1e-3)
    if method == "svd":  # no refit: the whitened truncation as compress computes it
        assert report["refit"] is None and "relative_output_error" not in report["calibration"]
    else:
        assert report["refit"] == f"layer by layer through onnxruntime (target: {target})"
    for ours, theirs in zip(report["calibration"].get("relative_output_error", []),
                            expected["calibration"].get("relative_output_error", [])):
        assert set(ours) == set(theirs) == set("qkv" if dense_output else "qkvo")
        for group in theirs:
            for when in ("before", "after"):
                assert ours[group][when] == pytest.approx(theirs[group][when], abs=1e-4)
    ids = np.random.default_rng(3).integers(0, 128, size=(2, 12))
    with torch.no_grad():
        reference = loaded.model(torch.from_numpy(ids)).logits.numpy()
    source = open_onnx_input(models / kind)
    if storage != "fp32":  # the written model is MatMulNBits throughout: the refit errors above were the check
        return
    # 5e-4: this refit model is itself that sensitive to fp32 rounding (PyTorch fp32 vs float64: 1.2e-4)
    assert np.abs(logits(tmp_path / "out", ids, source) - reference).max() < 5e-4 * np.abs(reference).max()


def test_int4_quantises_every_weight_matmul(models, tmp_path):
    out = tmp_path / "int4"
    assert main([str(models / "genai"), "-o", str(out), "--size-fraction", "0.8", "--calibration", "none",
                 "--quantize", "int4", "--quiet"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 2 * 2 + 2 * 3 + 1  # attention, MLP, lm_head
    report = json.loads((out / "compression_report.json").read_text())
    assert report["output"]["quantize"]["bits"] == 4 and np.isfinite(report["vs_input"]["max_abs_logit_difference"])


def test_cli_shorthand_and_help(models, capsys):
    from lestd_export.cli import expand_shorthand, verbs

    known = verbs(build_parser())
    assert "compress-onnx" in known
    assert expand_shorthand([str(models / "genai"), "-o", "x"], known)[0] == "compress-onnx"
    assert expand_shorthand([str(models / "optimum" / "model.onnx")], known)[0] == "compress-onnx"
    assert expand_shorthand(["compress", str(models / "hf")], known)[0] == "compress"
    assert expand_shorthand([str(models / "hf")], known) == [str(models / "hf")]  # a Hugging Face dir: no verb
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "MODEL.onnx" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- bad inputs


def not_a_decoder(directory):
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir()
    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph), str(directory / "model.onnx"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4,
                                                       "num_attention_heads": 1}))
    return directory


def without_config(models, directory):
    directory.mkdir()
    shutil.copy(models / "optimum" / "model.onnx", directory / "model.onnx")
    return directory


def unmappable(models, directory):
    """The optimum export with the output projection's weight behind an Identity: no weight to read."""
    from onnx import helper

    shutil.copytree(models / "optimum", directory)
    graph = onnx.load(str(directory / "model.onnx"))
    node = next(n for n in graph.graph.node if n.name == "/model/layers.0/self_attn/o_proj/MatMul")
    graph.graph.node.insert(0, helper.make_node("Identity", [node.input[1]], ["hidden_weight"], name="hide"))
    node.input[1] = "hidden_weight"
    onnx.save(graph, str(directory / "model.onnx"))
    return directory


@pytest.mark.parametrize("case", ["not-a-decoder", "quantised", "missing-config", "unmappable", "no-onnx",
                                  "missing-file", "already-compressed", "fisher", "heal"])
def test_bad_inputs_are_one_line_errors_that_write_nothing(models, tmp_path, capsys, case):
    inputs = {
        "not-a-decoder": lambda: not_a_decoder(tmp_path / "mlp"),
        "quantised": lambda: models / "genai-int4",
        "missing-config": lambda: without_config(models, tmp_path / "bare"),
        "unmappable": lambda: unmappable(models, tmp_path / "hidden"),
        "no-onnx": lambda: models / "hf",
        "missing-file": lambda: tmp_path / "absent.onnx",
        "already-compressed": lambda: models / "genai-lestd",
        "fisher": lambda: models / "genai",
        "heal": lambda: models / "genai",
    }
    flags = {"fisher": ["--objective", "fisher"], "heal": ["--heal"]}.get(case, [])
    out = tmp_path / "result"
    code = main(["compress-onnx", str(inputs[case]()), "-o", str(out), "--quiet", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lestd-export compress-onnx: error: ")
    assert not out.exists() and not leftovers(tmp_path, "result")
    expected = {"not-a-decoder": "not a decoder", "quantised": "already quantised", "missing-config": "config.json",
                "unmappable": "2-D initializer", "no-onnx": "no .onnx model", "missing-file": "does not exist",
                "already-compressed": "already compressed by lestd-export",
                "fisher": "fisher objective", "heal": "--heal"}[case]
    assert expected in err[0]


def test_error_types(models, tmp_path):
    with pytest.raises(QuantisedGraphError):
        open_onnx_input(models / "genai-int4")
    with pytest.raises(NotADecoderError):
        open_onnx_input(not_a_decoder(tmp_path / "mlp"))
    with pytest.raises(GraphMappingError):
        open_onnx_input(unmappable(models, tmp_path / "hidden"))


def test_graph_that_cannot_be_cut_falls_back_to_the_dense_refit(models, tmp_path, monkeypatch):
    import lestd_export.onnx_input.plan as onnx_input

    def refuse(*args, **kwargs):
        raise GraphMappingError("cannot be replayed layer by layer")

    monkeypatch.setattr(onnx_input, "LayerCuts", refuse)
    report = compress_onnx(models / "genai", tmp_path / "out", CompressionConfig(
        ranks=(None, None), core_density=1.0, calibration="default", calibration_tokens=TOKENS), progress=False)
    assert report["refit"] == "dense activations (cannot be replayed layer by layer)"
    assert report["vs_input"]["max_abs_logit_difference"] < 1e-4
    errors = report["calibration"]["relative_output_error"]
    assert all(e[g]["after"] <= e[g]["before"] + 1e-12 for e in errors for g in "qkvo")


def test_outputs_generate_in_their_runtimes_like_pytorch(models, tmp_path):
    """The compressed genai build generates in onnxruntime-genai's loop and the compressed optimum export in
    optimum's ORTModelForCausalLM (prefill + cached decode), greedily, as PyTorch with the same cores does."""
    import onnxruntime_genai as og
    from optimum.onnxruntime import ORTModelForCausalLM

    from lestd_export.registry import spec_for
    from lestd_export.surgery import install_core_attention

    config = CompressionConfig(size_fraction=0.7, calibration="default", calibration_tokens=TOKENS)
    for kind in ("genai", "optimum"):
        compress_onnx(models / kind, tmp_path / kind, config, progress=False)
    cores, *_ = plan_cores(open_onnx_input(models / "genai"), config, progress=False)
    model = torch_model(models)
    for layer, core in zip(model.model.layers, cores):
        install_core_attention(layer, spec_for(model.config), core, dict.fromkeys("qkvo"), torch.float32, {})
    prompt = torch.tensor([[5, 17, 42, 9, 77]])
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0].tolist()

    genai = og.Model(str(tmp_path / "genai"))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(expected), do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert_same_greedy([generator.get_sequence(0).tolist()], [expected], model)

    optimum = ORTModelForCausalLM.from_pretrained(tmp_path / "optimum")
    tokens = optimum.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
    assert_same_greedy(tokens, [expected], model)
