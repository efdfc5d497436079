"""A whole-file byte target (`quantize --target-mb`, issue 19): every weight's own storage or low-rank factors.

Ladder: SVD-LLM factors are exact at full rank and their truncation error is the discarded whitened energy; 2-bit
codes pack and unpack exactly; the choice is the exact optimum wherever the byte price is a Lagrangian one, and
never exceeds the budget; the planner's bytes are what the file stores, weight for weight; a file with factored
weights computes with the values it stores; bad requests are typed errors.
"""

import itertools
import json

import numpy as np
import onnx
import pytest

from lestd_export.cli import main
from lestd_export.errors import InvalidConfigError
from lestd_export.numerics.budget import StorageOption, choose_options, low_rank_factors, storage_options
from lestd_export.numerics.quantize import pack_matmulnbits, stored_bytes, unpack_matmulnbits
from lestd_export.quantize_graph import QuantizeConfig


def skewed_gram(k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) * np.exp(rng.standard_normal(k))
    return x.T @ x / len(x)


def test_low_rank_factors_are_exact_at_full_rank_and_lose_the_discarded_whitened_energy():
    from lestd_export.numerics.metric import cholesky_factor

    rng = np.random.default_rng(1)
    weight, gram = rng.standard_normal((24, 40)), skewed_gram(24)
    a, b = low_rank_factors(weight, gram, 24)
    np.testing.assert_allclose(a @ b, weight, atol=1e-9)
    lower = cholesky_factor(gram, 0.01)
    sigma = np.linalg.svd(lower.T @ weight, compute_uv=False)
    a, b = low_rank_factors(weight, gram, 10)
    error = lower.T @ (weight - a @ b)  # in the damped metric the factors minimise
    assert np.sum(error**2) == pytest.approx(np.sum(sigma[10:] ** 2), rel=1e-9)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_and_unpack_exactly_and_take_the_counted_bytes(bits):
    rng = np.random.default_rng(bits)
    k, n, block = 80, 6, 32  # K not a multiple of the block: padded
    q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(k, n)).astype(np.float64)
    scales = (rng.random((3, n)) + 0.5).astype(np.float32).astype(np.float64)  # stored as float32
    data, flat = pack_matmulnbits(q, scales, bits, block)
    assert data.nbytes + flat.nbytes == stored_bytes(k, n, bits, block)
    expected = (np.concatenate([q, np.zeros((16, n))]).reshape(3, block, n) * scales[:, None]).reshape(-1, n)[:k]
    np.testing.assert_array_equal(unpack_matmulnbits(data, flat, k, bits, block), expected)


def random_options(rng, weights=4, per_weight=4):
    options = []
    for _ in range(weights):
        sizes = np.sort(rng.integers(10, 200, size=per_weight))
        errors = np.sort(rng.random(per_weight))[::-1] * rng.random() * 10  # larger: smaller error
        options.append([StorageOption(4, 32, None, int(s), float(e)) for s, e in zip(sizes, errors)])
    return options


def best_by_enumeration(options, budget):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in options]):
        size = sum(o[j].bytes for o, j in zip(options, choice))
        error = sum(o[j].error for o, j in zip(options, choice))
        if size <= budget and (best is None or error < best):
            best = error
    return best


def test_the_choice_is_the_optimum_and_fits_every_budget():
    """Exact (enumeration) on a one-byte grid; on a coarse grid it still fits and beats every uniform choice
    that fits with a grid unit to spare."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        options = random_options(rng)
        for budget in rng.integers(sum(o[0].bytes for o in options), sum(o[-1].bytes for o in options), size=5):
            choice = choose_options(options, int(budget))
            assert sum(o[j].bytes for o, j in zip(options, choice)) <= budget
            assert sum(o[j].error for o, j in zip(options, choice)) == pytest.approx(best_by_enumeration(options,
                                                                                                         budget))
            coarse = choose_options(options, int(budget), resolution=16)  # units of budget / 16 bytes
            assert sum(o[j].bytes for o, j in zip(options, coarse)) <= budget
            unit = -(-int(budget) // 16)
            uniform = [sum(o[j].error for o in options) for j in range(4)
                       if sum(o[j].bytes for o in options) <= budget - len(options) * unit]
            assert sum(o[j].error for o, j in zip(options, coarse)) <= min(uniform, default=np.inf) + 1e-12
    with pytest.raises(ValueError, match="exceeds the budget"):
        choose_options(options, sum(o[0].bytes for o in options) - 1)


def test_storage_options_count_bytes_and_rank_their_errors():
    rng = np.random.default_rng(5)
    spectrum = 0.93 ** np.arange(64)  # a decaying spectrum, as trained weights have: truncation is what costs
    weight = (rng.standard_normal((128, 64)) * spectrum) @ rng.standard_normal((64, 192)) / 8
    gram = skewed_gram(128, 6)
    options = storage_options(weight, gram, ((2, 32), (4, 32), (4, 64), (8, 32)))
    quantized = {(o.bits, o.block_size): o for o in options if o.rank is None}
    assert quantized[(4, 32)].bytes == 192 * 4 * (16 + 4) and quantized[(4, 64)].bytes == 192 * 2 * (32 + 4)
    assert quantized[(8, 32)].error < quantized[(4, 32)].error < quantized[(4, 64)].error < quantized[(2, 32)].error
    factored = [o for o in options if o.rank is not None]
    assert factored and all(o.bytes < quantized[(4, 32)].bytes for o in factored)
    assert [o.rank for o in factored] == sorted(o.rank for o in factored)
    assert all(a.error > b.error for a, b in zip(factored, factored[1:]))  # more rank, less error


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    """A tiny tied Llama exported by optimum (fp32) and its weights' bytes at int4 block 32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lestd_export.export import export_model
    from lestd_export.hf import LoadedModel
    from test_cli_errors import word_tokenizer
    from tiny import COMMON

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "tie_word_embeddings": True, "intermediate_size": 256}, num_key_value_heads=2)
    config._attn_implementation = "eager"  # an MLP wide enough for rank-32 factors to be smaller than int4
    root = tmp_path_factory.mktemp("budget")
    export_model(LoadedModel(AutoModelForCausalLM.from_config(config).eval(), word_tokenizer(), "tiny"),
                 root / "fp32", validate=False)
    return root


def packed_bytes(model) -> dict[str, int]:
    """Bytes of each MatMulNBits node's packed weight and scales, by node name."""
    from lestd_export.export import initializer_sizes

    sizes = initializer_sizes(model)
    return {node.name: sizes[node.input[1]] + sizes[node.input[2]] for node in model.graph.node
            if node.op_type == "MatMulNBits"}


def test_planned_bytes_are_the_stored_bytes_weight_for_weight(tiny_fp32):
    from lestd_export.onnx_input.budget import BudgetRequest
    from lestd_export.onnx_input.quantize import quantize_onnx

    uniform = quantize_onnx(tiny_fp32 / "fp32", tiny_fp32 / "int4", QuantizeConfig(), calibration_tokens=256,
                            progress=False)
    graph = quantize_onnx(tiny_fp32 / "fp32", tiny_fp32 / "large", QuantizeConfig(), calibration_tokens=256,
                          progress=False, budget=BudgetRequest(10**7))["budget"]["graph_bytes"]
    target = int(0.85 * uniform["output"]["model_bytes"]) + graph // 2  # the tiny graph weighs more than its weights
    report = quantize_onnx(tiny_fp32 / "fp32", tiny_fp32 / "plan", QuantizeConfig(), calibration_tokens=256,
                           progress=False, budget=BudgetRequest(target))
    plan = report["budget"]
    int4_weights = sum(packed_bytes(onnx.load(str(tiny_fp32 / "int4" / "model.onnx"))).values())
    assert sum(w["bytes"] for w in plan["weights"]) < int4_weights  # below uniform int4: the plan had to choose
    assert plan["planned_bytes"] <= target and report["output"]["model_bytes"] <= target
    # every tensor as planned (the lookup's shape and 1/s reserved), but for the copies awq makes of a norm scale that
    # two groups share (4 d bytes each), or the reserved 1/s where no scaling was chosen
    extra = plan["stored_bytes"] - (plan["planned_bytes"] - plan["graph_bytes"])
    assert extra % (4 * 64) == 0 and -4 * 64 <= extra <= 2 * 4 * 64
    written = packed_bytes(onnx.load(str(tiny_fp32 / "plan" / "model.onnx")))
    for weight in plan["weights"]:
        nodes = [n for n in written if n.startswith(weight["node"] + "_Q") or n.startswith(weight["node"] + "/")]
        assert sum(written[n] for n in nodes) == weight["bytes"], weight["node"]
    assert sum(w["bytes"] for w in plan["weights"]) == sum(written.values())
    assert report["stored_values"]["max_relative_logit_difference"] < 1e-5


def force_low_rank_mlp(monkeypatch) -> None:
    """Make every whole-file plan put each MLP weight on its smallest low-rank option (where it has one)."""
    from lestd_export.onnx_input import quantized

    chosen = quantized.plan_budget

    def factor_the_mlp(*args, **kwargs):
        plan = chosen(*args, **kwargs)
        for w in plan.weights:
            ranks = [j for j, o in enumerate(w.options) if o.rank is not None]
            if w.kind.startswith("mlp") and ranks:
                w.chosen = ranks[0]
        return plan

    monkeypatch.setattr(quantized, "plan_budget", factor_the_mlp)


def test_a_file_with_low_rank_factors_computes_with_the_values_it_stores(tiny_fp32, monkeypatch):
    """Force every MLP weight onto its smallest low-rank option: the graph gains two MatMulNBits per factored
    weight, the stored-value check (fp32 graph with the factors' stored values) passes, and bytes still match."""
    from lestd_export.onnx_input import budget as budget_module
    from lestd_export.onnx_input.quantize import quantize_onnx

    force_low_rank_mlp(monkeypatch)
    report = quantize_onnx(tiny_fp32 / "fp32", tiny_fp32 / "factored", QuantizeConfig(), calibration_tokens=256,
                           progress=False, budget=budget_module.BudgetRequest(10**7))
    plan = report["budget"]
    assert plan["factored"] == 6  # gate, up, down of both layers
    assert report["stored_values"]["max_relative_logit_difference"] < 1e-5
    written = packed_bytes(onnx.load(str(tiny_fp32 / "factored" / "model.onnx")))
    assert len(written) == report["weight_matmuls"] == 2 * 7 + 1 + 6
    assert sum(w["bytes"] for w in plan["weights"]) == sum(written.values())


def test_impossible_targets_and_flags_are_typed_errors(tiny_fp32, capsys):
    out = str(tiny_fp32 / "never")
    assert main(["quantize", str(tiny_fp32 / "fp32"), "-o", out, "--target-mb", "0.001", "--quiet",
                 "--calibration-tokens", "256"]) == 2
    assert "below the smallest file" in capsys.readouterr().err
    assert main(["quantize", str(tiny_fp32 / "fp32"), "-o", out, "--no-low-rank", "--quiet"]) == 2
    assert main(["quantize", str(tiny_fp32 / "fp32"), "-o", out, "--target-mb", "1", "--calibration", "none",
                 "--quiet"]) == 2
    assert not (tiny_fp32 / "never").exists()
    with pytest.raises(InvalidConfigError):
        QuantizeConfig(bits=3)


def test_loss_prices_are_a_price_of_output_error_that_does_not_depend_on_the_probe_size(tiny_fp32):
    """The KL per unit of output error is positive for every weight and, the KL being quadratic in small errors, the
    same for a quarter of a rounding error and for half of it (four times the output error), within 25%."""
    from lestd_export.config import CompressionConfig
    from lestd_export.numerics.budget import estimate_codes, output_error
    from lestd_export.onnx_input import open_onnx_input
    from lestd_export.onnx_input.capture import capture_grams, load_onnx_calibration
    from lestd_export.onnx_input.sensitivity import loss_prices
    from lestd_export.quantize_graph import weight_of, weight_matmuls

    source = open_onnx_input(tiny_fp32 / "fp32")
    data = load_onnx_calibration(source, CompressionConfig(calibration="default", calibration_tokens=256))
    matmuls = {m.input[1]: m for m in weight_matmuls(source.model)}
    grams = capture_grams(source, [m.input[0] for m in matmuls.values()], data.sequences, progress=False)
    initializers = {init.name: init for init in source.model.graph.initializer}

    def probes(name):
        node = matmuls[name]
        weight, gram = weight_of(node, initializers), grams[node.input[0]]
        error = estimate_codes(weight, 4, 64, gram) - weight
        for label, scale in (("once", 0.25), ("twice", 0.5)):
            values = weight + scale * error
            yield label, values.T if node.op_type == "FusedMatMul" else values, output_error(weight, values, gram)

    prices = loss_prices(source, list(matmuls), probes, data.sequences, progress=False)
    assert len(prices) == 2 * len(matmuls) and all(p > 0 for p in prices.values())
    ratios = np.array([prices[(n, "twice")] / prices[(n, "once")] for n in matmuls])
    assert np.all(np.abs(ratios - 1) < 0.25), ratios


def test_a_cache_of_weighed_options_serves_every_target_of_the_same_model(tiny_fp32, tmp_path, monkeypatch):
    """The options and prices do not depend on the target: measured once into --plan-cache, reused for a second
    target (no new measurement) and for a quantisation-only plan; a plan for the same target is the same."""
    from lestd_export.onnx_input import quantized
    from lestd_export.onnx_input.budget import BudgetRequest
    from lestd_export.onnx_input.quantize import quantize_onnx

    calls = []
    measured = quantized.loss_prices
    monkeypatch.setattr(quantized, "loss_prices", lambda *a, **k: calls.append(1) or measured(*a, **k))
    cache = str(tmp_path / "options.json")
    reports = [quantize_onnx(tiny_fp32 / "fp32", tmp_path / name, QuantizeConfig(), calibration_tokens=256,
                             progress=False, validate=False, budget=BudgetRequest(target, low_rank, cache))
               for name, target, low_rank in (("a", 10**6, True), ("b", 10**6, True), ("c", 10**6, False))]
    assert len(calls) == 1
    assert [w["storage"] for w in reports[0]["budget"]["weights"]] == [w["storage"] for w in
                                                                      reports[1]["budget"]["weights"]]
    assert reports[2]["budget"]["factored"] == 0
    (tmp_path / "options.json").write_text("{not json")  # a damaged cache is measured again, not an error
    quantize_onnx(tiny_fp32 / "fp32", tmp_path / "d", QuantizeConfig(), calibration_tokens=256, progress=False,
                  validate=False, budget=BudgetRequest(10**6, True, cache))
    assert len(calls) == 2 and json.loads((tmp_path / "options.json").read_text())["key"]["low_rank"]


@pytest.mark.parametrize("name", sorted(__import__("tiny").TINY_CONFIGS))
def test_every_architecture_runs_with_its_mlp_as_low_rank_factors(tmp_path, name, monkeypatch):
    """Each registered architecture's MLP (SwiGLU gate/up/down, a fused gate_up_proj, GELU c_fc/fc1/fc_in), found
    by the registry's node names in its optimum export, stored as int4 low-rank factors: the file computes with the
    values it stores (the stored-value check against the fp32 graph holding them)."""
    from lestd_export.export import export_model
    from lestd_export.hf import LoadedModel
    from lestd_export.onnx_input import open_onnx_input, quantized
    from lestd_export.onnx_input.budget import BudgetRequest
    from tiny import tiny_model

    export_model(LoadedModel(tiny_model(name), None, name), tmp_path / "fp32", validate=False)
    monkeypatch.setattr("lestd_export.numerics.budget.LOW_RANK_FRACTIONS", (0.95,))  # rank 32 of the tiny MLP
    force_low_rank_mlp(monkeypatch)
    source = open_onnx_input(tmp_path / "fp32", attention=False)  # as quantize opens it
    ids = np.random.default_rng(0).integers(3, 100, size=(4, 64))
    report = quantized.quantize_calibrated(source, QuantizeConfig(), ids, progress=False,
                                           budget=BudgetRequest(10**8))
    mlp = [w for w in report["budget"]["weights"] if w["kind"].startswith("mlp")]
    assert len(mlp) in (2 * 2, 2 * 3) and all(w["rank"] == 32 for w in mlp)  # every MLP weight of both layers
    assert report["stored_values"]["max_relative_logit_difference"] < 1e-4
