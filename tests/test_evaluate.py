"""Perplexity: hand computation, torch == ONNX Runtime, text sources, the ``eval`` CLI."""

from __future__ import annotations

import builtins
import json
import math
import sys

import pytest
import torch

from lestd_export import evaluate as ev
from lestd_export.errors import LestdError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model compresses attention with a shared basis and a sparse core",
    "perplexity is the exponential of the mean negative log likelihood",
    "def f ( x ) : return x + 1",
    "class A : pass",
    "the dog and the fox are friends",
]


def tiny_tokenizer():
    """A word-level tokenizer (< 128 ids) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=100, special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_export(tiny_dir, tmp_path_factory):
    """Dense ONNX export of the tiny model through Optimum (text-generation-with-past), plus tokenizer."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-onnx")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    onnx_export_from_model(model, out, task="text-generation-with-past", do_validation=False)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(SENTENCES * 8))
    return path


def hand_perplexity(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if len(window) < 2:
                continue
            logits = model(torch.tensor([window])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(window)):
                nll -= float(logp[t - 1, window[t]])
                count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("length", [64, 71, 65])  # exact windows, a partial window, a 1-token tail (dropped)
def test_perplexity_matches_hand_computation(length):
    model = tiny_llama()
    ids = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    result = ev.torch_perplexity(model, ids, seq_len=16, progress=False)
    expected, count = hand_perplexity(model, ids, 16)
    assert result["tokens"] == count == sum(b - a - 1 for a, b in ev.windows(length, 16))
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    # max_tokens cuts the token stream before windowing; a tensor works as well as a list
    cut = ev.torch_perplexity(model, torch.tensor(ids), seq_len=16, max_tokens=40, progress=False)
    assert cut["perplexity"] == pytest.approx(hand_perplexity(model, ids[:40], 16)[0], rel=1e-5)
    assert cut["tokens"] == 15 + 15 + 7


def test_windows_and_bad_lengths():
    assert ev.windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert ev.windows(9, 4) == [(0, 4), (4, 8)]
    with pytest.raises(LestdError):
        ev.torch_perplexity(tiny_llama(), [1], seq_len=4, progress=False)
    with pytest.raises(LestdError):
        ev.torch_perplexity(tiny_llama(), [1, 2, 3], seq_len=1, progress=False)


def test_torch_and_onnxruntime_agree(tiny_dir, tiny_export):
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    a = ev.torch_perplexity(model, ids, seq_len=32, progress=False)
    b = ev.ort_perplexity(tiny_export, ids, seq_len=32, progress=False)
    assert a["tokens"] == b["tokens"] == 4 * 31 + 21
    assert abs(a["perplexity"] - b["perplexity"]) / a["perplexity"] < 1e-3

    ta = ev.evaluate(tiny_dir, "torch", seq_len=32, max_tokens=300, progress=False)
    tb = ev.evaluate(tiny_export, "onnxruntime", seq_len=32, max_tokens=300, progress=False)
    assert set(ta) == set(tb) == set(ev.RESULT_KEYS)
    assert ta["tokens"] == tb["tokens"] > 0
    assert abs(ta["perplexity"] - tb["perplexity"]) / ta["perplexity"] < 1e-3
    assert ta["size_fraction"] == tb["size_fraction"] == 1.0
    assert tb["backend"] == "onnxruntime" and ta["text_source"] == tb["text_source"]


def test_compressed_export_torch_and_onnxruntime_agree(tiny_dir, tmp_path):
    """torch-compressed == ORT-compressed on the same tokens; the export's size fraction is reported."""
    from lestd_export.compress import compress_model
    from lestd_export.config import CompressionConfig
    from lestd_export.export import export_model
    from lestd_export.loading import load_model

    loaded = load_model(str(tiny_dir))
    report = compress_model(loaded.model, CompressionConfig(size_fraction=0.6, granularity="element"), progress=False)
    export_model(loaded, tmp_path / "onnx", validate=False)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    a = ev.torch_perplexity(loaded.model, ids, seq_len=64, progress=False)
    b = ev.ort_perplexity(tmp_path / "onnx", ids, seq_len=64, progress=False)
    assert abs(a["perplexity"] - b["perplexity"]) / a["perplexity"] < 1e-3
    result = ev.evaluate(tmp_path / "onnx", "onnxruntime", seq_len=64, max_tokens=100, progress=False)
    assert result["size_fraction"] == pytest.approx(report["size_fraction"]["with_indices"])
    assert result["size_fraction"] < 0.6 + 1e-9


def test_size_fraction_of_dir(tmp_path):
    assert ev.size_fraction_of_dir(tmp_path) is None
    (tmp_path / "compression_report.json").write_text(json.dumps({"size_fraction": {"with_indices": 0.42}}))
    assert ev.size_fraction_of_dir(tmp_path) == 0.42
    (tmp_path / "config.json").write_text(json.dumps({"lestd_compression": {"size_fraction": {"with_indices": 0.5}}}))
    assert ev.size_fraction_of_dir(tmp_path) == 0.5


def test_onnxruntime_needs_an_export_dir(tiny_dir):
    with pytest.raises(LestdError, match="model.onnx"):
        ev.evaluate(tiny_dir, "onnxruntime", progress=False)


def test_compressed_model_reports_its_size_fraction(tiny_dir, tmp_path):
    from lestd_export.compress import compress_model, save_compressed
    from lestd_export.config import CompressionConfig
    from lestd_export.loading import load_model

    loaded = load_model(str(tiny_dir))
    report = compress_model(loaded.model, CompressionConfig(size_fraction=0.6), progress=False)
    save_compressed(loaded, report, tmp_path / "ckpt")
    result = ev.evaluate(tmp_path / "ckpt", seq_len=32, max_tokens=200, progress=False)
    assert result["size_fraction"] == pytest.approx(report["size_fraction"]["with_indices"])
    assert result["size_fraction"] < 0.6 + 1e-9
    assert ev.size_fraction_of_dir(tmp_path / "ckpt") == pytest.approx(result["size_fraction"])


def test_default_text_is_offline_and_nonempty():
    text = ev.default_text()
    assert len(text) > 100_000 and "lambda" in text
    assert ev.load_text() == (text, ev.load_text(dataset="default")[1])
    assert "pydoc_data" in ev.load_text()[1]


def test_tokenize_prefix_equals_full_tokenisation():
    tok = tiny_tokenizer()
    text = " ".join(SENTENCES * 200)
    full = ev.tokenize(tok, text)
    assert ev.tokenize(tok, text, max_tokens=50) == full[:50]
    with pytest.raises(LestdError, match="tokenizer"):
        ev.tokenize(None, text)


def test_wikitext2_without_datasets_is_a_typed_error(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ev.DatasetUnavailableError, match="--dataset default") as info:
        ev.load_text(dataset="wikitext2")
    assert "--text-file" in str(info.value)


def test_wikitext2_offline_is_a_typed_error(monkeypatch):
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ev.DatasetUnavailableError, match="ConnectionError"):
        ev.load_text(dataset="wikitext2")


def test_wikitext2_joins_the_test_split(monkeypatch):
    import types

    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a", "", "b"]}

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    text, name = ev.load_text(dataset="wikitext2")
    assert text == "a\n\n\n\nb" and "wikitext" in name
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_text_source_errors(tmp_path):
    with pytest.raises(ev.TextSourceError):
        ev.load_text(text_file=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ev.TextSourceError):
        ev.load_text(text_file=tmp_path / "empty.txt")
    with pytest.raises(LestdError):
        ev.load_text(dataset="imagenet")
    with pytest.raises(LestdError):
        ev.load_text(text_file=tmp_path / "x.txt", dataset="default")


def test_cli_eval_writes_json(tiny_dir, text_file, tmp_path, capsys):
    from lestd_export.cli import main

    out = tmp_path / "result.json"
    assert main(["eval", str(tiny_dir), "--text-file", str(text_file), "--seq-len", "16", "--json", str(out),
                 "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == set(ev.RESULT_KEYS)
    assert data["backend"] == "torch" and data["seq_len"] == 16 and data["text_source"] == str(text_file)
    assert data["tokens"] > 0 and math.isfinite(data["perplexity"])
    assert json.loads(capsys.readouterr().out) == data


def test_cli_eval_bad_input_fails(tiny_dir, tmp_path, capsys):
    from lestd_export.cli import main

    assert main(["eval", str(tiny_dir), "--text-file", str(tmp_path / "nope.txt")]) != 0
    assert "nope.txt" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--seq-len", "1"]) != 0
    with pytest.raises(SystemExit):  # argparse: --text-file and --dataset are mutually exclusive
        main(["eval", str(tiny_dir), "--text-file", "a.txt", "--dataset", "default"])


def test_tasks_are_skipped_with_a_note_without_lm_eval(tiny_dir, text_file, monkeypatch, capsys):
    from lestd_export.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    assert main(["eval", str(tiny_dir), "--text-file", str(text_file), "--seq-len", "16", "--tasks", "piqa",
                 "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "lm-eval-harness is not installed" in captured.err
    assert "skipped" in json.loads(captured.out)["tasks"]
    assert main(["eval", str(tiny_dir), "--backend", "onnxruntime", "--tasks", "piqa"]) == 2


def test_tasks_run_through_lm_eval_when_installed(tiny_dir, monkeypatch):
    """The wiring, against a stand-in lm_eval: the loaded model goes to HFLM, metrics come back per task."""
    import types

    seen = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer):
            seen["model"], seen["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks, num_fewshot, limit):
        seen["tasks"], seen["num_fewshot"] = tasks, num_fewshot
        return {"results": {"piqa": {"acc,none": 0.5, "alias": "piqa"}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models, huggingface = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = FakeHFLM
    for name, module in (("lm_eval", lm_eval), ("lm_eval.models", models), ("lm_eval.models.huggingface", huggingface)):
        monkeypatch.setitem(sys.modules, name, module)
    result = ev.evaluate(str(tiny_dir), max_tokens=64, seq_len=16, progress=False, tasks=["piqa"])
    assert result["tasks"] == {"piqa": {"acc,none": 0.5}}
    assert seen["tasks"] == ["piqa"] and seen["num_fewshot"] == 0
    assert isinstance(seen["model"], torch.nn.Module) and seen["tokenizer"] is not None
