"""Ladder: exact at full rank, cache consistency and checkpoint round trip, for every registered architecture."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lestd_export.compress import compress_model, load_compressed, save_compressed
from lestd_export.config import CompressionConfig
from lestd_export.loading import LoadedModel
from lestd_export.modules import CoreOutput, LatentAttention, LatentQKV, ProjectionOutput
from lestd_export.registry import REGISTRY
from tiny import TINY_CONFIGS, VOCAB, tiny_model

FULL = CompressionConfig(ranks=(None, None), core_density=1.0)
NAMES = sorted(TINY_CONFIGS)


def test_every_registered_architecture_has_a_tiny_model():
    covered = {TINY_CONFIGS[name]().model_type for name in TINY_CONFIGS}
    assert covered == set(REGISTRY), f"registered without a tiny-model test: {set(REGISTRY) - covered}"


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_full_rank_full_density_reproduces_logits(name):
    model = tiny_model(name)
    ids = tokens()
    with torch.no_grad():
        reference = model(ids).logits
        report = compress_model(model, FULL, progress=False)
        logits = model(ids).logits
    assert (logits - reference).norm() / reference.norm() < 1e-4
    assert report["relative_weight_error"]["overall"] < 1e-6  # sqrt of a difference of float64 energies
    attentions = [m for m in model.modules() if isinstance(m, LatentAttention)]
    assert len(attentions) == model.config.num_hidden_layers
    for attention in attentions:
        # no dense projection weight remains anywhere in the attention blocks
        dense = [type(m).__name__ for m in attention.modules() if type(m).__name__ in ("Linear", "Conv1D")]
        assert dense == []
        projections = [m for m in attention.attention.children() if isinstance(m, (ProjectionOutput, CoreOutput))]
        assert len(projections) in (2, 4)  # fused qkv + o, or q, k, v, o
        assert "ranks=" in repr(attention) and "of dense" in repr(attention)


@pytest.mark.parametrize("name", NAMES)
def test_compressed_generation_with_cache_matches_no_cache_forward(name):
    model = tiny_model(name, dtype=torch.float64)
    compress_model(model, CompressionConfig(size_fraction=0.6), progress=False)
    ids = tokens(batch=2, length=5)
    model.generation_config.eos_token_id = None  # compare all 6 steps, even past a sampled end token
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
        sequence = ids
        for _ in range(6):  # greedy without cache: full forward each step
            step = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "opt", "phi3", "gemma3_text"])
@pytest.mark.parametrize("config", [CompressionConfig(size_fraction=0.5),
                                    CompressionConfig(size_fraction=0.5, granularity="element", budget="global"),
                                    CompressionConfig(method="tensorllm", size_fraction=0.7),
                                    CompressionConfig(method="svd", size_fraction=0.5)],
                         ids=["lestd-row", "lestd-element-global", "tensorllm", "svd"])
def test_checkpoint_reloads_without_recomputing(tmp_path, name, config, monkeypatch):
    model = tiny_model(name)
    ids = tokens()
    report = compress_model(model, config, progress=False)
    assert 0.99 * config.size_fraction <= report["size_fraction"]["with_indices"] <= config.size_fraction
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(LoadedModel(model, None, "tiny"), report, tmp_path / "ckpt")
    import lestd_export.numerics.tucker as tucker

    monkeypatch.setattr(tucker, "hooi", lambda *a, **k: pytest.fail("reload must not recompute"))
    reloaded = load_compressed(tmp_path / "ckpt").model
    with torch.no_grad():  # the reloaded model may pick another attention kernel (sdpa vs eager)
        assert torch.allclose(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert repr(reloaded) == repr(model)


def test_same_input_gives_bit_identical_output():
    first, second = tiny_model("llama-gqa"), tiny_model("llama-gqa")
    config = CompressionConfig(size_fraction=0.5)
    compress_model(first, config, progress=False)
    compress_model(second, config, progress=False)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_head_dim_is_read_from_config():
    model = tiny_model("qwen3")  # head_dim 20 != hidden 64 / 4 heads
    report = compress_model(copy.deepcopy(model), FULL, progress=False)
    assert report["ranks"][0] == [64, 20]


def test_a_group_may_keep_no_rows():
    """Small budgets can give a group (here the value heads) zero rows; the model must still run."""
    model = tiny_model("llama-gqa")
    with torch.no_grad():  # value heads with negligible energy lose every row to the other groups
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(1e-4)
    compress_model(model, CompressionConfig(ranks=(32, 8), size_fraction=0.2, objective="frobenius"), progress=False)
    kept = [rows.numel() for m in model.modules() if isinstance(m, LatentQKV)
            for name, rows in m.named_buffers() if name.startswith("rows_")]
    with torch.no_grad():
        logits = model(tokens()).logits
    assert torch.isfinite(logits).all()
    assert min(kept) == 0, kept  # the case under test actually occurs


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_gemma_tiny_models_exercise_sliding_windows_and_soft_capping(name):
    """The tiny Gemma configs must make the features under test matter on the test sequences (length 9)."""
    ids = tokens()

    def logits(**overrides):
        torch.manual_seed(0)
        config = TINY_CONFIGS[name]()
        config.update(overrides)
        config._attn_implementation = "eager"
        with torch.no_grad():
            return AutoModelForCausalLM.from_config(config).eval()(ids).logits

    reference = logits()
    changed = {"sliding_window": 1000, "final_logit_softcapping": None}
    if name == "gemma2":
        changed["attn_logit_softcapping"] = None
    for key, value in changed.items():
        assert (logits(**{key: value}) - reference).norm() / reference.norm() > 1e-3, key
    assert tiny_model(name).model.layers[0].self_attn.head_dim != 64 // 4
