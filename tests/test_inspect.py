"""`lestd-export inspect`: every stored byte of a model, checkpoint or ONNX build lands in one weight group kind,
and the totals are the file's own."""

import json

import numpy as np
import onnx
import pytest

from lestd_export.cli import main
from lestd_export.inspect import inspect_model
from lestd_export.registry import GROUP_KINDS, spec_for
from lestd_export.weights import torch_weight_map
from tiny import TINY_CONFIGS, tiny_model

LAYER_KINDS = ("attention.qkv", "attention.o", "mlp.in", "mlp.out")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """A tiny Llama as a Hugging Face directory, a compressed checkpoint, an optimum export, genai fp32 and int4
    builds and a LeSTD graft into the genai build."""
    pytest.importorskip("onnxruntime_genai")
    from lestd_export.export import export_model
    from lestd_export.genai import run_builder
    from lestd_export.loading import LoadedModel, load_tokenizer
    from test_cli_errors import word_tokenizer
    from test_onnx_input import tiny_llama

    root = tmp_path_factory.mktemp("inspect")
    tiny_llama().save_pretrained(root / "hf")
    word_tokenizer().save_pretrained(root / "hf")
    run_builder(root / "hf", root / "genai", "fp32")
    run_builder(root / "hf", root / "genai-int4", "int4")
    export_model(LoadedModel(tiny_llama(), load_tokenizer(root / "hf"), "tiny"), root / "optimum", validate=False)
    flags = ["--size-fraction", "0.8", "--calibration", "none", "--quiet"]
    assert main(["compress", str(root / "hf"), "-o", str(root / "ckpt"), *flags]) == 0
    assert main([str(root / "genai"), "-o", str(root / "genai-lestd"), *flags, "--quantize", "int4"]) == 0
    return root


def onnx_initializer_bytes(directory):
    model = onnx.load(str(directory / "model.onnx"))  # with its external data: the stored tensors themselves
    return sum(onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer)


def safetensors_bytes(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "np") as f:
        return sum(f.get_tensor(name).nbytes for name in f.keys())


@pytest.mark.parametrize("name, fmt, storage", [
    ("genai", "onnxruntime-genai", "fp32"), ("genai-int4", "onnxruntime-genai", "int4 MatMulNBits block 32"),
    ("optimum", "optimum", "fp32"), ("genai-lestd", "onnxruntime-genai", "int4 MatMulNBits block 32")])
def test_onnx_totals_are_the_files_initializer_bytes(builds, name, fmt, storage):
    found = inspect_model(str(builds / name))
    assert found.format == fmt and found.architecture == "llama" and found.layers == 2
    assert found.total_bytes == pytest.approx(onnx_initializer_bytes(builds / name), rel=0.005)
    assert sum(found.totals().values()) == found.total_bytes
    sites = {kind: [s for s in found.sites if s.kind == kind] for kind in GROUP_KINDS}
    for kind in LAYER_KINDS:  # every layer of every kind is found
        assert sorted({s.layer for s in sites[kind]}) == [0, 1], kind
    assert len(sites["embedding"]) == len(sites["lm_head"]) == 1
    assert any(storage in s for s in found.storages()["mlp.in"])
    compressed = any("lestd" in s for kind in ("attention.qkv", "attention.o") for s in found.storages()[kind])
    assert compressed == (name == "genai-lestd")


@pytest.mark.parametrize("name, fmt", [("hf", "pytorch"), ("ckpt", "compressed checkpoint")])
def test_pytorch_totals_are_the_checkpoint_bytes(builds, name, fmt):
    found = inspect_model(str(builds / name))
    assert found.format == fmt and found.architecture == "llama"
    assert found.total_bytes == pytest.approx(safetensors_bytes(builds / name), rel=0.005)
    storage = found.storages()
    assert (storage["attention.qkv"] == ["lestd (compressed)"]) == (name == "ckpt")
    assert storage["mlp.in"] == ["fp32"]


def test_cli_prints_the_table_and_json(builds, capsys):
    assert main(["inspect", str(builds / "genai-int4")]) == 0
    table = capsys.readouterr().out
    assert "mlp.in" in table and "int4 MatMulNBits block 32" in table
    assert main(["inspect", str(builds / "optimum"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["bytes"]) == {*GROUP_KINDS, "other"} and record["total_bytes"] == sum(record["bytes"].values())


def test_anything_else_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("lestd-export inspect: error:") for line in err)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_architecture_maps_every_weight_group(name):
    """The registry's weight groups name real modules in every architecture, and every parameter is counted once."""
    model = tiny_model(name)
    found = torch_weight_map(model)
    layers = model.config.num_hidden_layers
    for kind in LAYER_KINDS:
        assert sorted({s.layer for s in found.sites if s.kind == kind}) == list(range(layers)), (name, kind)
    assert any(s.kind == "embedding" for s in found.sites)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head = [s for s in found.sites if s.kind == "lm_head"]
    assert len(head) == 1 and (head[0].bytes == 0) == tied  # a tied head is stored (and counted) once
    unique = {p.data_ptr(): p for p in model.state_dict().values()}
    assert found.total_bytes == sum(p.numel() * p.element_size() for p in unique.values())
    spec = spec_for(model.config)
    assert [g.kind for g in spec.weight_groups()] == list(GROUP_KINDS)


@pytest.mark.parametrize("name", ["opt", "phi3", "gptj"])
def test_optimum_exports_are_mapped_by_the_registrys_module_paths(name, tmp_path):
    """One description serves both sides: optimum names nodes by module path (OPT without the leading model/),
    so the ONNX input finds attention by name and inspect finds every group, for other architectures too."""
    from lestd_export.export import export_model
    from lestd_export.hf import LoadedModel
    from lestd_export.onnx_input import open_onnx_input
    from test_cli_errors import word_tokenizer

    export_model(LoadedModel(tiny_model(name), word_tokenizer(), name), tmp_path / name, validate=False)
    assert open_onnx_input(tmp_path / name).producer == "optimum"
    found = inspect_model(str(tmp_path / name))
    for kind in LAYER_KINDS:
        assert sorted({s.layer for s in found.sites if s.kind == kind}) == [0, 1], kind
    assert found.total_bytes == pytest.approx(onnx_initializer_bytes(tmp_path / name), rel=0.005)


def test_pytorch_precision_names_the_dtype():
    import torch

    assert torch_weight_map(tiny_model("llama-gqa", dtype=torch.bfloat16)).precision == "bf16"
    assert torch_weight_map(tiny_model("llama-gqa")).precision == "fp32"
