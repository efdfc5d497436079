"""A whole-file byte target for a decoder graph (``quantize --target-mb``): every weight MatMul gets its own storage
(int2/int4/int8 at a block size, or SVD-LLM low-rank factors in int4) chosen for the least predicted loss within the
target: each option's calibration output error (:mod:`~lestd_export.numerics.budget`) times the KL per unit output
error measured for its weight (:mod:`.sensitivity`). :func:`weigh_options` does the expensive part (independent of the
target, cacheable: :class:`WeighedOptions`), :func:`choose_plan` the choice, :func:`apply_plan` writes the chosen
factorisations into the graph, and :func:`~lestd_export.quantize_graph.quantize_graph` stores each weight as planned.

What is not a weight MatMul keeps its bytes: norms and biases stay fp32, a token table its
:class:`~lestd_export.quantize_graph.QuantizeConfig` head storage (tied to the lm_head: the lm_head's plan, stored
once). The planned bytes are the stored tensors' bytes exactly (tested) plus a reservation for the file's graph, so
the written file is at most the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InvalidConfigError
from ..quantize_graph import (BLOCK_SIZES, QuantizeConfig, head_weights, table_config, token_tables,
                              transposed, weight_matmuls, weight_of)

BODY_STORAGE = tuple((bits, block) for bits in (2, 4, 8) for block in (32, 64, 128))  # every weight's choices
PROBES = ("round", "low_rank")  # the kinds of error a weight's prices are measured for
HEAD_BITS = (4, 8)  # a tied lm_head shares its codes with the token lookup (GatherBlockQuantized: 4 or 8 bits)


@dataclass(frozen=True)
class BudgetRequest:
    """A whole-file target: ``target_bytes`` of the written file; ``low_rank`` also offers SVD-LLM factors;
    ``cache`` a JSON file keeping the weighed options (:class:`WeighedOptions`: they do not depend on the target) for
    the next request on the same model and calibration."""

    target_bytes: int
    low_rank: bool = True
    cache: str | None = None

    def __post_init__(self):
        if not (isinstance(self.target_bytes, int) and self.target_bytes > 0):
            raise InvalidConfigError(f"--target-mb must be a positive size, got {self.target_bytes!r} bytes")


@dataclass
class PlannedWeight:
    """One weight MatMul's plan: its node, weight, kind and layer (from the registry's node names), the options
    it had and the one chosen."""

    node: str
    weight: str
    kind: str
    layer: int | None
    shape: tuple[int, int]
    energy: float  # tr(W^T C W): its mean squared output
    options: list = field(default_factory=list)
    chosen: int = 0
    prices: dict = field(default_factory=dict)  # what a unit of output error costs, per kind of error (PROBES)

    def loss(self, option) -> float:
        """The option's share of the plan's objective: its output error at the price of its kind of error."""
        return option.error * self.prices.get("low_rank" if option.rank is not None else "round", 0.0)

    @property
    def option(self):
        return self.options[self.chosen]

    def to_dict(self) -> dict:
        return {"node": self.node, "kind": self.kind, "layer": self.layer, "shape": list(self.shape),
                **self.option.to_dict(), "relative_error": self.option.error / max(self.energy, 1e-30),
                "prices": self.prices, "predicted_loss": self.loss(self.option)}

    def state(self) -> dict:
        """Everything but the choice, as JSON (:meth:`WeighedOptions.save`)."""
        return {"node": self.node, "weight": self.weight, "kind": self.kind, "layer": self.layer,
                "shape": list(self.shape), "energy": self.energy, "prices": self.prices,
                "options": [[o.bits, o.block_size, o.rank, o.bytes, o.error] for o in self.options]}

    @classmethod
    def from_state(cls, state: dict) -> PlannedWeight:
        from ..numerics.budget import StorageOption

        return cls(state["node"], state["weight"], state["kind"], state["layer"], tuple(state["shape"]),
                   state["energy"], [StorageOption(*o) for o in state["options"]], prices=state["prices"])


@dataclass
class WeighedOptions:
    """Every weight's options with their errors and prices, and the bytes no choice changes: the expensive part of a
    plan, independent of the target (``key`` says which model, calibration and settings it was measured for)."""

    weights: list[PlannedWeight]
    objective: str
    fixed_bytes: int  # norms, biases, an untied token table, the graph: what the plan does not choose
    graph_bytes: int  # of which reserved for the file's graph (nodes and tensor records)
    key: dict

    def save(self, path: str | Path) -> None:
        from ..io import write_json

        write_json(Path(path), {"key": self.key, "objective": self.objective, "fixed_bytes": self.fixed_bytes,
                                "graph_bytes": self.graph_bytes, "weights": [w.state() for w in self.weights]})

    @classmethod
    def load(cls, path: str | Path, key: dict) -> WeighedOptions | None:
        """The options saved at ``path`` when measured for ``key`` (low-rank options may serve a request without
        them), else None (also for a file that is not such a cache: it is measured again and overwritten)."""
        import json

        path = Path(path)
        try:
            data = json.loads(path.read_text())
            saved = data["key"]
            if {k: v for k, v in saved.items() if k != "low_rank"} != {k: v for k, v in key.items()
                                                                      if k != "low_rank"} \
                    or (key["low_rank"] and not saved.get("low_rank")):
                return None
            return cls([PlannedWeight.from_state(w) for w in data["weights"]], data["objective"],
                       data["fixed_bytes"], data["graph_bytes"], saved)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass
class BudgetPlan(WeighedOptions):
    """Every weight's storage (its ``chosen`` option) within ``target_bytes``."""

    target_bytes: int = 0

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + sum(w.option.bytes for w in self.weights)

    def report(self) -> dict:
        """The allocation: totals, bytes and storage per kind, and every weight's choice."""
        kinds: dict[str, dict] = {}
        for w in self.weights:
            entry = kinds.setdefault(w.kind, {"bytes": 0, "storage": {}})
            entry["bytes"] += w.option.bytes
            entry["storage"][w.option.name] = entry["storage"].get(w.option.name, 0) + 1
        return {"target_bytes": self.target_bytes, "planned_bytes": self.planned_bytes,
                "fixed_bytes": self.fixed_bytes, "graph_bytes": self.graph_bytes,
                "factored": sum(w.option.rank is not None for w in self.weights), "objective": self.objective,
                "predicted_loss": sum(w.loss(w.option) for w in self.weights), "by_kind": kinds,
                "weights": [w.to_dict() for w in self.weights]}


def weigh_options(model, grams: dict[str, np.ndarray], config: QuantizeConfig, *, low_rank: bool = True,
                  model_type: str | None = None, measure=None, key: dict | None = None,
                  progress: bool = True) -> WeighedOptions:
    """Every weight MatMul's options (bytes; errors from the calibration ``grams``, keyed by the MatMul input), with
    low-rank factors among them when ``low_rank``, and its prices: ``measure(weights, probes)`` returns them
    (:func:`~.sensitivity.loss_prices`: the KL per unit output error of each weight stored as its coarsest int4
    option, ``round``, and as its largest low-rank option, ``low_rank``); without it, ``1 / output energy``
    (relative errors). Raises :class:`~lestd_export.errors.InvalidConfigError` for a weight without statistics."""
    from tqdm.auto import tqdm

    from ..export import initializer_sizes
    from ..numerics.budget import storage_options
    from ..numerics.quantize import stored_bytes
    from ..registry import REGISTRY
    from ..weights import classify_node, node_rules

    initializers = {init.name: init for init in model.graph.initializer}
    matmuls = weight_matmuls(model)
    tables = token_tables(model)
    heads = head_weights(model, matmuls)
    tied = {name for _, _, name in tables} & {m.input[1] for m in matmuls}
    rules = node_rules(REGISTRY.get(model_type or ""))
    fixed = 0
    for _, transpose, name in tables:
        if name not in tied:  # an untied table: stored as the head config says, not planned
            table = table_config(initializers[name], transpose is None, config.head)
            vocab, width = (initializers[name].dims if transpose is None else initializers[name].dims[::-1])
            fixed += stored_bytes(int(width), int(vocab), table.bits, table.block_size)
        fixed += 16 + (4 * int(min(initializers[name].dims)) if name in tied else 0)  # its lookup's shape, 1/s
    planned_names = {m.input[1] for m in matmuls} | {name for _, _, name in tables}
    fixed += sum(size for name, size in initializer_sizes(model).items() if name not in planned_names)
    # the file's graph: nodes and tensor records (names, shapes, data offsets) about double when every weight gets
    # codes and scales, so twice the fp32 graph's is reserved (SmolLM2: 342 kB reserved, 217 kB written)
    graph = 2 * (sum(node.ByteSize() for node in model.graph.node)
                 + sum(init.ByteSize() - len(init.raw_data) for init in model.graph.initializer))

    weights, seen = [], set()
    for node in tqdm(matmuls, desc="storage options", unit="weight", disable=not progress):
        if node.input[1] in seen:
            continue  # a weight two MatMuls read is planned (and stored) once
        seen.add(node.input[1])
        if node.input[0] not in grams:
            raise InvalidConfigError(f"no calibration statistics for {node.name}'s input: --target-mb needs them")
        weight, gram = weight_of(node, initializers), grams[node.input[0]]  # [K, N], [K, K]
        if node.input[1] in tied:  # its codes are the token lookup's too: 4 or 8 bits, whole blocks of the width
            width = weight.shape[0]
            storage = tuple((b, s) for b in HEAD_BITS for s in BLOCK_SIZES[1:4] if width % s == 0)
            options = storage_options(weight, gram, storage, low_rank=())
        else:
            options = storage_options(weight, gram, BODY_STORAGE, **({} if low_rank else {"low_rank": ()}))
        kind, layer = classify_node(node.name, rules) or ("lm_head" if node.input[1] in heads else "other", None)
        weights.append(PlannedWeight(node.name, node.input[1], kind, layer, weight.shape,
                                     float(np.einsum("kn,kn->", weight, gram @ weight)), options))
    if measure is None:
        for w in weights:
            w.prices = dict.fromkeys(PROBES, 1.0 / max(w.energy, 1e-30))
    else:
        measured = measure([w.weight for w in weights], _probes(model, weights, grams))
        for w in weights:
            w.prices = {label: measured[(w.weight, label)] for label in PROBES if (w.weight, label) in measured}
    objective = ("sum of relative calibration output errors" if measure is None else
                 "predicted KL: each option's calibration output error times its weight's measured KL per unit "
                 "output error (of rounding, or of low-rank truncation)")
    return WeighedOptions(weights, objective, fixed + graph, graph, {**(key or {}), "low_rank": low_rank})


def choose_plan(weighed: WeighedOptions, request: BudgetRequest) -> BudgetPlan:
    """The options (low-rank ones only when ``request.low_rank``) of least summed loss (each option's output error
    at its price) whose file fits ``request.target_bytes``. Raises
    :class:`~lestd_export.errors.InvalidConfigError` for a target below the smallest file the options can make."""
    from ..numerics.budget import choose_options

    weights = [PlannedWeight(w.node, w.weight, w.kind, w.layer, w.shape, w.energy, w.options, prices=w.prices)
               for w in weighed.weights]
    allowed = [[j for j, o in enumerate(w.options) if request.low_rank or o.rank is None] for w in weights]
    try:
        choice = choose_options([[w.options[j] for j in js] for w, js in zip(weights, allowed)],
                                request.target_bytes - weighed.fixed_bytes,
                                [[w.loss(w.options[j]) for j in js] for w, js in zip(weights, allowed)])
    except ValueError as error:
        smallest = weighed.fixed_bytes + sum(min(w.options[j].bytes for j in js) for w, js in zip(weights, allowed))
        raise InvalidConfigError(f"--target-mb {request.target_bytes / 1e6:.1f} is below the smallest file this plan "
                                 f"can make ({smallest / 1e6:.1f} MB): raise it ({error})") from None
    for w, js, j in zip(weights, allowed, choice):
        w.chosen = js[j]
    return BudgetPlan(weights, weighed.objective, weighed.fixed_bytes, weighed.graph_bytes, weighed.key,
                      request.target_bytes)


def _probe_options(w: PlannedWeight) -> dict[str, object]:
    """The options whose stored values probe a weight's prices: its coarsest 4-bit rounding, its largest low rank."""
    rounded = [o for o in w.options if o.rank is None and o.bits == 4]
    factored = [o for o in w.options if o.rank is not None]
    found = {"round": max(rounded, key=lambda o: o.block_size)} if rounded else {}
    if factored:
        found["low_rank"] = max(factored, key=lambda o: o.rank)
    return found


def _probes(model, weights: list[PlannedWeight], grams: dict[str, np.ndarray]):
    """``probes(initializer)`` for :func:`~.sensitivity.loss_prices`: ``(label, perturbed value, output error)`` of
    each :func:`_probe_options` option, in the initializer's layout."""
    from ..numerics.budget import stored_values

    initializers = {init.name: init for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    by_weight = {w.weight: w for w in weights}

    def probes(name: str):
        w = by_weight[name]
        node = nodes[w.node]
        weight, gram = weight_of(node, initializers), grams[node.input[0]]
        for label, option in _probe_options(w).items():
            values = stored_values(weight, gram, option)
            yield label, values.T if transposed(node) else values, option.error

    return probes


def apply_plan(model, plan: BudgetPlan, grams: dict[str, np.ndarray], config: QuantizeConfig
               ) -> dict[str, QuantizeConfig]:
    """Write the plan's factorisations into ``model`` (``x @ W`` -> ``(x @ A) @ B``, fp32 factors; ``grams`` gains
    ``A^T C A`` for each new intermediate) and return the storage of every weight and factor by initializer name,
    for :func:`~lestd_export.quantize_graph.quantize_graph`."""
    from onnx import numpy_helper

    from ..graft import factored_product
    from ..numerics.budget import low_rank_factors
    from ..onnx_sites import replace_nodes

    initializers = {init.name: init for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    configs, replaced = {}, {}
    for w in plan.weights:
        option = w.option
        storage = replace(config, bits=option.bits, block_size=option.block_size, head_bits=None)
        if option.rank is None:
            configs[w.weight] = storage
            continue
        node = nodes[w.node]
        gram = grams[node.input[0]]
        a, b = low_rank_factors(weight_of(node, initializers), gram, option.rank)  # [K, r], [r, N]
        names = (f"{w.weight}/low_rank_a", f"{w.weight}/low_rank_b")
        model.graph.initializer.extend([numpy_helper.from_array(a.astype(np.float32), names[0]),
                                        numpy_helper.from_array(b.astype(np.float32), names[1])])
        replaced[w.node] = factored_product(node, *names)
        middle = replaced[w.node][0].output[0]
        grams[middle] = a.T @ gram @ a
        configs.update(dict.fromkeys(names, storage))
    replace_nodes(model.graph, replaced)
    return configs
