"""Benchmark harness: schema, one process per run, ratio arithmetic, quantised variants, typed errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lestd_export.bench import build_variants, compute_ratios, quantize_int4, quantize_int8, run_benchmark
from lestd_export.cli import main
from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.export import export_model
from lestd_export.loading import LoadedModel
from lestd_export.runtime import OrtCausalLM, open_session

from tiny import tiny_model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    export_model(LoadedModel(tiny_model("llama-gqa"), None, "tiny"), root / "dense")
    model = tiny_model("llama-gqa")
    compress_model(model, CompressionConfig(size_fraction=0.6), progress=False)
    export_model(LoadedModel(model, None, "tiny"), root / "lestd")
    return root / "dense", root / "lestd"


@pytest.fixture(scope="module")
def result(exports):
    dense, lestd = exports
    return run_benchmark([lestd], baseline=dense, threads=1, prompt_len=8, gen_len=4, repeats=2, warmup=1,
                         quantize=["none"], progress=False)


def test_schema(result):
    assert {"cpu", "cores", "onnxruntime", "torch", "provider", "threads"} <= set(result["machine"])
    assert [r["variant"] for r in result["records"]] == ["dense", "lestd"]
    for record in result["records"]:
        for key in ("variant", "path", "is_baseline", "provider", "threads", "batch", "prompt_len", "gen_len",
                    "ttft_ms", "peak_rss_mb", "rss_after_load_mb", "model_bytes", "size_fraction"):
            assert key in record
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            stats = record[key]
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["min"] > 0
        assert record["latency_ms"]["p50"] <= record["latency_ms"]["p90"]
        assert record["peak_rss_mb"] >= record["rss_after_load_mb"] > 0
        assert record["model_bytes"] > 0 and record["finite_logits"]
    assert result["records"][0]["is_baseline"] and not result["records"][1]["is_baseline"]
    assert result["records"][0]["size_fraction"] == 1.0
    assert 0 < result["records"][1]["size_fraction"] < 1
    assert set(result["ratios"]) == {"dense", "lestd"}
    assert result["ratios"]["dense"]["decode_speedup"] == pytest.approx(1.0)
    json.dumps(result)  # serialisable


def test_each_run_in_its_own_process(result):
    import psutil

    pids = [pid for record in result["records"] for pid in record["pids"]]
    assert len(pids) == 4 and len(set(pids)) == 4 and os.getpid() not in pids
    # peak RSS is the worker's own (not the high-water mark inherited from this torch-loaded process)
    assert all(r["peak_rss_mb"] < psutil.Process().memory_info().rss / 2**20 for r in result["records"])


def test_ratio_arithmetic():
    def record(name, decode, prefill, size, base=False, ppl=None, runs=None):
        return {"variant": name, "is_baseline": base, "model_bytes": size, "decode_tokens_per_s_runs": runs,
                "decode_tokens_per_s": {"median": decode}, "prefill_tokens_per_s": {"median": prefill},
                "quality": None if ppl is None else {"perplexity": ppl, "tokens": 1000}}

    ratios = compute_ratios([record("dense", 100.0, 1000.0, 400, True), record("small", 150.0, 800.0, 200)])
    assert ratios["small"] == pytest.approx({"decode_speedup": 1.5, "decode_speedup_paired": None,
                                             "prefill_speedup": 0.8, "bytes_ratio": 2.0,
                                             "bytes_bound_fraction": 0.75, "perplexity_ratio": None})
    assert ratios["dense"] == pytest.approx({"decode_speedup": 1.0, "decode_speedup_paired": None,
                                             "prefill_speedup": 1.0, "bytes_ratio": 1.0,
                                             "bytes_bound_fraction": 1.0, "perplexity_ratio": None})
    # paired: the ratio within each repeat, then the median (drift between repeats cancels)
    ratios = compute_ratios([record("dense", 100.0, 1000.0, 400, True, runs=[100.0, 50.0, 200.0]),
                             record("small", 100.0, 800.0, 200, runs=[110.0, 60.0, 100.0])])
    assert ratios["small"]["decode_speedup_paired"] == pytest.approx(1.1)
    ratios = compute_ratios([record("dense", 100.0, 1000.0, 400, True, 10.0),
                             record("small", 150.0, 800.0, 200, ppl=12.5)])
    assert ratios["small"]["perplexity_ratio"] == pytest.approx(1.25)


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_quantised_variants_load_and_are_finite(exports, quantize):
    for export_dir in exports:
        path, info = quantize(export_dir)
        assert path.is_file() and path.parent == export_dir
        assert path.stat().st_size < (export_dir / "model.onnx").stat().st_size
        ops = info["ops_after"]
        assert ops.get("MatMulNBits" if quantize is quantize_int4 else "MatMulInteger", 0) > 0
        runtime = OrtCausalLM(export_dir, session=open_session(path, threads=1))
        ids = np.random.default_rng(0).integers(0, 128, size=(2, 5))
        out = runtime.step(ids, np.ones_like(ids))
        assert out.logits.shape == (2, 5, 128) and np.isfinite(out.logits).all()
        mtime = path.stat().st_mtime_ns
        assert quantize(export_dir)[0].stat().st_mtime_ns == mtime  # cached, not redone


def test_quantised_variant_names(exports):
    dense, lestd = exports
    variants = build_variants([dense, lestd], ["none", "int8", "int4"])
    assert [v.name for v in variants] == ["dense", "dense+int8", "dense+int4", "lestd", "lestd+int8", "lestd+int4"]
    assert [v.is_baseline for v in variants] == [True] + [False] * 5


def test_cli_writes_outputs(exports, tmp_path, capsys):
    dense, lestd = exports
    out = tmp_path / "r"
    code = main(["bench", str(dense), str(lestd), "--threads", "1", "--prompt-len", "4", "--gen-len", "2",
                 "--repeats", "1", "--warmup", "0", "--quantize", "int8", "--quiet",
                 "--json", f"{out}.json", "--markdown", f"{out}.md", "--plot", f"{out}.png"])
    assert code == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in data["records"]] == ["dense", "dense+int8", "lestd+int8"]
    assert "| dense (baseline) |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_missing_dir_is_a_typed_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "model.onnx" in capsys.readouterr().err


def test_cuda_without_cuda_fails_fast(exports, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    assert main(["bench", str(exports[0]), "--provider", "cuda", "--quiet"]) == 2
    assert "CUDA is unavailable" in capsys.readouterr().err


def test_bad_quantize_flag(exports, capsys):
    assert main(["bench", str(exports[0]), "--quantize", "int3"]) == 2
