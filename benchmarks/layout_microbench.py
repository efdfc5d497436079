"""Layout micro-benchmarks behind the ONNX layout of the compressed attention (README, Performance).

Each case builds small ONNX graphs with ``onnx.helper`` that chain ``--layers`` copies of one
attention-projection pattern with distinct random weights, and times them in ONNX Runtime (CPU,
``--threads``) for a decode step (N = 1 token) and a prefill (N = 128 tokens), the variants of a case
interleaved A/B over ``--repeats`` runs (medians). SmolLM2 sizes: d = 576, d_h = 64, R1 = 209-252.

- ``u1_transpose``: the output side ``latent [N, R1] @ U1^T`` with ``U1 [d, R1]`` stored once:
  ``Gemm(transB=1)`` / ``FusedMatMul(transB=1)`` vs transposing the activations around a
  left-operand ``MatMul(U1, latent^T)`` vs storing a second, transposed copy of ``U1``.
- ``pruned_rows``: a pruned group of 9 heads keeping 150 of 252 core rows: rows shared by the group
  (leading-axis Gather of ``Z^T`` + one ``Gemm(transA=1)``) vs rows per head (Gather + batched
  per-head MatMul, weight on the left or right, leading or innermost gather axis) vs a dense core.
- ``qkv_merge``: three MatMuls ``Z @ W_q/W_k/W_v`` vs one merged MatMul split per group.

Usage: python benchmarks/layout_microbench.py [--threads 2] [--repeats 25] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

D, DH, HEADS = 576, 64, 9


def _model(nodes, inits, inputs, output):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def u1_transpose(form: str, layers: int, rng) -> bytes:
    from onnx import helper as h, numpy_helper as nh

    r1, nodes, inits, cur = 207, [], [], "x"
    for i in range(layers):
        u1 = (rng.standard_normal((D, r1)) * 0.05).astype(np.float32)
        inits.append(nh.from_array(u1, f"u{i}"))
        nodes.append(h.make_node("MatMul", [cur, f"u{i}"], [f"z{i}"]))  # input side: Z = X U1
        if form == "gemm_transB":
            nodes.append(h.make_node("Gemm", [f"z{i}", f"u{i}"], [f"o{i}"], transB=1))
        elif form == "fusedmatmul_transB":
            nodes.append(h.make_node("FusedMatMul", [f"z{i}", f"u{i}"], [f"o{i}"], domain="com.microsoft", transB=1))
        elif form == "left_operand":
            nodes += [h.make_node("Transpose", [f"z{i}"], [f"zt{i}"], perm=[1, 0]),
                      h.make_node("MatMul", [f"u{i}", f"zt{i}"], [f"ot{i}"]),
                      h.make_node("Transpose", [f"ot{i}"], [f"o{i}"], perm=[1, 0])]
        elif form == "second_copy":
            inits.append(nh.from_array(np.ascontiguousarray(u1.T), f"ut{i}"))
            nodes.append(h.make_node("MatMul", [f"z{i}", f"ut{i}"], [f"o{i}"]))
        cur = f"o{i}"
    return _model(nodes, inits, [("x", [None, D])], cur)


def pruned_rows(form: str, layers: int, rng) -> bytes:
    from onnx import helper as h, numpy_helper as nh

    r1, k, nodes, inits = 252, 150, [], []

    def const(name, array):
        inits.append(nh.from_array(np.asarray(array), name))
        return name

    const("heads_k_n", np.array([HEADS, k, -1], np.int64))
    const("n_heads_k", np.array([-1, HEADS, k], np.int64))
    const("n_cols", np.array([-1, HEADS * DH], np.int64))
    if form in ("shared_gemm", "per_head_left", "per_head_right"):
        nodes.append(h.make_node("Transpose", ["z"], ["zt"], perm=[1, 0]))
    for i in range(layers):
        if form == "shared_gemm":
            const(f"r{i}", np.sort(rng.choice(r1, k, replace=False)).astype(np.int64))
            const(f"b{i}", rng.standard_normal((k, HEADS * DH)).astype(np.float32))
            nodes += [h.make_node("Gather", ["zt", f"r{i}"], [f"p{i}"], axis=0),
                      h.make_node("Gemm", [f"p{i}", f"b{i}"], [f"o{i}"], transA=1)]
        elif form == "dense_core":
            const(f"b{i}", rng.standard_normal((r1, HEADS * DH)).astype(np.float32))
            nodes.append(h.make_node("MatMul", ["z", f"b{i}"], [f"o{i}"]))
        else:  # rows per head, batched per-head MatMul
            rows = np.sort(np.stack([rng.choice(r1, k, replace=False) for _ in range(HEADS)]), 1).reshape(-1)
            const(f"r{i}", rows.astype(np.int64))
            if form == "per_head_left":
                const(f"b{i}", rng.standard_normal((HEADS, DH, k)).astype(np.float32))
                nodes += [h.make_node("Gather", ["zt", f"r{i}"], [f"p{i}"], axis=0),
                          h.make_node("Reshape", [f"p{i}", "heads_k_n"], [f"q{i}"]),
                          h.make_node("MatMul", [f"b{i}", f"q{i}"], [f"m{i}"]),  # [h, d_h, N]
                          h.make_node("Transpose", [f"m{i}"], [f"t{i}"], perm=[2, 0, 1])]
            elif form == "per_head_right":
                const(f"b{i}", rng.standard_normal((HEADS, k, DH)).astype(np.float32))
                nodes += [h.make_node("Gather", ["zt", f"r{i}"], [f"p{i}"], axis=0),
                          h.make_node("Reshape", [f"p{i}", "heads_k_n"], [f"q{i}"]),
                          h.make_node("Transpose", [f"q{i}"], [f"qt{i}"], perm=[0, 2, 1]),
                          h.make_node("MatMul", [f"qt{i}", f"b{i}"], [f"m{i}"]),  # [h, N, d_h]
                          h.make_node("Transpose", [f"m{i}"], [f"t{i}"], perm=[1, 0, 2])]
            else:  # per_head_inner: gather along the innermost axis of Z
                const(f"b{i}", rng.standard_normal((HEADS, k, DH)).astype(np.float32))
                nodes += [h.make_node("Gather", ["z", f"r{i}"], [f"p{i}"], axis=1),
                          h.make_node("Reshape", [f"p{i}", "n_heads_k"], [f"q{i}"]),
                          h.make_node("Transpose", [f"q{i}"], [f"qt{i}"], perm=[1, 0, 2]),
                          h.make_node("MatMul", [f"qt{i}", f"b{i}"], [f"m{i}"]),
                          h.make_node("Transpose", [f"m{i}"], [f"t{i}"], perm=[1, 0, 2])]
            nodes.append(h.make_node("Reshape", [f"t{i}", "n_cols"], [f"o{i}"]))
    nodes.append(h.make_node("Concat", [f"o{i}" for i in range(layers)], ["y"], axis=1))
    return _model(nodes, inits, [("z", [None, r1])], "y")


def qkv_merge(form: str, layers: int, rng) -> bytes:
    from onnx import helper as h, numpy_helper as nh

    r1, widths, nodes, inits, outs = 209, (HEADS * DH, 3 * DH, 3 * DH), [], [], []
    if form == "merged_split":
        inits.append(nh.from_array(np.array(widths, np.int64), "widths"))
    for i in range(layers):
        names = [f"o{i}_{j}" for j in range(3)]
        if form == "three_matmuls":
            for j, cols in enumerate(widths):
                inits.append(nh.from_array(rng.standard_normal((r1, cols)).astype(np.float32), f"w{i}_{j}"))
                nodes.append(h.make_node("MatMul", ["z", f"w{i}_{j}"], [names[j]]))
        else:
            inits.append(nh.from_array(rng.standard_normal((r1, sum(widths))).astype(np.float32), f"w{i}"))
            nodes += [h.make_node("MatMul", ["z", f"w{i}"], [f"m{i}"]),
                      h.make_node("Split", [f"m{i}", "widths"], names, axis=-1)]
        outs += names
    nodes.append(h.make_node("Concat", outs, ["y"], axis=-1))
    return _model(nodes, inits, [("z", [None, r1])], "y")


CASES = {
    "u1_transpose": (u1_transpose, ["gemm_transB", "fusedmatmul_transB", "left_operand", "second_copy"], D, 100),
    "pruned_rows": (pruned_rows, ["shared_gemm", "per_head_left", "per_head_right", "per_head_inner", "dense_core"],
                    252, 100),
    "qkv_merge": (qkv_merge, ["three_matmuls", "merged_split"], 209, 60),
}


def run_case(name: str, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    build, forms, width, layers = CASES[name]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    sessions = {f: ort.InferenceSession(build(f, layers, np.random.default_rng(0)), options,
                                        providers=["CPUExecutionProvider"]) for f in forms}
    result = {"layers": layers}
    for tokens in (1, 128):
        feed = np.ones((tokens, width), np.float32)
        times = {f: [] for f in forms}
        for _ in range(repeats):
            for form, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {session.get_inputs()[0].name: feed})
                times[form].append(time.perf_counter() - start)
        result[f"tokens_{tokens}_ms"] = {f: round(float(np.median(t[3:])) * 1000, 3) for f, t in times.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "layout_microbench.json")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "onnxruntime": ort.__version__},
              "cases": {name: run_case(name, args.threads, args.repeats) for name in CASES}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, case in result["cases"].items():
        print(name, {k: v for k, v in case.items() if k != "layers"}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
