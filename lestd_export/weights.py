"""The map of every weight: which group kind (:data:`~.registry.GROUP_KINDS`) each stored tensor belongs to,
where it is, its shape, its bytes and how it is stored, for a PyTorch model and for an ONNX graph alike.

Both maps come from the registry's data (module paths, the genai builder's and the grafts' node names,
optimum's module-path node names); every stored byte lands in exactly one entry, and what no group claims
(norms, rotary caches, biases of unknown modules) is ``other``, so the totals are the file's own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .registry import GROUP_KINDS, ONNX_NAMES, REGISTRY, ArchSpec, optimum_node_pattern

OTHER = "other"
KINDS = (*GROUP_KINDS, OTHER)
LAYER_NODE = re.compile(r"^/?(?:model/)?layers\.(\d+)/(.*)$")  # the genai builder's (and optimum's llama) nodes


@dataclass
class WeightSite:
    """One weight (a module's parameters, or one weight node's initializers) of a group kind."""

    kind: str  # one of KINDS
    layer: int | None  # decoder layer, or None for the embedding, the lm_head and unclaimed tensors
    name: str  # module path (PyTorch) or node name (ONNX)
    tensors: list[str]  # parameter or initializer names
    shapes: list[list[int]]
    bytes: int
    storage: str  # e.g. "fp32", "int4 MatMulNBits block 32", "lestd (compressed)"


@dataclass
class WeightMap:
    """Every stored weight of a model file or module, by group kind."""

    format: str  # "pytorch", "compressed checkpoint", "optimum", "onnxruntime-genai", "onnx"
    precision: str  # the weights' storage: "fp32", "int4", "mixed (fp32, int4)", ...
    architecture: str | None  # config.model_type
    layers: int | None
    sites: list[WeightSite] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        """Bytes per kind (every kind present, ``other`` last); their sum is :attr:`total_bytes`."""
        totals = dict.fromkeys(KINDS, 0)
        for site in self.sites:
            totals[site.kind] += site.bytes
        return totals

    @property
    def total_bytes(self) -> int:
        return sum(site.bytes for site in self.sites)

    def storages(self) -> dict[str, list[str]]:
        """Per kind, the distinct storages of its sites (what is already compressed or quantised)."""
        found: dict[str, list[str]] = {}
        for site in self.sites:
            if site.storage not in found.setdefault(site.kind, []):
                found[site.kind].append(site.storage)
        return found

    def to_dict(self) -> dict:
        return {"format": self.format, "precision": self.precision, "architecture": self.architecture,
                "layers": self.layers, "total_bytes": self.total_bytes, "bytes": self.totals(),
                "storage": self.storages(), "sites": [asdict(site) for site in self.sites]}


PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "int2", "uint8")
# what a compressed MLP weight, token table or lm_head module keeps under its path (modules.FactoredLinear,
# FactoredEmbedding, TTLinear)
TT_PARTS = (".first.", ".second.", ".sparse_")
FACTORED_PARTS = (".table.", ".basis.", ".expand.", *TT_PARTS)


def _precision(storages: list[str]) -> str:
    """One storage name (``fp32``, ``int4``...) or ``mixed (...)``, from the sites' storages."""
    kinds = list(dict.fromkeys(word for s in storages for word in s.split()[:1] if word in PRECISIONS))
    return kinds[0] if len(kinds) == 1 else f"mixed ({', '.join(kinds)})" if kinds else "unknown"


# ---------------------------------------------------------------------------------------------- PyTorch


def torch_weight_map(model, format: str = "pytorch") -> WeightMap:
    """The map of a transformers ``*ForCausalLM`` (dense or rewritten by ``compress``): parameters and
    buffers that are stored (``state_dict``), a tied tensor counted once, under the first kind claiming it."""
    from .registry import spec_for

    spec = spec_for(model.config)
    state = model.state_dict()
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0) or None
    seen: dict[tuple, str] = {}
    by_site: dict[tuple, WeightSite] = {}
    for name, tensor in state.items():
        kind, layer, site, compressed = classify_parameter(spec, name)
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:  # tied weights (lm_head = embedding) are stored once
            if seen[key] != kind:
                by_site[(kind, layer, site)] = WeightSite(kind, layer, site, [name], [list(tensor.shape)], 0,
                                                          f"tied to {seen[key]}")
            continue
        seen[key] = kind
        storage = (("lestd (compressed)" if kind.startswith("attention") else
                    "tt cores" if any(part in name for part in TT_PARTS) else
                    "low-rank factors") if compressed
                   else _short_dtype(str(tensor.dtype).removeprefix("torch.")))
        entry = by_site.setdefault((kind, layer, site), WeightSite(kind, layer, site, [], [], 0, storage))
        entry.tensors.append(name)
        entry.shapes.append(list(tensor.shape))
        entry.bytes += tensor.numel() * tensor.element_size()
    sites = list(by_site.values())
    return WeightMap(format, _precision([s.storage for s in sites if s.kind != OTHER]), spec.model_type, layers,
                     sites)


def classify_parameter(spec: ArchSpec, name: str) -> tuple[str, int | None, str, bool]:
    """``(kind, layer, module path, compressed)`` of a state-dict entry; compressed attention (``compress``'s
    modules under the attention module) counts as attention: ``attention.o`` where it names the output
    projection; a factored MLP weight (``member.basis``/``member.expand``, TT cores ``member.first``/``member.second``
    and sparse residual), token table or lm_head as its member's kind."""
    for group in spec.weight_groups():
        if not group.per_layer:
            for member in group.members:
                if name.startswith(member + "."):  # a factored table or lm_head: member.table/.basis/.expand
                    return group.kind, None, member, name.startswith(tuple(member + p for p in FACTORED_PARTS))
    match = re.match(re.escape(spec.layers_path) + r"\.(\d+)\.(.*)$", name)
    if match is None:
        return OTHER, None, name.rsplit(".", 1)[0], False
    layer, rest = int(match.group(1)), match.group(2)
    for group in spec.weight_groups():
        for member in group.members:
            if group.per_layer and rest.startswith(member + "."):  # factored MLP weights: member.basis/.expand
                factored = rest.startswith(tuple(member + p for p in FACTORED_PARTS))
                return group.kind, layer, f"{spec.layers_path}.{layer}.{member}", factored
    if rest.startswith(spec.attention + "."):  # compressed modules replace the projections
        kind = "attention.o" if f".{spec.o}." in rest or rest.endswith(f".{spec.o}") else "attention.qkv"
        module = rest.rsplit(".", 1)[0]
        return kind, layer, f"{spec.layers_path}.{layer}.{module}", True
    return OTHER, layer, f"{spec.layers_path}.{layer}.{rest.rsplit('.', 1)[0]}", False


# ------------------------------------------------------------------------------------------------- ONNX


def node_rules(spec: ArchSpec | None) -> list[tuple[re.Pattern, str, bool]]:
    """``(node-name pattern, kind, per layer)`` from optimum's module paths (longest first)."""
    rules = []
    if spec is not None:
        for group in spec.weight_groups():
            for member in group.members:
                rules.append((re.compile(optimum_node_pattern(spec, member, group.per_layer)), group.kind,
                              group.per_layer))
    return sorted(rules, key=lambda rule: -len(rule[0].pattern))


def classify_node(name: str, rules: list[tuple[re.Pattern, str, bool]]) -> tuple[str, int | None] | None:
    """The group kind and layer of a weight node, by optimum's names or the genai builder's / the grafts'."""
    for pattern, kind, per_layer in rules:
        if match := pattern.match(name):
            return kind, int(match.group(1)) if per_layer else None
    match = LAYER_NODE.match(name)
    layer, rest = (int(match.group(1)), match.group(2)) if match else (None, name.lstrip("/"))
    for kind, fragments in ONNX_NAMES.items():
        if any(rest == f or rest.startswith(f + "/") for f in fragments):
            return kind, layer
    return None


def _node_storage(node, initializers: dict) -> str:
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return f"int{attributes.get('bits', 4)} MatMulNBits block {attributes.get('block_size')}"
    if node.op_type == "GatherBlockQuantized":
        return f"int{attributes.get('bits', 4)} GatherBlockQuantized block {attributes.get('block_size')}"
    weights = [initializers[i] for i in node.input if i in initializers]
    return _dtype_name(weights[0]) if weights else "fp32"


def onnx_weight_map(model, format: str, architecture: str | None = None, layers: int | None = None) -> WeightMap:
    """The map of a decoder graph (loaded without external data): every initializer under the kind of the
    first weight node that reads it; grafted LeSTD/SVD blocks count as the attention kind they replace."""
    from .export import initializer_sizes

    sizes = initializer_sizes(model)
    initializers = {init.name: init for init in model.graph.initializer}
    rules = node_rules(REGISTRY.get(architecture or ""))
    claimed: dict[str, tuple[str, int | None, str, str]] = {}
    tied: list[WeightSite] = []  # a node reading another kind's tensors only (a tied lm_head): 0 bytes
    for node in model.graph.node:
        found = classify_node(node.name, rules)
        if found is None:
            continue
        storage = _node_storage(node, initializers)
        if "/lestd/" in node.name or "/svd/" in node.name:
            storage = f"lestd (compressed), {storage}"
        weights = [name for name in node.input if name in initializers]
        owners = {claimed[name][0] for name in weights if name in claimed}
        if weights and len(owners) == 1 and all(name in claimed for name in weights) and found[0] not in owners:
            tied.append(WeightSite(*found, node.name, weights, [[int(d) for d in initializers[w].dims]
                                                                 for w in weights], 0, f"tied to {owners.pop()}"))
        for name in weights:
            if name not in claimed:
                claimed[name] = (*found, node.name.rsplit("/", 1)[0], storage)  # the site: the node's module
    by_site: dict[tuple, WeightSite] = {}
    for name, init in initializers.items():
        kind, layer, site, storage = claimed.get(name, (OTHER, None, OTHER, _dtype_name(init)))
        entry = by_site.setdefault((kind, layer, site), WeightSite(kind, layer, site, [], [], 0, storage))
        if entry.storage in PRECISIONS and storage not in PRECISIONS:  # the codes' dtype < the quantised op
            entry.storage = storage
        entry.tensors.append(name)
        entry.shapes.append([int(d) for d in init.dims])
        entry.bytes += sizes[name]
    sites = list(by_site.values()) + tied
    return WeightMap(format, _precision([s.storage.removeprefix("lestd (compressed), ") for s in sites
                                         if s.kind != OTHER]), architecture, layers, sites)


def _short_dtype(name: str) -> str:
    """``fp32``, ``fp16``, ``bf16`` for numpy's / torch's float names, other names as they are."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


def _dtype_name(init) -> str:
    """The short name (:func:`_short_dtype`) of an initializer's element type."""
    from onnx import helper

    return _short_dtype(str(helper.tensor_dtype_to_np_dtype(init.data_type)))
