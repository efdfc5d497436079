"""``compress --modules mlp``: every MLP weight as low-rank factors (the input members sharing one basis), exact at
full rank, at the requested fraction, stored entry for entry as counted, and ONNX Runtime equal to PyTorch in every
format (optimum fp32 for every registered architecture; genai and the quantised layouts by graft)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.errors import InvalidConfigError
from lestd_export.export import export_model
from lestd_export.healing import stored_parameters
from lestd_export.loading import LoadedModel
from lestd_export.modules import FactoredLinear
from lestd_export.numerics.lowrank import svd_layers
from lestd_export.registry import decoder_layers, optimum_node_pattern, spec_for
from lestd_export.surgery import balanced_factors, install_mlp, read_mlp
from tiny import TINY_CONFIGS, assert_rewrite_keeps_logits, reloaded_exactly, tiny_model

NAMES = sorted(TINY_CONFIGS)
MLP = CompressionConfig(modules=("mlp",), mlp_fraction=0.6)


@pytest.mark.parametrize("name", NAMES)
def test_full_rank_factors_reproduce_the_model(name):
    """Rung 1: at full rank the factored MLP (shared input basis, balanced factors) computes the dense one."""
    model = tiny_model(name)
    spec = spec_for(model.config)
    layers = decoder_layers(model, spec)

    def factor(model):
        weights = [read_mlp(layer, spec, i) for i, layer in enumerate(layers)]
        factors = svd_layers([[w.inputs, w.output] for w in weights], 1.0, rank=10**6)
        for layer, w, (inputs, output) in zip(layers, weights, factors):
            install_mlp(layer, spec, (inputs.a, inputs.b), (output.a, output.b), w, torch.float32)

    assert_rewrite_keeps_logits(model, factor)
    assert all(isinstance(layers[0].get_submodule(p), FactoredLinear) for p in (*spec.mlp_in, spec.mlp_out))


def test_balanced_factors_keep_the_product_and_equalise_the_norms():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)) * np.arange(1, 6), rng.normal(size=(5, 9)) / np.arange(1, 6)[:, None]
    c, d = balanced_factors(a, b)
    np.testing.assert_allclose(c @ d, a @ b, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(c, axis=0), np.linalg.norm(d, axis=1), rtol=1e-12)


def mlp_weight_entries(graph, spec) -> int:
    """Entries of the distinct 2-D initializers the MLP's weight nodes read (a shared basis once)."""
    import re

    patterns = [re.compile(optimum_node_pattern(spec, p)) for p in (*spec.mlp_in, spec.mlp_out)]
    initializers = {i.name: i for i in graph.initializer}
    read = {name for node in graph.node if any(p.match(node.name) for p in patterns)
            for name in node.input if name in initializers and len(initializers[name].dims) == 2}
    return sum(int(np.prod(initializers[name].dims)) for name in read)


@pytest.mark.parametrize("name", NAMES)
def test_ort_equals_pytorch_with_the_mlp_compressed(tmp_path, name):
    """Rung 4, every architecture: the optimum export of a model whose MLP is factored (attention dense) equals
    PyTorch through prefill and cached decode, and stores exactly the factor entries the report counts."""
    model = tiny_model(name)
    report = compress_model(model, MLP, progress=False)
    mlp = report["mlp"]
    assert 0.5 <= mlp["fraction"]["stored"] <= 0.6  # the budget as requested (ranks are whole)
    assert report["size_fraction"]["with_indices"] == 1.0  # attention untouched
    export = export_model(LoadedModel(model, None, name), tmp_path / name)
    assert export["parity"]["max_relative_error"] < 1e-4 and export["parity"]["greedy_tokens_equal"]
    graph = onnx.load(str(tmp_path / name / "model.onnx")).graph
    assert mlp_weight_entries(graph, spec_for(model.config)) == mlp["params"]["stored"]


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "phi3"])
def test_checkpoint_with_attention_and_mlp_reloads_exactly(tmp_path, name):
    model = tiny_model(name)
    config = CompressionConfig(modules=("attention", "mlp"), size_fraction=0.6, mlp_fraction=0.5)
    reloaded = reloaded_exactly(model, compress_model(model, config, progress=False), tmp_path)
    spec = spec_for(model.config)
    layer = decoder_layers(reloaded, spec)[0]
    members = [layer.get_submodule(p) for p in spec.mlp_in]
    assert all(m.basis is members[0].basis for m in members)  # the shared basis stays one tensor


def test_healing_trains_every_factor_and_a_shared_basis_once():
    model = tiny_model("llama-gqa")
    compress_model(model, MLP, progress=False)
    params = stored_parameters(model)
    spec = spec_for(model.config)
    factored = [m for m in model.modules() if isinstance(m, FactoredLinear)]
    expected = {id(p) for m in factored for p in (m.basis.weight, m.expand.weight)}
    assert {id(p) for p in params} == expected and len(params) == len(expected)
    assert len(params) == len(decoder_layers(model, spec)) * (len(spec.mlp_in) + 1 + 2)  # 1 shared basis + down's 2


def test_calibrated_mlp_is_whitened_and_loses_less_output_error():
    """SVD-LLM: with calibration the truncation minimises the output error, so at the same fraction the
    calibration-weighted error of the MLP's output is lower than the plain SVD's."""
    from lestd_export.calibration import CalibrationData, collect_mlp_statistics

    sequences = np.random.default_rng(0).integers(3, 128, size=(4, 32))
    data = CalibrationData(source="test", sequences=sequences, seconds=0.0)
    errors = {}
    for calibrated in (False, True):
        model = tiny_model("llama-gqa")
        spec = spec_for(model.config)
        grams = collect_mlp_statistics(model, spec, data, progress=False)
        dense = [read_mlp(layer, spec, i) for i, layer in enumerate(decoder_layers(model, spec))]
        from lestd_export.compress import compress_mlp

        compress_mlp(model, MLP, spec, dense, grams if calibrated else None, progress=False)
        errors[calibrated] = 0.0
        for layer, w, (x_gram, _) in zip(decoder_layers(model, spec), dense, grams):
            member = layer.get_submodule(spec.mlp_in[0])
            product = (member.expand.weight @ member.basis.weight).T.double().numpy()  # [d, n_0]
            e = w.inputs[:, :w.widths[0]] - product
            errors[calibrated] += float(np.einsum("kn,kn->", e, x_gram @ e))
    assert errors[True] < errors[False]


def test_mlp_settings_are_validated():
    with pytest.raises(InvalidConfigError, match="modules"):
        CompressionConfig(modules=("mlp", "ffn"))
    with pytest.raises(InvalidConfigError, match="add mlp"):
        CompressionConfig(mlp_fraction=0.5)
    with pytest.raises(InvalidConfigError, match="size-fraction"):
        CompressionConfig(modules=("mlp",), size_fraction=0.5)
    with pytest.raises(InvalidConfigError, match="mlp-fraction"):
        CompressionConfig(modules=("mlp",), mlp_fraction=0.0)
    config = CompressionConfig(modules=("mlp", "attention"))
    assert config.modules == ("attention", "mlp") and config.mlp_fraction == 0.9
    assert CompressionConfig.from_dict(config.to_dict()) == config


def test_cli_refuses_misplaced_mlp_flags(tmp_path, capsys):
    from lestd_export.cli import main

    assert main(["compress", "-o", str(tmp_path / "out"), "--modules", "mlp", "--size-fraction", "0.5"]) == 2
    assert "size-fraction" in capsys.readouterr().err
    assert main(["compress", "-o", str(tmp_path / "out"), "--modules", "ffn"]) == 2
    assert "modules" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_onnx_input_refuses_the_mlp_module():
    from lestd_export.onnx_input.plan import check_config

    with pytest.raises(InvalidConfigError, match="target-mb"):
        check_config(CompressionConfig(modules=("attention", "mlp")))


TT_NAMES = ["llama-gqa", "phi3", "gpt2", "opt", "gptj"]  # SwiGLU, fused gate_up, Conv1D, fc1/fc2 on the layer, GPT-J


@pytest.mark.parametrize("name", TT_NAMES)
def test_full_rank_tt_cores_reproduce_the_model(name):
    """Rung 1 for ``--mlp-method tt``: two-core TT-matrices at full rank (no sparse part) compute the dense MLP."""
    from lestd_export.numerics.tt import TTWeight, balanced_modes, tt_matrix
    from lestd_export.surgery import install_mlp_tt, mlp_members

    model = tiny_model(name)
    spec = spec_for(model.config)

    def cores(model):
        for i, layer in enumerate(decoder_layers(model, spec)):
            weights = read_mlp(layer, spec, i)
            factors = {}
            for path, w in mlp_members(weights, spec).items():
                modes = balanced_modes(w.shape[0], 2), balanced_modes(w.shape[1], 2)
                factors[path] = TTWeight(tt_matrix(w, *modes, [10**6]), *modes, np.zeros(0, dtype=np.int32),
                                         np.zeros(0), 0.0, 0.0)
            install_mlp_tt(layer, spec, factors, weights, torch.float32)

    assert_rewrite_keeps_logits(model, cores)


def stored_factor_entries(graph, model) -> int:
    """Entries of the initializers holding a compressed MLP module's parameters or sparse indices (either layout)."""
    from onnx import numpy_helper

    from lestd_export.modules import TTLinear

    arrays = [t.detach().numpy() for m in model.modules() if isinstance(m, TTLinear)
              for t in (m.first.weight, m.second.weight, m.sparse_values, m.sparse_index) if t.numel()]
    found = 0
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if any(value.shape == a.shape and np.array_equal(value, a) or value.ndim == 2 and value.shape == a.T.shape
               and np.array_equal(value, a.T) for a in arrays):
            found += value.size
    return found


@pytest.mark.parametrize("method", ["tt", "saten"])
@pytest.mark.parametrize("name", TT_NAMES)
def test_ort_equals_pytorch_with_a_tt_mlp(tmp_path, name, method):
    """Rung 4: the optimum export of a TT (or Saten) MLP equals PyTorch through prefill and cached decode, stores the
    entries the report counts (a sparse entry as its value and one int32 index), within the requested fraction."""
    model = tiny_model(name)
    mlp = compress_model(model, CompressionConfig(modules=("mlp",), mlp_fraction=0.6, mlp_method=method),
                         progress=False)["mlp"]
    assert mlp["method"] == method and 0.5 <= mlp["fraction"]["stored"] <= 0.6
    assert all(n > 0 for layer in mlp["sparse"] for n in layer) == (method == "saten")
    export = export_model(LoadedModel(model, None, name), tmp_path / name)
    assert export["parity"]["max_relative_error"] < 1e-4 and export["parity"]["greedy_tokens_equal"]
    graph = onnx.load(str(tmp_path / name / "model.onnx")).graph
    assert stored_factor_entries(graph, model) == mlp["params"]["stored"]


def test_tt_checkpoint_reloads_exactly_and_heals_its_cores(tmp_path):
    from lestd_export.modules import TTLinear

    model = tiny_model("llama-gqa")
    config = CompressionConfig(modules=("mlp",), mlp_fraction=0.6, mlp_method="saten")
    reloaded = reloaded_exactly(model, compress_model(model, config, progress=False), tmp_path)
    modules = [m for m in reloaded.modules() if isinstance(m, TTLinear)]
    assert len(modules) == 2 * 3 and len(stored_parameters(reloaded)) == 3 * len(modules)  # two cores, the values
    from lestd_export.weights import torch_weight_map

    assert {s.storage for s in torch_weight_map(reloaded).sites if s.kind.startswith("mlp")} == {"tt cores"}


def test_mlp_method_needs_the_mlp():
    with pytest.raises(InvalidConfigError, match="add mlp"):
        CompressionConfig(mlp_method="tt")
    with pytest.raises(InvalidConfigError, match="MLP method"):
        CompressionConfig(modules=("mlp",), mlp_method="cp")
