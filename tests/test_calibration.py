"""Data-aware LeSTD: whitened error identities, refit optimality, exactness with calibration, typed source errors."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from lestd_export.calibration import (CalibrationError, default_text as calibration_text, load_calibration,
                                      read_text_file)
from lestd_export.cli import main
from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.errors import InvalidConfigError
from lestd_export.numerics.metric import LayerMetric, cholesky_factor, layer_metric
from lestd_export.numerics.planner import TuckerRequest, compress_layers, reconstruct_layer, slice_weights
from lestd_export.numerics.pruning import SliceGroups
from lestd_export.numerics.refit import refit_input_group, refit_output_group
from tiny import VOCAB, tiny_model

GROUPS = SliceGroups(("q", "k", "v", "o"), (4, 2, 2, 4))
D, DH = 24, 8


def random_gram(rng, n, tokens=200):
    x = rng.standard_normal((tokens, n)) * np.linspace(3.0, 0.1, n)  # anisotropic, like activations
    return x.T @ x / tokens, x


def layer_setup(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((GROUPS.total, D, DH)) * np.array([6.0] * 6 + [0.5] * 2 + [0.7] * 4)[:, None, None]
    x_gram, _ = random_gram(rng, D)
    h_gram, _ = random_gram(rng, 4 * DH)
    return w, layer_metric(x_gram, h_gram, GROUPS.sizes, DH, damping=1e-3)


@pytest.mark.parametrize("objective", ["frobenius", "balanced"])
@pytest.mark.parametrize("fraction", [0.7, 0.4])
def test_whitened_closed_form_identity(objective, fraction):
    """In the metric's norm ``sum_s w_s^2 ||A (W_s - What_s) B_s||^2 = E' - ||G'_kept||^2`` (to 1e-8)."""
    w, metric = layer_setup()
    (layer,) = compress_layers([w], GROUPS, TuckerRequest(size_fraction=fraction, objective=objective), metrics=[metric])
    residual = metric.apply(w - reconstruct_layer(layer, GROUPS))
    weights = slice_weights(metric.apply(w), GROUPS, objective)
    direct = float(np.sum((residual * weights[:, None, None]) ** 2))
    assert layer.weighted_squared_error == pytest.approx(direct, rel=1e-8)
    assert 0 < layer.weighted_squared_error < layer.weighted_energy
    # the plain-norm error is what the stored factors reconstruct
    assert layer.squared_error == pytest.approx(float(np.sum((w - reconstruct_layer(layer, GROUPS)) ** 2)), rel=1e-8)


def test_whitened_full_rank_is_exact():
    w, metric = layer_setup(1)
    (layer,) = compress_layers([w], GROUPS, TuckerRequest(ranks=(None, None), core_density=1.0), metrics=[metric])
    np.testing.assert_allclose(reconstruct_layer(layer, GROUPS), w, atol=1e-9)


def test_fisher_weights_make_the_identity_hold_in_loss_units():
    w, metric = layer_setup(2)
    sensitivity = {"q": 0.5, "k": 2.0, "v": 30.0, "o": 10.0}
    (layer,) = compress_layers([w], GROUPS, TuckerRequest(size_fraction=0.5, objective="fisher"), metrics=[metric],
                               sensitivities=[sensitivity])
    residual = metric.apply(w - reconstruct_layer(layer, GROUPS))
    direct = sum(sensitivity[n] * float(np.sum(residual[GROUPS.span(n)] ** 2)) for n in GROUPS.names)
    assert layer.weighted_squared_error == pytest.approx(direct, rel=1e-8)


def test_whitened_selection_lowers_the_output_error_it_targets():
    """At the same budget, the whitened plan has a lower output (metric) error than the data-free plan."""
    w, metric = layer_setup(3)
    request = TuckerRequest(size_fraction=0.5, objective="frobenius")
    (aware,) = compress_layers([w], GROUPS, request, metrics=[metric])
    (free,) = compress_layers([w], GROUPS, request)
    errors = [float(np.sum(metric.apply(w - reconstruct_layer(layer, GROUPS)) ** 2)) for layer in (aware, free)]
    assert errors[0] < errors[1]


def test_dense_output_whitens_the_qkv_inputs_by_default():
    """With the output projection dense, ``U1`` serves only the Q/K/V inputs: the default is full whitening
    (``p = 1``), whose plan has a lower Q/K/V output error ``||X (W - What)||`` than the unwhitened one."""
    assert CompressionConfig(dense_output=True).whitening_power == 1.0
    assert CompressionConfig().whitening_power == 0.0
    assert CompressionConfig(storage="int4").whitening_power == 0.5  # plain layout, factored output
    assert replace(CompressionConfig(), layout="plain").whitening_power == 0.5  # follows a later layout change
    assert CompressionConfig(dense_output=True, input_whitening=0.25).whitening_power == 0.25
    rng = np.random.default_rng(5)
    groups = SliceGroups(("q", "k", "v"), (4, 2, 2))
    w = rng.standard_normal((groups.total, D, DH))
    x_gram, x = random_gram(rng, D)
    request = TuckerRequest(size_fraction=0.4, objective="balanced")
    errors = []
    for power in (1.0, 0.0):
        metric = layer_metric(x_gram, None, (*groups.sizes, 0), DH, damping=1e-6, input_power=power)
        (layer,) = compress_layers([w], groups, request, metrics=[metric])
        errors.append(float(np.sum((x @ (w - reconstruct_layer(layer, groups))) ** 2)))
    assert errors[0] < 0.9 * errors[1]


def test_refit_input_group_is_the_least_squares_optimum():
    rng = np.random.default_rng(4)
    n, k, tokens = 2, 6, 300
    xd = rng.standard_normal((tokens, D))
    xc = xd + 0.1 * rng.standard_normal((tokens, D))  # inputs of the already-compressed model
    dense = rng.standard_normal((n, D, DH))
    basis = np.linalg.qr(rng.standard_normal((D, k)))[0]
    block = rng.standard_normal((n, k, DH))
    c = lambda a, b: a.T @ b / tokens  # noqa: E731
    result = refit_input_group(basis, np.eye(DH), block, dense, c(xc, xc), c(xc, xd), c(xd, xd), damping=0.0)

    def error(b):
        return sum(np.sum((xc @ basis @ b[s] - xd @ dense[s]) ** 2) for s in range(n)) / tokens

    assert result.error_before == pytest.approx(error(block), rel=1e-9)
    assert result.error_after == pytest.approx(error(result.block), rel=1e-9)
    assert result.error_after < result.error_before
    direct = np.linalg.lstsq(xc @ basis, np.concatenate([xd @ dense[s] for s in range(n)], axis=1), rcond=None)[0]
    np.testing.assert_allclose(result.block.transpose(1, 0, 2).reshape(k, -1), direct, atol=1e-8)


def test_refit_output_group_never_increases_the_error():
    rng = np.random.default_rng(5)
    h, k, tokens = 3, 5, 400
    hd = rng.standard_normal((tokens, h * DH))
    hc = hd + 0.2 * rng.standard_normal((tokens, h * DH))
    dense = rng.standard_normal((h, D, DH))  # O_i^T
    basis = rng.standard_normal((D, k))
    block = rng.standard_normal((h, k, DH))
    c = lambda a, b: a.T @ b / tokens  # noqa: E731
    w_o = dense.transpose(0, 2, 1).reshape(h * DH, D)

    def error(b):
        m = b.transpose(0, 2, 1).reshape(h * DH, k)
        return np.sum((hc @ m @ basis.T - hd @ w_o) ** 2) / tokens

    result = refit_output_group(basis, np.eye(DH), block, dense, c(hc, hc), c(hc, hd), c(hd, hd), damping=0.0)
    assert result.error_before == pytest.approx(error(block), rel=1e-9)
    assert result.error_after == pytest.approx(error(result.block), rel=1e-9)
    assert result.error_after < result.error_before
    # an optimal block cannot be improved: refitting it again keeps it
    again = refit_output_group(basis, np.eye(DH), result.block, dense, c(hc, hc), c(hc, hd), c(hd, hd), damping=0.0)
    assert again.error_after == pytest.approx(result.error_after, rel=1e-6)


def test_cholesky_factor_damps_a_singular_gram():
    x = np.random.default_rng(6).standard_normal((5, 12))  # fewer tokens than dimensions
    lower = cholesky_factor(x.T @ x, damping=1e-3)
    assert np.allclose(np.tril(lower), lower) and np.all(np.diag(lower) > 0)
    assert isinstance(LayerMetric(lower.T).basis(np.eye(12)[:, :3]), np.ndarray)


# ------------------------------------------------------------------------------------ tiny models

SELF = dict(calibration="self", calibration_tokens=256)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_full_ranks_with_calibration_and_refit_stay_exact(name):
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        report = compress_model(model, CompressionConfig(ranks=(None, None), core_density=1.0, **SELF),
                                progress=False)
        logits = model(ids).logits
    assert (logits - reference).norm() / reference.norm() < 1e-4
    assert report["calibration"]["tokens"] >= 128 and len(report["calibration"]["tokens_sha256"]) == 64


@pytest.mark.parametrize("objective", ["balanced", "fisher"])
def test_refit_never_increases_a_layers_calibration_output_error(objective):
    model = tiny_model("llama-gqa")
    report = compress_model(model, CompressionConfig(size_fraction=0.5, objective=objective, **SELF), progress=False)
    errors = report["calibration"]["relative_output_error"]
    assert len(errors) == model.config.num_hidden_layers
    for layer in errors:
        for group in ("q", "k", "v", "o"):
            assert layer[group]["after"] <= layer[group]["before"] + 1e-12
    assert any(layer[g]["after"] < layer[g]["before"] for layer in errors for g in layer)
    assert 0.495 <= report["size_fraction"]["with_indices"] <= 0.5


def test_calibrated_baselines_meet_the_budget():
    for method in ("tensorllm", "svd"):
        report = compress_model(tiny_model("qwen2"), CompressionConfig(method=method, size_fraction=0.6, **SELF),
                                progress=False)
        assert 0.55 <= report["size_fraction"]["with_indices"] <= 0.6
        assert report["calibration"]["source"].startswith("self")


def test_healing_updates_only_stored_values_and_is_deterministic():
    config = CompressionConfig(size_fraction=0.5, heal=True, heal_tokens=256, heal_steps=4, **SELF)
    results = []
    for _ in range(2):
        model = tiny_model("llama-gqa")
        norm_before = model.model.norm.weight.clone()
        report = compress_model(model, config, progress=False)
        assert torch.equal(model.model.norm.weight, norm_before)  # not a stored attention value: untouched
        results.append((report["healing"], model(torch.arange(8)[None]).logits))
    (first, logits_a), (second, logits_b) = results
    assert first["loss_after"] < first["loss_before"] and first["steps"] == 4
    assert first["loss_after"] == second["loss_after"] and torch.equal(logits_a, logits_b)


# ------------------------------------------------------------------------------------ sources


class FakeTokenizer:
    bos_token_id = 0

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_calibration_sources_give_typed_errors(tmp_path):
    model = tiny_model("llama-gqa")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    for source, words in [(str(empty), "empty"), (str(short), "only"), (str(binary), "not UTF-8 text"),
                          (str(tmp_path / "missing.txt"), "does not exist"), ("wikipedia", "unknown calibration")]:
        with pytest.raises(CalibrationError, match=words):
            load_calibration(source, model, FakeTokenizer())
    with pytest.raises(CalibrationError, match="at least"):
        load_calibration("default", model, FakeTokenizer(), tokens=10)
    with pytest.raises(InvalidConfigError, match="calibration"):
        CompressionConfig(heal=True)
    with pytest.raises(InvalidConfigError, match="fisher"):
        CompressionConfig(objective="fisher")


def test_wikitext2_offline_names_the_alternatives():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed: the offline message is not reachable without cutting the network")
    except ImportError:
        pass
    with pytest.raises(CalibrationError, match="--calibration default"):
        load_calibration("wikitext2", tiny_model("llama-gqa"), FakeTokenizer())


def test_text_file_calibration_uses_that_text(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("calibration text " * 100)
    data = load_calibration(str(text), tiny_model("llama-gqa"), FakeTokenizer(), tokens=256)
    assert data.tokens == 256 and data.source == str(text)
    assert read_text_file(text).startswith("calibration")


def test_cli_refuses_a_bad_calibration_source_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    tiny_dir = tmp_path / "tiny"
    tiny_model("llama-gqa").save_pretrained(tiny_dir)
    code = main(["compress", str(tiny_dir), "-o", str(out), "--calibration", str(binary), "--quiet"])
    assert code == 2 and not out.exists()
    assert "not UTF-8 text" in capsys.readouterr().err


def test_default_calibration_text_is_not_the_default_evaluation_text():
    from lestd_export.evaluate import default_text as evaluation_text

    calibration, evaluation = calibration_text(), evaluation_text()
    assert len(calibration) > 100_000
    # no 200-character span of the calibration text occurs in the evaluation text
    spans = {calibration[i:i + 200] for i in range(0, len(calibration) - 200, 97)}
    assert not any(span in evaluation for span in spans)


def test_healing_that_raises_the_loss_restores_the_starting_values():
    ids = torch.arange(8)[None]
    plain = tiny_model("llama-gqa")
    compress_model(plain, CompressionConfig(size_fraction=0.5, **SELF), progress=False)
    healed = tiny_model("llama-gqa")
    report = compress_model(healed, CompressionConfig(size_fraction=0.5, heal=True, heal_tokens=256, heal_steps=3,
                                                      heal_lr=50.0, **SELF), progress=False)  # diverges
    assert report["healing"]["kept"] is False and report["healing"]["loss_after"] >= report["healing"]["loss_before"]
    assert torch.allclose(healed(ids).logits, plain(ids).logits, atol=1e-6)
    assert report["healing"]["learning_rate"] == 50.0 and report["healing"]["device"] == "cpu"


def test_healing_device_is_chosen_or_refused():
    from lestd_export.errors import InvalidConfigError
    from lestd_export.healing import healing_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert healing_device("auto") == expected and healing_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfigError, match="heal-device cpu"):
            healing_device("cuda")
    with pytest.raises(InvalidConfigError, match="heal-lr"):
        CompressionConfig(heal_lr=0.0)
    with pytest.raises(InvalidConfigError, match="healing device"):
        CompressionConfig(heal_device="tpu")


def test_healing_batches_sequences_and_checks_on_held_out_ones():
    import copy

    from lestd_export.healing import HELD_OUT_SEQUENCES, heal

    model = tiny_model("llama-gqa")
    teacher = copy.deepcopy(model).eval()
    compress_model(model, CompressionConfig(size_fraction=0.5, **SELF), progress=False)
    sequences = np.random.default_rng(0).integers(0, VOCAB, size=(32, 16))  # [n, T]: 32 sequences of 16 tokens
    record = heal(model, teacher, sequences, 3, batch=2, progress=False)
    assert record["batch"] == 2 and record["steps"] == 3
    assert record["tokens"] == (32 - HELD_OUT_SEQUENCES) * 16 and "held-out" in record["loss"]
    assert record["passes"] == round(3 * 2 / (32 - HELD_OUT_SEQUENCES), 2)
    few = heal(model, teacher, sequences[:8], 1, batch=3, progress=False)  # too few to hold any out
    assert few["tokens"] == 8 * 16 and "first two healing sequences" in few["loss"]
    with pytest.raises(InvalidConfigError, match="heal-batch"):
        CompressionConfig(heal_batch=0)
