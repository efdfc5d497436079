"""Special tokens: every loaded, saved or exported tokenizer agrees with the model, has a pad token and pads
left, so chat prompts stop at the model's end token and padded batches generate through optimum and our runtime."""

import json

import numpy as np
import pytest
import torch

from lestd_export.cli import main
from lestd_export.loading import harmonise_special_tokens, load_model
from lestd_export.runtime import OrtCausalLM
from tiny import tiny_model

TEXT = "the quick brown fox jumps over the lazy dog and the dog sleeps in the sun all day long " * 20
PROMPTS = ["the quick brown fox jumps over the", "dog"]  # different lengths: the second row is padded


def chat_tokenizer():
    """SmolLM2's special tokens at ids 0-2, with eos mislabelled <|im_start|> and no pad token, as transformers'
    GGUF conversion leaves SmolLM2-Instruct's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(
        vocab_size=100, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_start|>", model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (config: bos 1, eos 2, no pad) with that tokenizer, its checkpoint and its export."""
    root = tmp_path_factory.mktemp("tokenizer")
    tiny_model("llama-mha").save_pretrained(root / "hf")  # optimum's past shapes ignore an explicit head_dim
    chat_tokenizer().save_pretrained(root / "hf")
    assert main(["compress", str(root / "hf"), "-o", str(root / "ckpt"), "--size-fraction", "0.6",
                 "--calibration", "none", "--quiet"]) == 0
    assert main(["export", str(root / "hf"), "-o", str(root / "onnx"), "--dense"]) == 0
    return root


def assert_directory_agrees(directory, eos_id, pad_id, bos_id=None):
    """Tokenizer files, config.json and generation_config.json of a saved directory name the same tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    generation = json.loads((directory / "generation_config.json").read_text())
    special = json.loads((directory / "special_tokens_map.json").read_text())
    assert tokenizer.eos_token_id == config["eos_token_id"] == generation["eos_token_id"] == eos_id
    assert tokenizer.pad_token_id == generation["pad_token_id"] == pad_id
    for name, token_id in (("eos_token", eos_id), ("pad_token", pad_id)):  # the token, or a dict with its content
        entry = special[name]
        assert (entry["content"] if isinstance(entry, dict) else entry) == tokenizer.convert_ids_to_tokens(token_id)
    if bos_id is not None:
        assert tokenizer.bos_token_id == config["bos_token_id"] == generation["bos_token_id"] == bos_id
    assert tokenizer.padding_side == "left"
    return tokenizer


def until_eos(row, eos_id):
    row = list(row)
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def test_loaded_tokenizer_follows_the_model(tiny):
    loaded = load_model(str(tiny / "hf"))
    tokenizer = loaded.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.padding_side == "left" and loaded.model.generation_config.pad_token_id == 2


def test_config_ids_that_are_ordinary_words_are_not_adopted():
    """A config id is adopted only where the tokenizer knows it as a special token (random tiny configs)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = chat_tokenizer()
    model = tiny_model("llama-gqa")
    model.config.eos_token_id = model.generation_config.eos_token_id = 40  # a word of TEXT
    harmonise_special_tokens(model, tokenizer)
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and tokenizer.eos_token == "<|im_start|>"
    assert tokenizer.pad_token == "<|im_start|>" and model.generation_config.pad_token_id == 1


def test_recorded_ids_win_over_the_config():
    tokenizer = chat_tokenizer()
    model = tiny_model("llama-gqa")
    harmonise_special_tokens(model, tokenizer, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, model.generation_config.pad_token_id) == (2, 0, 0)


@pytest.mark.parametrize("name", ["ckpt", "onnx"])
def test_saved_directories_agree(tiny, name):
    assert_directory_agrees(tiny / name, eos_id=2, pad_id=2, bos_id=1)


def test_padded_batch_generates_through_optimum_and_our_runtime(tiny):
    from optimum.onnxruntime import ORTModelForCausalLM

    tokenizer = assert_directory_agrees(tiny / "onnx", eos_id=2, pad_id=2)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # needs the pad token
    assert batch["attention_mask"][1, 0] == 0  # left-padded
    model = load_model(str(tiny / "hf")).model
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=6, do_sample=False)
        alone = [model.generate(**tokenizer([p], return_tensors="pt"), max_new_tokens=6, do_sample=False)[0]
                 for p in PROMPTS]
    from_optimum = ORTModelForCausalLM.from_pretrained(tiny / "onnx").generate(**batch, max_new_tokens=6,
                                                                                do_sample=False)
    ours = OrtCausalLM(tiny / "onnx").generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                               max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    for row in range(len(PROMPTS)):
        new = until_eos(expected[row, width:].tolist(), 2)
        assert until_eos(from_optimum[row, width:].tolist(), 2) == new
        assert until_eos(ours[row, width:].tolist(), 2) == new
        assert until_eos(alone[row][len(alone[row]) - 6:].tolist(), 2) == new  # padding changes nothing


# ----------------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_tokens_are_smollm2_instructs(exports):
    tokenizer = exports["model"].tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        1, 2, 2, 0)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id  # the GGUF says: no BOS added
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert chat[0] == 1 and chat[1] != 1  # one <|im_start|>, from the template
    for name in ("dense", "lestd-0.7"):
        assert_directory_agrees(exports["root"] / name, eos_id=2, pad_id=2, bos_id=1)


@pytest.mark.slow
def test_default_export_generates_a_padded_chat_batch(exports):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    directory = exports["root"] / "lestd-0.7"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False)
               for q in ("What is the capital of France? Answer in one word.", "Hi")]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][:, 0].tolist() == [1, 0]
    from_optimum = ORTModelForCausalLM.from_pretrained(directory).generate(**batch, max_new_tokens=12,
                                                                           do_sample=False)
    ours = OrtCausalLM(directory).generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                           max_new_tokens=12, eos_token_id=2, pad_token_id=2)
    with torch.no_grad():
        expected = exports["model"].model.generate(**batch, max_new_tokens=12, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row in range(2):
        new = until_eos(expected[row, width:].tolist(), 2)
        assert until_eos(from_optimum[row, width:].tolist(), 2) == new == until_eos(ours[row, width:].tolist(), 2)
    assert np.all(ours[:, :width] == batch["input_ids"].numpy())
