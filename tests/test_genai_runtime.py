"""onnxruntime-genai directories: the builder (atomic, typed errors), perplexity through the decoder graph equals
torch, generation through genai's loop equals torch greedy, bench times a genai directory with a quality column."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

from lestd_export import evaluate as ev  # noqa: E402
from lestd_export import genai  # noqa: E402
from lestd_export.bench import run_benchmark, to_markdown  # noqa: E402
from lestd_export.errors import OutputExistsError  # noqa: E402

# tiny_dir: the tiny Llama (4 query, 2 KV heads of 16: the CPU GroupQueryAttention kernel needs a head size
# that is a multiple of 16), context 256, with a word-level tokenizer
from test_evaluate import SENTENCES, tiny_dir  # noqa: E402,F401
from tiny import assert_same_greedy  # noqa: E402


@pytest.fixture(scope="module")
def genai_fp32(tiny_dir, tmp_path_factory):
    return genai.run_builder(tiny_dir, tmp_path_factory.mktemp("genai-out") / "genai-fp32", "fp32")


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(SENTENCES * 12))
    return path


def test_builder_output_is_whole(tiny_dir, genai_fp32):
    assert genai.is_genai_dir(genai_fp32)
    assert [p.name for p in genai_fp32.parent.iterdir()] == ["genai-fp32"]  # no staging or cache folders left
    section = genai.decoder(genai_fp32)
    assert (section["num_key_value_heads"], section["head_size"], section["num_hidden_layers"]) == (2, 16, 2)
    with pytest.raises(OutputExistsError):
        genai.run_builder(tiny_dir, genai_fp32, "fp32")  # fails before running anything
    assert not genai.is_genai_dir(genai_fp32.parent)


def test_builder_failure_is_typed_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(genai.GenaiBuildError, match="config.json"):
        genai.run_builder(bad, tmp_path / "out", "fp32")
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NopeForCausalLM"]}))
    with pytest.raises(genai.GenaiBuildError, match="last output lines:\n") as error:
        genai.run_builder(bad, tmp_path / "out", "int4")
    assert str(error.value).splitlines()[-1].strip()  # ends with the builder's own output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(genai.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(genai.GenaiUnavailableError, match=r"pip install onnxruntime-genai==0\.15\.2"):
        genai.run_builder(genai.Path("."), genai.Path("unused"), "fp32")


def test_perplexity_equals_torch(tiny_dir, genai_fp32, text_file):
    """eval auto-detects the genai directory (onnxruntime backend) and scores the same windows as torch."""
    torch_result = ev.evaluate(tiny_dir, "torch", text_file=text_file, seq_len=32, progress=False)
    genai_result = ev.evaluate(genai_fp32, text_file=text_file, seq_len=32, progress=False)
    assert genai_result["backend"] == "onnxruntime"
    assert genai_result["tokens_sha256"] == torch_result["tokens_sha256"] and genai_result["tokens"] > 100
    assert genai_result["perplexity"] == pytest.approx(torch_result["perplexity"], rel=1e-4)


def test_genai_loop_generates_like_torch_greedy(tiny_dir, genai_fp32):
    from transformers import AutoModelForCausalLM

    prompt = np.random.default_rng(0).integers(3, 100, size=(2, 6))
    generated = genai.GenaiRuntime(genai_fp32, threads=1).generate(prompt, 5)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert_same_greedy(generated, expected.numpy(), model)


def test_bench_times_a_genai_directory(genai_fp32):
    result = run_benchmark([genai_fp32], threads=1, batch=2, prompt_len=8, gen_len=4, repeats=1, warmup=1,
                           progress=False)
    (record,) = result["records"]
    assert record["runtime"] == "onnxruntime-genai" and record["is_baseline"] and record["finite_logits"]
    assert record["prefill_tokens_per_s"]["median"] > 0 and record["decode_tokens_per_s"]["median"] > 0
    assert record["peak_rss_mb"] >= record["rss_after_load_mb"] > 0 and record["model_bytes"] > 0
    assert record["quality"]["perplexity"] > 1 and result["ratios"][record["variant"]]["perplexity_ratio"] == 1.0
    assert result["quality"]["seq_len"] == 256  # the model's context length, below eval's 512
    assert result["machine"]["onnxruntime_genai"] == "0.15.2"
    table = to_markdown(result)
    assert "| genai-fp32 (baseline) | genai |" in table and "| ppl | ppl x |" in table


def test_genai_baselines_are_built_once(tiny_dir, genai_fp32, tmp_path, monkeypatch):
    built = []

    def fake_builder(source, out, precision, *, overwrite=False):
        built.append(precision)
        shutil.copytree(genai_fp32, out)
        return out

    monkeypatch.setenv("LESTD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(genai, "run_builder", fake_builder)
    first = genai.genai_baselines(str(tiny_dir), progress=False)
    assert [p.name for p in first] == ["genai-fp32", "genai-int4"] and built == ["fp32", "int4"]
    assert genai.genai_baselines(str(tiny_dir), progress=False) == first and len(built) == 2


@pytest.mark.parametrize("damage", ["config", "decoder"])
def test_damaged_genai_dir_is_one_line(genai_fp32, tmp_path, capsys, damage):
    from lestd_export.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(genai_fp32, broken)
    if damage == "config":
        (broken / "genai_config.json").write_text('{"model": ')
    else:
        (broken / "model.onnx").unlink()
    for verb in (["eval", str(broken)], ["bench", str(broken), "--quiet"]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "genai_config.json" in err
