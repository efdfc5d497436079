"""Architecture registry: everything model-specific, as data, keyed by ``config.model_type``.

An :class:`ArchSpec` says where the decoder layers and their attention modules live, what the
projections are called, whether Q/K/V are fused into one module and whether the weights are stored
``[in, out]`` (GPT-2 ``Conv1D``) rather than ``[out, in]`` (``nn.Linear``). Head counts and the head
dimension are read from the config, never assumed to be ``hidden / heads``.

Every weight the tool may touch belongs to one :class:`WeightGroup` kind (:data:`GROUP_KINDS`): weights
that read one input (Q/K/V; the MLP's gate and up) form one group, so one input basis or one set of
calibration statistics can serve them. :meth:`ArchSpec.weight_groups` gives an architecture's groups as
module paths; :data:`ONNX_NAMES` says how the onnxruntime-genai builder and this tool's grafts name the
same groups in a graph (optimum's names are the module paths, see :func:`optimum_node_pattern`).
Adding a weight kind is a new entry here plus its numerics; adding an architecture is one ArchSpec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UnsupportedArchitectureError


GROUP_KINDS = ("embedding", "attention.qkv", "attention.o", "mlp.in", "mlp.out", "lm_head")
ATTENTION_KINDS = ("attention.qkv", "attention.o")


@dataclass(frozen=True)
class WeightGroup:
    """Weights of one kind that share an input (or are one weight): ``members`` are module paths relative
    to a decoder layer when ``per_layer``, else to the ``*ForCausalLM`` model (embedding, lm_head)."""

    kind: str  # one of GROUP_KINDS
    members: tuple[str, ...]
    per_layer: bool = True

    @property
    def shares_input(self) -> bool:
        """Several weights read one input (Q/K/V, gate/up): one input basis can serve them all."""
        return len(self.members) > 1


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
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # read the layer's MLP input (SwiGLU gate, up)
    mlp_out: str = "mlp.down_proj"
    embedding: str = "model.embed_tokens"  # the token table (tied to the lm_head when the config says so)
    lm_head: str = "lm_head"

    def weight_groups(self) -> tuple[WeightGroup, ...]:
        """Every weight group of the architecture, in :data:`GROUP_KINDS` order."""
        qkv = (self.fused_qkv,) if self.fused_qkv else (self.q, self.k, self.v)
        return (WeightGroup("embedding", (self.embedding,), per_layer=False),
                WeightGroup("attention.qkv", tuple(f"{self.attention}.{m}" for m in qkv)),
                WeightGroup("attention.o", (f"{self.attention}.{self.o}",)),
                WeightGroup("mlp.in", self.mlp_in),
                WeightGroup("mlp.out", (self.mlp_out,)),
                WeightGroup("lm_head", (self.lm_head,), per_layer=False))


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
                 rotary="none", uses_position_ids=False, mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
                 embedding="transformer.wte"),
        ArchSpec("opt", "model.decoder.layers", "self_attn", o="out_proj", rotary="none", mlp_in=("fc1",),
                 mlp_out="fc2", embedding="model.decoder.embed_tokens"),
        ArchSpec("gptj", "transformer.h", "attn", o="out_proj", rotary="partial", mlp_in=("mlp.fc_in",),
                 mlp_out="mlp.fc_out", embedding="transformer.wte"),
        # q/k norms (olmo2: over the full projected width), soft-capping, sliding-window layers, NoPE
        # layers and scaled embeddings live in the original forward, which the compressed modules wrap
        ArchSpec("gemma2", "model.layers", "self_attn"),
        ArchSpec("gemma3_text", "model.layers", "self_attn"),
        # nn.Linear rows Q | K | V; one gate_up_proj (rows gate | up)
        ArchSpec("phi3", "model.layers", "self_attn", fused_qkv="qkv_proj", mlp_in=("mlp.gate_up_proj",)),
        ArchSpec("granite", "model.layers", "self_attn"),
        ArchSpec("olmo2", "model.layers", "self_attn"),
        ArchSpec("smollm3", "model.layers", "self_attn"),
    )
}


# How graphs name each group's nodes, below ``.../layers.{i}/`` (per-layer kinds) or at the top: the
# onnxruntime-genai builder's names (whatever the architecture) and this tool's grafted blocks
# (graft.py writes ``.../attn/lestd/qkv/...`` and ``.../attn/lestd/o/...``).
ONNX_NAMES: dict[str, tuple[str, ...]] = {
    "embedding": ("model/embed_tokens",),
    "attention.qkv": ("attn/qkv_proj", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/lestd/qkv"),
    "attention.o": ("attn/o_proj", "attn/dense", "attn/lestd/o"),
    "mlp.in": ("mlp/gate_proj", "mlp/up_proj", "mlp/gate_up_proj", "mlp/fc1"),
    "mlp.out": ("mlp/down_proj", "mlp/fc2"),
    "lm_head": ("lm_head",),
}


def optimum_node_pattern(spec: ArchSpec, member: str, per_layer: bool = True) -> str:
    """Regex of the node-name prefix a TorchScript (optimum) export gives a module (group 1: the layer): its
    path with ``/`` separators, e.g. ``^/model/layers\\.(\\d+)/mlp/gate_proj/``; a leading ``model/`` may be
    absent (OPT's export names ``/decoder/layers.N/...``). ``member`` is relative to a decoder layer when
    ``per_layer``, else to the model."""
    parts = (spec.layers_path.split(".") + ["#"] if per_layer else []) + (member.split(".") if member else [])
    pattern = ""
    for i, part in enumerate(parts):
        if part == "#":
            pattern += r"\.(\d+)"
        elif i == 0 and part == "model" and len(parts) > 1:
            pattern += "(?:/model)?"
        else:
            pattern += "/" + re.escape(part)
    return "^" + pattern + "/"


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
