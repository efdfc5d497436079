"""Architecture registry: everything model-specific, as data, keyed by ``config.model_type``.

An :class:`ArchSpec` says where the decoder layers and their attention modules live, what the
projections are called, whether Q/K/V are fused into one module and whether the weights are stored
``[in, out]`` (GPT-2 ``Conv1D``) rather than ``[out, in]`` (``nn.Linear``). Head counts and the head
dimension are read from the config, never assumed to be ``hidden / heads``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers_path: str  # dotted path from the *ForCausalLM module to the list of decoder layers
    attention: str  # attribute of a decoder layer holding the attention module
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    fused_qkv: str | None = None  # one module producing concat(Q, K, V), e.g. GPT-2 ``c_attn``
    weight_in_out: bool = False  # weight stored [in, out] (Conv1D) instead of [out, in] (Linear)
    rotary: str = "full"  # "full", "partial" or "none": documentation and export hints
    uses_position_ids: bool = True


@dataclass(frozen=True)
class AttentionShape:
    """Dimensions of one attention layer, read from the config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def num_slices(self) -> int:
        return 2 * self.heads + 2 * self.kv_heads


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "model.layers", "self_attn"),
        ArchSpec("mistral", "model.layers", "self_attn"),
        ArchSpec("qwen2", "model.layers", "self_attn"),
        ArchSpec("qwen3", "model.layers", "self_attn"),
        ArchSpec("gpt2", "transformer.h", "attn", o="c_proj", fused_qkv="c_attn", weight_in_out=True,
                 rotary="none", uses_position_ids=False),
        ArchSpec("opt", "model.decoder.layers", "self_attn", o="out_proj", rotary="none"),
        ArchSpec("gptj", "transformer.h", "attn", o="out_proj", rotary="partial"),
        # q/k norms (olmo2: over the full projected width), soft-capping, sliding-window layers, NoPE
        # layers and scaled embeddings live in the original forward, which the compressed modules wrap
        ArchSpec("gemma2", "model.layers", "self_attn"),
        ArchSpec("gemma3_text", "model.layers", "self_attn"),
        ArchSpec("phi3", "model.layers", "self_attn", fused_qkv="qkv_proj"),  # nn.Linear rows Q | K | V
        ArchSpec("granite", "model.layers", "self_attn"),
        ArchSpec("olmo2", "model.layers", "self_attn"),
        ArchSpec("smollm3", "model.layers", "self_attn"),
    )
}


def spec_for(config) -> ArchSpec:
    """The registry entry for a transformers config, or a typed error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported architectures: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[model_type]


def attention_shape(config) -> AttentionShape:
    """Head counts and head dimension from a transformers config (GQA and explicit head_dim aware)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(hidden=int(config.hidden_size), heads=heads, kv_heads=kv_heads, head_dim=int(head_dim))


def decoder_layers(model, spec: ArchSpec):
    """The list of decoder layers of a ``*ForCausalLM`` model."""
    module = model
    for name in spec.layers_path.split("."):
        module = getattr(module, name)
    return module
