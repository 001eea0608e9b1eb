"""Per-MatMul time of onnxruntime's MatMulNBits CPU kernels by zero-point kind, bits and accuracy level.

    python benchmarks/matmulnbits.py --k 576 --n 1536 --threads 1

One token (M = 1), a chain of 20 MatMulNBits [K -> N] (a Slice back to K between them), median over rounds.
Why it exists: exact int4 for Q4_1/Q4_K weights needs a non-integer zero point per block; the op accepts
float zero points, but this measures whether MLAS has a fast kernel for them (exporter/grid.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

VARIANTS = (("4-bit, default zero point", 4, None), ("4-bit, uint8 zero points", 4, "uint8"),
            ("4-bit, float zero points", 4, "float"), ("8-bit, default zero point", 8, None))


def chain(k: int, n: int, bits: int, zero_points: str | None, level: int, block: int = 32, count: int = 20):
    rng = np.random.default_rng(0)
    blocks = k // block
    inits = [numpy_helper.from_array(np.array(v, np.int64), name)
             for name, v in (("start", [0]), ("end", [k]), ("axis", [2]))]
    nodes, previous = [], "x"
    for i in range(count):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), f"q{i}"),
                  numpy_helper.from_array((rng.random(n * blocks) * 0.01 + 0.001).astype(np.float32), f"s{i}")]
        inputs = [previous, f"q{i}", f"s{i}"]
        if zero_points == "uint8":
            size = n * ((blocks * bits + 7) // 8)
            inits.append(numpy_helper.from_array(rng.integers(0, 256, size, dtype=np.uint8), f"z{i}"))
            inputs.append(f"z{i}")
        elif zero_points == "float":
            inits.append(numpy_helper.from_array((rng.random(n * blocks) * 15).astype(np.float32), f"z{i}"))
            inputs.append(f"z{i}")
        nodes += [helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", K=k, N=n, bits=bits,
                                   block_size=block, accuracy_level=level),
                  helper.make_node("Slice", [f"y{i}", "start", "end", "axis"], [f"x{i}"])]
        previous = f"x{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    x = np.random.default_rng(1).standard_normal((1, 1, args.k)).astype(np.float32)
    times: dict[tuple, list] = {}
    for _ in range(args.rounds):
        for label, bits, zero_points in VARIANTS:
            for level in (0, 4):
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                model = chain(args.k, args.n, bits, zero_points, level).SerializeToString()
                session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
                for _ in range(10):
                    session.run(None, {"x": x})
                calls = 100
                start = time.perf_counter()
                for _ in range(calls):
                    session.run(None, {"x": x})
                times.setdefault((label, level), []).append((time.perf_counter() - start) / calls / 20 * 1e6)
    print(f"| MatMulNBits [{args.k} -> {args.n}], block 32 | accuracy level 0 (fp32) us | level 4 (int8) us |")
    print("|---|---|---|")
    for label, _, _ in VARIANTS:
        print(f"| {label} | {statistics.median(times[(label, 0)]):.1f} | {statistics.median(times[(label, 4)]):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
