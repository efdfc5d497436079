"""Bad input: a typed error, a non-zero exit code, a message that says what to do, nothing left behind."""

import json
import shutil

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
    code, _ = run_cli(["compress", str(tiny_dir), "-o", str(out), "--size-fraction", "0.6", "--calibration", "none",
                       "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "compression_report.json").read_text())
    for key in ("method", "size_fraction", "ranks", "density", "relative_weight_error", "params", "seconds"):
        assert key in report
    assert set(report["size_fraction"]) == {"requested", "values_only", "with_indices", "storage", "layout"}
    assert 0.594 <= report["size_fraction"]["with_indices"] <= 0.6
    assert report["params"]["stored"] == round(report["size_fraction"]["with_indices"]
                                               * report["params"]["dense_attention"])
    assert len(report["relative_weight_error"]["per_layer"]) == 2
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------------------------- bad files
# Every file a verb reads, truncated or replaced by bytes of the wrong kind: exit 2, one line naming
# the file, no traceback, nothing written (no output directory, no staging directory, no JSON).

TEXT = "the quick brown fox jumps over the lazy dog and the dog sleeps " * 40


def word_tokenizer():
    """A word-level fast tokenizer (< 128 ids) so that the tiny models can be evaluated on text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(vocab_size=100, special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Hugging Face directory with a tokenizer, a compressed checkpoint of it, and a dense export."""
    root = tmp_path_factory.mktemp("sources")
    tiny_model("llama-gqa").save_pretrained(root / "hf")
    word_tokenizer().save_pretrained(root / "hf")
    assert main(["compress", str(root / "hf"), "-o", str(root / "ckpt"), "--size-fraction", "0.6",
                 "--calibration", "none", "--quiet"]) == 0
    assert main(["export", str(root / "hf"), "-o", str(root / "onnx"), "--dense", "--no-validate"]) == 0
    (root / "text.txt").write_text(TEXT)
    return root


def verb_args(verb: str, target, out, text):
    """The command line of ``verb`` on ``target``, writing (if it writes) to ``out``."""
    return {"compress": ["compress", target, "-o", out, "--calibration", "none", "--size-fraction", "0.6", "--quiet"],
            "export": ["export", target, "-o", out, "--no-validate"],
            "export-dense": ["export", target, "-o", out, "--dense", "--no-validate"],
            "eval": ["eval", target, "--text-file", text, "--quiet", "--json", out],
            "eval-ort": ["eval", target, "--backend", "onnxruntime", "--text-file", text, "--quiet", "--json", out],
            "sweep": ["sweep", target, "--fractions", "0.6", "--methods", "svd", "--text-file", text,
                      "--max-tokens", "64", "--quiet", "--json", out, "--cache-dir", f"{out}-cache"],
            "bench": ["bench", target, "--repeats", "1", "--warmup", "0", "--prompt-len", "4", "--gen-len", "2",
                      "--quiet", "--json", out]}[verb]


def assert_bad_file(tmp_path, capsys, verb, target, named, text=None):
    """``verb`` on ``target`` fails with one typed line naming ``named`` and writes nothing."""
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = [str(a) for a in verb_args(verb, target, out, text or tmp_path.parent / "text.txt")]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"lestd-export {args[0]}: error: ") and "\n" not in err, err
    assert "Traceback" not in err and named in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, staging or cache entry


def corrupt(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00\xff\xfe not what it says " * 8)


HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"]
CASES = ([("hf", f, how, verb) for f in HF_FILES for how in ("truncated", "garbage")
          for verb in ("compress", "export", "eval", "sweep")]
         + [("ckpt", f, how, verb) for f in [*HF_FILES, "compression_report.json"] for how in ("truncated", "garbage")
            for verb in ("export", "eval")]
         + [("onnx", f, how, verb) for f in ["model.onnx", "config.json", "generation_config.json", "tokenizer.json",
                                            "tokenizer_config.json", "special_tokens_map.json", "export_report.json"]
            for how in ("truncated", "garbage") for verb in ("eval-ort", "bench")])


@pytest.mark.parametrize("kind, name, how, verb", CASES, ids=["-".join(c) for c in CASES])
def test_bad_file_is_a_one_line_error(tmp_path, capsys, monkeypatch, sources, kind, name, how, verb):
    monkeypatch.setenv("LESTD_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / kind
    shutil.copytree(sources / kind, target)
    corrupt(target / name, how)
    assert_bad_file(tmp_path, capsys, verb, target, name, sources / "text.txt")


def truncated_gguf(path) -> bytes:
    """The first half of a small but real GGUF file (header, metadata and one tensor)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("content", ["empty", "magic only", "text", "truncated"])
@pytest.mark.parametrize("verb", ["compress", "export", "eval", "sweep"])
def test_bad_gguf(tmp_path, capsys, monkeypatch, sources, content, verb):
    monkeypatch.setenv("LESTD_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes({"empty": b"", "magic only": b"GGUF", "text": b"not a gguf file at all\n" * 10,
                      "truncated": truncated_gguf(tmp_path / "model.gguf") if content == "truncated" else b""}[content])
    assert_bad_file(tmp_path, capsys, verb, gguf, "model.gguf", sources / "text.txt")


def test_truncated_pytorch_weights(tmp_path, capsys):
    target = tmp_path / "bin-model"
    tiny_model("llama-gqa").save_pretrained(target, safe_serialization=False)
    corrupt(target / "pytorch_model.bin", "truncated")
    assert_bad_file(tmp_path, capsys, "export-dense", target, "pytorch_model.bin")


def test_folder_holding_a_bad_gguf(tmp_path, capsys, monkeypatch, sources):
    monkeypatch.setenv("LESTD_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model.gguf").write_text("plain text")
    assert_bad_file(tmp_path, capsys, "export-dense", tmp_path / "folder", "model.gguf")


def test_checkpoint_whose_compression_section_is_damaged(tmp_path, capsys, sources):
    target = tmp_path / "ckpt"
    shutil.copytree(sources / "ckpt", target)
    config = json.loads((target / "config.json").read_text())
    del config["lestd_compression"]["layers"]
    (target / "config.json").write_text(json.dumps(config))
    assert_bad_file(tmp_path, capsys, "eval", target, "compressed checkpoint", sources / "text.txt")


@pytest.mark.parametrize("content, fragment", [(b"", "is empty"), (b"\xff\xfe\x00", "not UTF-8 text")])
def test_bad_calibration_file(tmp_path, capsys, sources, content, fragment):
    calibration = tmp_path / "calibration.txt"
    calibration.write_bytes(content)
    code = main(["compress", str(sources / "hf"), "-o", str(tmp_path / "out"), "--calibration", str(calibration),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "calibration.txt" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_torch_eval_of_an_export_says_which_backend(tmp_path, capsys, sources):
    assert_bad_file(tmp_path, capsys, "eval", sources / "onnx", "--backend onnxruntime", sources / "text.txt")


@pytest.mark.parametrize("content, fragment", [(b"", "is empty"), (b"  \n\n ", "is empty"),
                                               (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
                                               (b"text\x00with NUL", "NUL bytes")])
@pytest.mark.parametrize("verb, target", [("eval", "hf"), ("eval-ort", "onnx"), ("sweep", "hf")])
def test_bad_text_file(tmp_path, capsys, sources, content, fragment, verb, target):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    assert_bad_file(tmp_path, capsys, verb, sources / target, fragment, text)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"{\"alias\": \"broken\",", b"[1, 2]", b"\xff\xfe",
                                     b'{"alias": "broken", "source": {"type": "package-gguf"}}',
                                     b'{"alias": "broken", "source": {"type": "ftp", "url": "x"}}'])
@pytest.mark.parametrize("verb", ["models", "compress"])
def test_bad_catalogue_entry(tmp_path, capsys, monkeypatch, content, verb):
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()
    (catalogue / "broken.json").write_bytes(content)
    monkeypatch.setenv("LESTD_MODELS_DIR", str(catalogue))
    args = ["models"] if verb == "models" else ["compress", "broken", "-o", str(tmp_path / "out"), "--quiet"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "broken.json" in err and "\n" not in err and "LESTD_MODELS_DIR" in err, err
    assert not (tmp_path / "out").exists()
