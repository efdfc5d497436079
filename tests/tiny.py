"""Tiny randomly initialised models, one per registered architecture (and GQA / explicit head_dim variants)."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTJConfig, GraniteConfig,
                          LlamaConfig, MistralConfig, Olmo2Config, OPTConfig, Phi3Config, Qwen2Config, Qwen3Config,
                          SmolLM3Config)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the defaults of several configs exceed VOCAB
# Gemma: head_dim 24 != 64 / 4, a sliding-window layer (window 4 < the test sequences) then a full one,
# attention (gemma2) and final-logit soft-capping active, scaled embeddings
GEMMA = dict(**COMMON, **TOKENS, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=8.0,
             final_logit_softcapping=8.0)

# name -> config; every model_type in the registry must appear at least once (tests/test_architectures.py)
TINY_CONFIGS = {
    "llama-mha": lambda: LlamaConfig(**COMMON, num_key_value_heads=4),
    "llama-gqa": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=24),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2, use_sliding_window=False),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=20, use_sliding_window=False),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               initializer_range=0.2),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=128, init_std=0.2),
    "gptj": lambda: GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                               initializer_range=0.2, tie_word_embeddings=False),
    "gemma2": lambda: Gemma2Config(**GEMMA),
    # Gemma 3 ignores attn_logit_softcapping (transformers 4.57); per-head q/k norms; tied, scaled embedding
    "gemma3_text": lambda: Gemma3TextConfig(**{**GEMMA, "attn_logit_softcapping": None, "tie_word_embeddings": True},
                                            rope_local_base_freq=100.0),
    # fused qkv_proj [Q | K | V] with GQA, partial rotary
    "phi3": lambda: Phi3Config(**COMMON, **TOKENS, num_key_value_heads=2, partial_rotary_factor=0.5),
    # attention scale, embedding / residual / logit multipliers; q/k/v/o biases
    "granite": lambda: GraniteConfig(**COMMON, **TOKENS, num_key_value_heads=2, attention_bias=True,
                                     attention_multiplier=0.1, embedding_multiplier=2.0, residual_multiplier=0.5,
                                     logits_scaling=2.0),
    # q_norm / k_norm over the full projected width (not per head)
    "olmo2": lambda: Olmo2Config(**COMMON, **TOKENS, num_key_value_heads=2),
    # every 2nd layer without rotary embeddings (NoPE)
    "smollm3": lambda: SmolLM3Config(**COMMON, **TOKENS, num_key_value_heads=2, no_rope_layer_interval=2),
}


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    with torch.no_grad():  # OPT/GPT-2 initialise biases to zero: give them values so bias handling is tested
        for name_, param in model.named_parameters():
            if name_.endswith("bias"):
                param.normal_(0, 0.1)
    return model


GREEDY_TIE = 1e-3  # logits closer than this may swap between runtimes (fp32 parity is ~1e-5 of the logits here)


def assert_same_greedy(generated, expected, model, attention_mask=None, tie: float = GREEDY_TIE) -> None:
    """Greedy tokens ``generated`` (another runtime) equal PyTorch's ``expected`` ``[B, T]``, except from a step
    where PyTorch's two best logits are within ``tie``: a tie that floating point may break either way on
    another machine, so it is not a failure (everything after it then legitimately differs)."""
    import numpy as np

    generated, expected = np.asarray(generated), np.asarray(expected)
    assert generated.shape == expected.shape, (generated.shape, expected.shape)
    differ = np.flatnonzero((generated != expected).any(axis=0))
    if not differ.size:
        return
    step = int(differ[0])
    prefix = torch.from_numpy(expected[:, :step])
    mask = None if attention_mask is None else torch.cat(
        [torch.as_tensor(attention_mask), torch.ones(len(prefix), step - attention_mask.shape[1], dtype=torch.long)],
        dim=1)
    with torch.no_grad():
        top = model(prefix, attention_mask=mask).logits[:, -1].float().topk(2).values
    rows = generated[:, step] != expected[:, step]
    gap = (top[:, 0] - top[:, 1]).numpy()[rows]
    assert (gap <= tie).all(), f"greedy tokens differ at step {step} where the reference's best logit leads by {gap}"


def reloaded_exactly(model, report: dict, directory):
    """Save a tiny model ``compress`` rewrote (``report``: its compression report) as a checkpoint under
    ``directory``, reload it, check that it computes bit-identically, and return the reloaded model."""
    import numpy as np

    from lestd_export.compress import load_compressed, save_compressed
    from lestd_export.loading import LoadedModel

    save_compressed(LoadedModel(model, None, "tiny"), report, directory / "checkpoint")
    reloaded = load_compressed(directory / "checkpoint").model
    reloaded.config._attn_implementation = model.config._attn_implementation
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), model(ids).logits.numpy())
    return reloaded


def assert_rewrite_keeps_logits(model, rewrite, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Run ``rewrite(model)`` (an in-place surgery) and check the model's logits on fixed tokens are unchanged."""
    import numpy as np

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits.numpy()
        rewrite(model)
        np.testing.assert_allclose(model(ids).logits.numpy(), expected, atol=atol, rtol=rtol)
