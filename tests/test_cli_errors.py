"""Bad input: a typed error, a non-zero exit code, a message that says what to do, nothing left behind."""

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from lestd_export.cli import main
from lestd_export.config import CompressionConfig
from lestd_export.errors import InvalidConfigError
from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(path)
    return path


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def assert_refused(tmp_path, capsys, args, *fragments):
    out = tmp_path / "out"
    code, err = run_cli(["compress", *args, "-o", str(out), "--quiet"], capsys)
    assert code == 2
    for fragment in fragments:
        assert fragment in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left


def test_missing_path(tmp_path, capsys):
    assert_refused(tmp_path, capsys, [str(tmp_path / "nowhere" / "model")], "no such file or directory")


def test_unknown_alias(tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["no-such-alias"], "unknown model alias", "smollm2-135m")


def test_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(path)
    assert_refused(tmp_path, capsys, [str(path)], "'bloom' is not supported", "llama")


@pytest.mark.parametrize("fraction", ["0", "-0.5", "1.5", "nan"])
def test_size_fraction_out_of_range(tmp_path, capsys, tiny_dir, fraction):
    assert_refused(tmp_path, capsys, [str(tiny_dir), "--size-fraction", fraction], "size fraction must lie in (0, 1]")


@pytest.mark.parametrize("ranks, fragment", [("65,8", "R1=65 exceeds"), ("full,25", "R2=25 exceeds")])
def test_ranks_above_dimensions(tmp_path, capsys, tiny_dir, ranks, fragment):
    assert_refused(tmp_path, capsys, [str(tiny_dir), "--ranks", ranks], fragment)


def test_nan_weights(tmp_path, capsys):
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan-model"
    model.save_pretrained(path)
    assert_refused(tmp_path, capsys, [str(path)], "layer 1 v-projection has NaN/Inf weights")


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys, tiny_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(["compress", str(tiny_dir), "-o", str(out), "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_conflicting_settings_are_typed_errors():
    with pytest.raises(InvalidConfigError, match="conflicts"):
        CompressionConfig(ranks=(8, 8), core_density=0.5, size_fraction=0.5)
    with pytest.raises(InvalidConfigError, match="unknown method"):
        CompressionConfig(method="pca")


def test_compress_cli_writes_checkpoint_and_report(tmp_path, capsys, tiny_dir):
    import json

    out = tmp_path / "ckpt"
    code, _ = run_cli(["compress", str(tiny_dir), "-o", str(out), "--size-fraction", "0.6", "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "compression_report.json").read_text())
    for key in ("method", "size_fraction", "ranks", "density", "relative_weight_error", "params", "seconds"):
        assert key in report
    assert set(report["size_fraction"]) == {"requested", "values_only", "with_indices"}
    assert 0.594 <= report["size_fraction"]["with_indices"] <= 0.6
    assert report["params"]["stored"] == round(report["size_fraction"]["with_indices"]
                                               * report["params"]["dense_attention"])
    assert len(report["relative_weight_error"]["per_layer"]) == 2
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}
