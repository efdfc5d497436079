"""What one more weight MatMul costs against what half the attention bytes save, in int4 decode (issue 10).

The onnxruntime-genai builder's int4 model of the default model is rewritten into timing probes with its own
weights, and every probe is timed against it in one process: decode steps (one token, a KV cache of
``--past`` tokens, ``--threads`` intra-op threads), ``--rounds`` rounds in a fresh random order each, ratios
taken within a round, medians and quartiles over rounds (this machine's per-round noise is +-5%).

- ``split_qkv``: each layer's packed Q/K/V ``MatMulNBits`` split into two along its outputs (+ ``Concat``):
  the same weights, bytes and outputs, one more weight call per layer (checked: the same logits).
- ``half_bytes``: each Q/K/V and output projection reads only the first half of its input blocks (a ``Slice``
  in front): half the attention weight bytes with no extra weight call, what any attention compression at
  size fraction 0.5 could at best save. Its outputs are not the model's: a timing probe only.
- ``slice_only``: the same Slices keeping every block (the model's function): what the Slices themselves cost,
  so that ``half_bytes / slice_only`` is the ceiling without them.
- any ``DIR`` given: a grafted model (``lestd-export export --format genai --quantize int4``) timed alike.

Usage: python benchmarks/genai_call_cost.py [DIR ...] [--rounds 200] [--past 128] [--threads 2]
       [--out benchmarks/results/genai_call_cost.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lestd_export.bench import machine_info
from lestd_export.export import initializer_sizes
from lestd_export.genai import decoder, decoder_file, genai_baselines


def _initializers(graph) -> dict:
    return {init.name: init for init in graph.initializer}


def _replace(graph, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(tensor)
            return name
    graph.initializer.append(tensor)
    return name


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _set_attr(node, name: str, value: int) -> None:
    next(a for a in node.attribute if a.name == name).i = value


def _attention_nodes(graph, kinds: tuple[str, ...]) -> list:
    return [n for n in graph.node if n.op_type == "MatMulNBits" and any(f"/attn/{k}/" in n.name for k in kinds)]


def split_qkv(model) -> None:
    """Each packed Q/K/V MatMulNBits becomes two (output halves) and a Concat: same function, one more call."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    nodes = []
    targets = {n.name for n in _attention_nodes(graph, ("qkv_proj",))}
    for node in graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        weight, scales = (numpy_helper.to_array(inits[i]) for i in node.input[1:3])
        scales = scales.reshape(weight.shape[0], -1)  # [N, blocks] (also when stored flat)
        n = _attr(node, "N")
        halves = []
        for part, rows in enumerate((slice(0, n // 2), slice(n // 2, n))):
            inputs = [node.input[0], _replace(graph, f"{node.input[1]}.{part}", weight[rows]),
                      _replace(graph, f"{node.input[2]}.{part}", scales[rows])]
            clone = helper.make_node("MatMulNBits", inputs,
                                     [f"{node.output[0]}.{part}"], name=f"{node.name}.{part}", domain=node.domain)
            clone.attribute.extend(node.attribute)
            _set_attr(clone, "N", rows.stop - rows.start)
            nodes.append(clone)
            halves.append(clone.output[0])
        nodes.append(helper.make_node("Concat", halves, [node.output[0]], name=f"{node.name}.concat", axis=-1))
    _swap_nodes(graph, nodes)


def half_bytes(model) -> None:
    """Q/K/V and output projections read the first half of their K blocks (Slice + MatMulNBits of K/2)."""
    _sliced_inputs(model, keep_blocks=lambda blocks: blocks // 2)


def slice_only(model) -> None:
    """The same Slice in front of each Q/K/V and output projection, keeping all of K: what the Slices cost."""
    _sliced_inputs(model, keep_blocks=lambda blocks: blocks)


def _sliced_inputs(model, keep_blocks) -> None:
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    targets = {n.name for n in _attention_nodes(graph, ("qkv_proj", "o_proj", "q_proj", "k_proj", "v_proj"))}
    nodes = []
    for node in graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        weight, scales = (numpy_helper.to_array(inits[i]) for i in node.input[1:3])
        blocks = keep_blocks(weight.shape[1])
        k = min(blocks * _attr(node, "block_size"), _attr(node, "K"))
        ends = _replace(graph, f"{node.name}.ends", np.array([k], dtype=np.int64))
        starts = _replace(graph, f"{node.name}.starts", np.array([0], dtype=np.int64))
        axes = _replace(graph, f"{node.name}.axes", np.array([-1], dtype=np.int64))
        sliced = f"{node.name}.half_input"
        nodes.append(helper.make_node("Slice", [node.input[0], starts, ends, axes], [sliced], name=f"{node.name}.slice"))
        _replace(graph, node.input[1], weight[:, :blocks])
        _replace(graph, node.input[2], scales.reshape(weight.shape[0], -1)[:, :blocks])
        node.input[0] = sliced
        _set_attr(node, "K", k)
        nodes.append(node)
    _swap_nodes(graph, nodes)


def _swap_nodes(graph, nodes: list) -> None:
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    for index in reversed([i for i, init in enumerate(graph.initializer) if init.name not in used]):
        del graph.initializer[index]


def write_probe(source: Path, rewrite, out: Path) -> Path:
    import onnx

    model = onnx.load(str(source))
    rewrite(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out / "model.onnx"


class DecodeStep:
    """One ONNX Runtime session fed one decode step: a new token after ``past`` cached ones."""

    def __init__(self, path: Path, threads: int, past: int, kv_heads: int, head_size: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        self.feeds = {"input_ids": np.array([[42]], dtype=np.int64),
                      "attention_mask": np.ones((1, past + 1), dtype=np.int64)}
        for spec in self.session.get_inputs():
            if spec.name.startswith("past_key_values"):
                self.feeds[spec.name] = rng.standard_normal((1, kv_heads, past, head_size)).astype(np.float32)

    def logits(self) -> np.ndarray:
        return self.session.run(["logits"], self.feeds)[0]

    def time_ms(self, steps: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            self.session.run(None, self.feeds)
        start = time.perf_counter()
        for _ in range(steps):
            self.session.run(None, self.feeds)
        return (time.perf_counter() - start) / steps * 1e3


def attention_weight_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {i for n in model.graph.node if "/attn/" in n.name and n.op_type == "MatMulNBits" for i in n.input[1:]}
    return sum(size for name, size in initializer_sizes(model).items() if name in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path, help="grafted onnxruntime-genai directories to time too")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25, help="decode steps per variant and round")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/genai_call_cost.json"))
    args = parser.parse_args()
    import onnx

    dense_dir = genai_baselines(None, precisions=("int4",))[0]
    dense = decoder_file(dense_dir)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"builder-int4": dense,
                 "split_qkv": write_probe(dense, split_qkv, Path(tmp) / "split"),
                 "slice_only": write_probe(dense, slice_only, Path(tmp) / "slice"),
                 "half_bytes": write_probe(dense, half_bytes, Path(tmp) / "half")}
        paths.update({d.name: decoder_file(d) for d in args.dirs})
        config = decoder(dense_dir)
        steps = {name: DecodeStep(path, args.threads, args.past, config["num_key_value_heads"], config["head_size"])
                 for name, path in paths.items()}
        reference = steps["builder-int4"].logits()
        same_function = {name: float(np.max(np.abs(steps[name].logits() - reference)))
                         for name in ("split_qkv", "slice_only")}
        layers = len(_attention_nodes(onnx.load(str(dense), load_external_data=False).graph, ("o_proj",)))
        attention_bytes = {name: attention_weight_bytes(path) for name, path in paths.items()}
        times = {name: [] for name in paths}
        for _ in range(args.rounds):
            order = list(paths)
            random.shuffle(order)
            for name in order:
                times[name].append(steps[name].time_ms(args.steps))
    base = np.array(times["builder-int4"])
    variants = {}
    for name, ms in times.items():
        ratio = base / np.array(ms)
        variants[name] = {"step_ms_median": float(np.median(ms)), "speedup_median": float(np.median(ratio)),
                          "speedup_q25": float(np.percentile(ratio, 25)), "speedup_q75": float(np.percentile(ratio, 75)),
                          "attention_weight_bytes": attention_bytes[name]}
    step = variants["builder-int4"]["step_ms_median"]
    result = {
        "machine": machine_info("cpu", args.threads),
        "protocol": {"rounds": args.rounds, "steps_per_round": args.steps, "past_tokens": args.past,
                     "threads": args.threads, "ratio": "dense step time / variant step time, within each round"},
        "layers": layers, "max_logit_difference": same_function, "variants": variants,
        "derived": {
            "extra_weight_call_us": (1 / variants["split_qkv"]["speedup_median"] - 1) * step * 1e3 / layers,
            "half_attention_bytes_saving_us_per_layer":
                (1 - 1 / variants["half_bytes"]["speedup_median"]) * step * 1e3 / layers,
            "slices_cost_us_per_layer": (1 / variants["slice_only"]["speedup_median"] - 1) * step * 1e3 / layers,
            "ceiling_speedup_at_half_attention_bytes": variants["half_bytes"]["speedup_median"],
            "ceiling_speedup_without_the_slices":
                variants["half_bytes"]["speedup_median"] / variants["slice_only"]["speedup_median"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"variants": variants, "derived": result["derived"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
