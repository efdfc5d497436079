"""The quality sweep: achieved budgets, resumable cache, outputs and CLI validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lestd_export import sweep as sw
from lestd_export.config import parse_choices
from lestd_export.errors import InvalidConfigError
from test_evaluate import SENTENCES, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-sweep")
    tiny_llama(seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(SENTENCES * 10))
    return path


def run_sweep(model, text, cache, **kwargs):
    settings = dict(fractions=(0.9, 0.5), methods=("lestd",), granularities=("row",), budgets=("layer",),
                    max_tokens=200, seq_len=32, cache_dir=cache, progress=False, text_file=text)
    settings.update(kwargs)
    return sw.sweep(str(model), **settings)


def test_achieved_fractions_meet_the_request(tiny_dir, text_file, tmp_path):
    fractions = (0.9, 0.7, 0.5)
    result = run_sweep(tiny_dir, text_file, tmp_path, fractions=fractions, methods=("lestd", "tensorllm", "svd"),
                       granularities=("row", "element"), budgets=("layer", "global"))
    assert len(result["rows"]) == (4 + 1 + 1) * len(fractions)
    assert result["dense_perplexity"] > 1 and result["tokens"] > 0
    for row in result["rows"]:
        assert set(sw.ROW_KEYS) <= set(row) and "error" not in row
        assert row["calibration"] == "none" and row["heal"] is False and "calibration_seconds" not in row
        f, achieved = row["requested_fraction"], row["size_fraction"]
        assert achieved <= f + 1e-12, row
        if row["method"] in ("lestd", "svd"):  # the planner meets the budget up to one allocation step
            assert achieved >= 0.99 * f, row
        else:  # tensorllm: a dense core only moves in whole rank steps
            assert achieved >= 0.8 * f, row
        assert 0 <= row["relative_weight_error"] < 1 and row["perplexity"] > 1
    lestd = [r for r in result["rows"] if r["method"] == "lestd"]
    assert {(r["granularity"], r["budget"]) for r in lestd} == {(g, b) for g in ("row", "element")
                                                                for b in ("layer", "global")}
    assert all(r["granularity"] is None and r["budget"] is None for r in result["rows"] if r["method"] != "lestd")


def test_interrupted_sweep_resumes_without_recomputing(tiny_dir, text_file, tmp_path, monkeypatch):
    calls = {"compress": [], "ppl": 0}
    real_compress, real_ppl = sw.compress_model, sw.torch_perplexity

    def counting_compress(model, config, **kwargs):
        calls["compress"].append((config.method, config.size_fraction))
        return real_compress(model, config, **kwargs)

    def counting_ppl(*args, **kwargs):
        calls["ppl"] += 1
        return real_ppl(*args, **kwargs)

    monkeypatch.setattr(sw, "compress_model", counting_compress)
    monkeypatch.setattr(sw, "torch_perplexity", counting_ppl)
    first = run_sweep(tiny_dir, text_file, tmp_path, methods=("lestd", "svd"))
    assert len(calls["compress"]) == 4 and calls["ppl"] == 5  # dense + 4 runs

    calls["compress"].clear()
    calls["ppl"] = 0
    second = run_sweep(tiny_dir, text_file, tmp_path, fractions=(0.9, 0.7, 0.5), methods=("lestd", "svd"))
    assert sorted(calls["compress"]) == [("lestd", 0.7), ("svd", 0.7)] and calls["ppl"] == 2
    assert second["dense_perplexity"] == first["dense_perplexity"]
    reused = [r for r in second["rows"] if r["requested_fraction"] != 0.7]
    assert reused == first["rows"]

    calls["compress"].clear()
    run_sweep(tiny_dir, text_file, tmp_path, seq_len=16, fractions=(0.9,))  # other tokens windows: a new key
    assert calls["compress"] == [("lestd", 0.9)]

    calls["compress"].clear()
    monkeypatch.setattr(sw, "code_fingerprint", lambda: "changed-code")  # rows of older code are not reused
    run_sweep(tiny_dir, text_file, tmp_path, fractions=(0.9,))
    assert calls["compress"] == [("lestd", 0.9)]


def test_damaged_cache_entry_is_recomputed(tiny_dir, text_file, tmp_path):
    first = run_sweep(tiny_dir, text_file, tmp_path, fractions=(0.8,))
    for file in tmp_path.glob("*.json"):
        file.write_text("{not json")
    again = run_sweep(tiny_dir, text_file, tmp_path, fractions=(0.8,))
    assert again["rows"][0]["perplexity"] == pytest.approx(first["rows"][0]["perplexity"])


def test_outputs(tiny_dir, text_file, tmp_path):
    result = run_sweep(tiny_dir, text_file, tmp_path / "cache", methods=("lestd", "tensorllm"))
    out = tmp_path / "out"
    out.mkdir()
    sw.write_outputs(result, out / "s.json", out / "s.md", out / "s.png")
    assert json.loads((out / "s.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "s.md").read_text()
    assert table.count("\n| lestd |") == 2 and table.count("\n| tensorllm |") == 2
    assert (out / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["s.json", "s.md", "s.png"]  # no temporary files left
    # log scale when perplexities differ by more than 10x
    wide = dict(result, rows=[dict(result["rows"][0], perplexity=result["dense_perplexity"] * 100)])
    sw.plot_pareto(wide, out / "wide.png")
    assert (out / "wide.png").stat().st_size > 0


def test_validation():
    assert sw.parse_fractions("0.9, 0.5,0.9") == [0.9, 0.5]
    assert parse_choices("lestd,svd", ("lestd", "tensorllm", "svd"), "method") == ["lestd", "svd"]
    for bad in ("0", "1.5", "-0.1", "x", "", "nan"):
        with pytest.raises(InvalidConfigError):
            sw.parse_fractions(bad)
    with pytest.raises(InvalidConfigError, match="pca"):
        parse_choices("lestd,pca", ("lestd", "tensorllm", "svd"), "method")
    runs = sw.run_settings([0.9, 0.5], ["lestd", "svd"], ["row", "element"], ["layer"])
    assert len(runs) == 2 * 2 + 2
    assert sw.parse_heal("no, yes,no") == [False, True] and sw.parse_heal((True,)) == [True]
    assert sw.parse_calibrations("none,default,none") == ["none", "default"]
    for bad in ("", "maybe", "yes,1"):
        with pytest.raises(InvalidConfigError, match="heal"):
            sw.parse_heal(bad)
    for bad in ("", "none,no-such-file.txt", "wikitext3"):
        with pytest.raises(InvalidConfigError, match="calibration"):
            sw.parse_calibrations(bad)
    with pytest.raises(InvalidConfigError, match="calibration tokens"):  # before any model is loaded
        sw.sweep("no-such-model", calibrations="none,default", calibration_tokens=64)


def test_heal_runs_only_where_healing_applies():
    runs = sw.run_settings([0.7], ["lestd", "tensorllm", "svd"], ["row"], ["layer"], ["none", "default"],
                           [False, True])
    settings = [(r["method"], r["calibration"], r["heal"]) for r in runs]
    assert settings == [("lestd", "none", False), ("lestd", "default", False), ("lestd", "default", True),
                        ("tensorllm", "none", False), ("tensorllm", "default", False),
                        ("tensorllm", "default", True), ("svd", "none", False), ("svd", "default", False)]
    # heal=yes alone: data-free and svd runs stay (unhealed), calibrated lestd/tensorllm are healed
    only = sw.run_settings([0.7], ["lestd", "svd"], ["row"], ["layer"], ["none", "default"], [True])
    assert [(r["method"], r["calibration"], r["heal"]) for r in only] == [
        ("lestd", "none", False), ("lestd", "default", True), ("svd", "none", False), ("svd", "default", False)]
    assert all(("calibration_tokens" in r) == (r["calibration"] != "none") for r in runs)
    for run in runs:
        sw._config(run)  # every combination is a valid configuration


def test_model_bytes_arithmetic():
    from transformers import LlamaConfig, LlamaForCausalLM

    report = {"params": {"dense_attention": 1000, "stored": 600}}
    assert sw.compressed_model_bytes(5000, report) == 4 * 4600
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    untied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False))
    tied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))
    assert sw.parameter_count(untied) - sw.parameter_count(tied) == 128 * 64  # a tied embedding counts once


@pytest.fixture(scope="module")
def calibrated(tiny_dir, text_file, tmp_path_factory):
    """One sweep over method x calibration (none, a text file) x heal (no, yes) at 0.7, healing cut to 2 steps."""
    cache = tmp_path_factory.mktemp("calibrated-cache")
    real_compress = sw.compress_model
    configs = []

    def short_heal(model, config, **kwargs):
        assert kwargs["tokenizer"] is not None
        configs.append(config)
        return real_compress(model, dataclasses.replace(config, heal_steps=2, heal_tokens=128), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sw, "compress_model", short_heal)
        result = run_sweep(tiny_dir, text_file, cache, fractions=(0.7,), methods=("lestd", "tensorllm", "svd"),
                           calibrations=("none", str(text_file)), heal=(False, True), calibration_tokens=128)
    return result, cache, configs


def test_calibration_axis_rows_and_cache_keys(calibrated, text_file):
    result, cache, configs = calibrated
    rows = result["rows"]
    assert [(r["method"], r["calibration"] != "none", r["heal"]) for r in rows] == [
        ("lestd", False, False), ("lestd", True, False), ("lestd", True, True),
        ("tensorllm", False, False), ("tensorllm", True, False), ("tensorllm", True, True),
        ("svd", False, False), ("svd", True, False)]
    assert all(c.calibration_tokens == 128 for c in configs if c.calibration != "none")
    for row in rows:
        assert set(sw.ROW_KEYS) <= set(row) and "error" not in row and row["perplexity"] > 1
        assert row["size_fraction"] <= 0.7 + 1e-12
        assert ("calibration_seconds" in row) == (row["calibration"] != "none")
        assert ("healing" in row) == row["heal"]
        if row["heal"]:
            assert row["healing"]["steps"] == 2
    assert len(list(cache.glob("*.json"))) == 1 + len(rows)  # the dense row and one distinct key per run
    by = {(r["method"], r["calibration"], r["heal"]): r for r in rows}
    calibration = str(text_file)
    for method in ("lestd", "tensorllm", "svd"):  # calibration changes the kept weights (SVD: SVD-LLM whitening)
        assert by[method, calibration, False]["perplexity"] != pytest.approx(by[method, "none", False]["perplexity"])


def test_model_bytes_of_rows(calibrated):
    from test_evaluate import tiny_llama

    result, _, _ = calibrated
    dense_parameters = sw.parameter_count(tiny_llama(seed=3))
    assert result["dense_model_bytes"] == 4 * dense_parameters
    attention = 2 * 64 * (64 + 32 + 32 + 64)  # 2 layers x d=64 x (q 64, k 32, v 32, o 64 columns)
    for row in result["rows"]:
        stored = row["size_fraction"] * attention  # with indices, as the report counts them
        assert row["model_bytes"] == pytest.approx(4 * (dense_parameters - attention + stored))
        assert row["model_bytes"] < result["dense_model_bytes"]


@pytest.fixture(scope="module")
def with_ort(tiny_dir, text_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ort-cache")
    return run_sweep(tiny_dir, text_file, cache, fractions=(0.7,), ort_baselines=True), cache


def test_ort_baseline_rows(with_ort, tiny_dir, text_file, monkeypatch):
    from lestd_export import export
    from lestd_export.export import model_files_bytes

    result, cache = with_ort
    lestd, *ort = result["rows"]
    assert lestd["method"] == "lestd"
    assert [(r["method"], r["variant"]) for r in ort] == [("onnxruntime", v) for v in ("fp32", "int8", "int4")]
    (export_dir,) = cache.glob("onnx-dense-*")
    files = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int4": "model.int4.onnx"}
    for row in ort:
        assert set(sw.ROW_KEYS) <= set(row) and row["size_fraction"] is None
        assert row["model_bytes"] == model_files_bytes(export_dir / files[row["variant"]])
    fp32, int8, int4 = ort
    assert fp32["perplexity"] == pytest.approx(result["dense_perplexity"], rel=1e-4)  # ORT fp32 == torch
    assert int4["model_bytes"] < int8["model_bytes"] < fp32["model_bytes"]
    assert int8["perplexity"] != fp32["perplexity"] != int4["perplexity"]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached row or re-exported")

    monkeypatch.setattr(sw, "ort_perplexity", fail)
    monkeypatch.setattr(export, "export_model", fail)
    assert run_sweep(tiny_dir, text_file, cache, fractions=(0.7,), ort_baselines=True)["rows"] == result["rows"]
    monkeypatch.undo()
    monkeypatch.setattr(export, "export_model", fail)  # other windows: new rows, the same export
    other = run_sweep(tiny_dir, text_file, cache, fractions=(0.7,), ort_baselines=True, seq_len=16)
    assert [r["perplexity"] for r in other["rows"][1:]] != [r["perplexity"] for r in ort]
    assert len(list(cache.glob("onnx-dense-*"))) == 1


def test_two_panel_plot_and_table(calibrated, with_ort, tmp_path):
    import matplotlib.image

    result, _, _ = calibrated
    combined = dict(result, rows=result["rows"] + with_ort[0]["rows"][1:])
    sw.write_outputs(combined, markdown_path=tmp_path / "s.md", plot_path=tmp_path / "s.png")
    image = matplotlib.image.imread(tmp_path / "s.png")
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
    table = (tmp_path / "s.md").read_text()
    assert "| calibration | heal |" in table and "model MB" in table
    for variant in ("fp32", "int8", "int4"):
        assert f"\n| onnxruntime {variant} |" in table
    assert table.count("| yes |") == 2  # the healed lestd and tensorllm rows


def test_cli_sweep(tiny_dir, text_file, tmp_path, capsys):
    from lestd_export.cli import main

    md, cache = tmp_path / "s.md", tmp_path / "cache"
    base = ["sweep", str(tiny_dir), "--text-file", str(text_file), "--seq-len", "32", "--max-tokens", "128",
            "--cache-dir", str(cache), "--quiet"]
    assert main(base + ["--fractions", "0.8", "--methods", "lestd,svd", "--markdown", str(md)]) == 0
    assert "| svd |" in md.read_text() and "| svd |" in capsys.readouterr().out
    # default --calibration none,default: the data-free and calibrated form of each method
    table = md.read_text()
    assert table.count("| svd | - | - | none |") == 1 and table.count("| svd | - | - | default |") == 1
    for bad in (["--methods", "lestd,pca"], ["--fractions", "0.8,1.2"], ["--granularity", "column"],
                ["--budget", "model"], ["--fractions", "0.8", "--json", str(tmp_path / "no" / "x.json")],
                ["--calibration", "none,no-such-file.txt"], ["--heal", "maybe"], ["--calibration-tokens", "10"]):
        assert main(base + bad) == 2, bad
        assert "error" in capsys.readouterr().err


def test_a_crashing_run_is_recorded_not_cached(tiny_dir, text_file, tmp_path, monkeypatch):
    real_ppl = sw.torch_perplexity
    seen = []

    def flaky(model, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:  # the first compressed run (the first call is the dense model)
            raise RuntimeError("cannot reshape tensor of 0 elements")
        return real_ppl(model, *args, **kwargs)

    monkeypatch.setattr(sw, "torch_perplexity", flaky)
    with pytest.warns(UserWarning, match="cannot reshape"):
        first = run_sweep(tiny_dir, text_file, tmp_path)
    bad, good = first["rows"]
    assert bad["perplexity"] is None and bad["transient"] and "RuntimeError" in bad["error"]
    assert good["perplexity"] is not None and "error" not in good
    assert "cannot reshape" in sw.to_markdown(first)
    sw.plot_pareto(first, tmp_path / "p.png")  # failed rows are left out of the plot
    monkeypatch.setattr(sw, "torch_perplexity", real_ppl)
    again = run_sweep(tiny_dir, text_file, tmp_path)
    assert again["rows"][0]["perplexity"] is not None and again["rows"][1] == good
