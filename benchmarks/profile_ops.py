"""Where a decode step's time goes, per operator type: onnxruntime's own profiler over decode steps.

    python benchmarks/profile_ops.py out/smollm2-fused-q4 [--threads 1] [--steps 30] [--by-shape]

A 51-token prompt (random ids), then greedy decode steps with the KV cache; steps after the 6th are summed.
Prints wall ms per step, kernel us per step, nodes per step and the top operator types; --by-shape also splits
MatMulNBits by (K, N, bits, block) with us per node and the weight bytes it streams per second (how the thin
k/v projections were found costing as much per node as the wide ones). The profiler adds a few us per
node, so compare shares, not absolute times.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--by-shape", action="store_true", help="MatMulNBits time per (K, N, bits, block)")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    session = ort.InferenceSession(str(args.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs() if o.name == "logits" or o.name.startswith("present")]
    ids = np.random.default_rng(0).integers(100, 1000, (1, 51))
    past = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in inputs.items() if n.startswith("past")}
    length, warm = 0, 5
    for step in range(args.steps):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + ids.shape[1]), np.int64), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(length, length + ids.shape[1])[None]
        if "logits_to_keep" in inputs:
            feeds["logits_to_keep"] = np.array([1], np.int64)
        if step == warm:
            start = time.perf_counter()
        result = session.run(outputs, feeds)
        length += ids.shape[1]
        ids = np.array([[int(result[0][0, -1].argmax())]])
        past = {n.replace("present", "past_key_values"): v for n, v in zip(outputs[1:], result[1:])}
    steps = args.steps - warm
    print(f"wall ms/step {(time.perf_counter() - start) / steps * 1000:.1f}")
    profile = session.end_profiling()
    events = json.loads(Path(profile).read_text())
    os.remove(profile)
    first = [e for e in events if e.get("name") == "model_run"][warm]["ts"]
    kernels = kernel_events(events, first)
    total, count = collections.Counter(), collections.Counter()
    for _, op, micros in kernels:
        total[op] += micros
        count[op] += 1
    print(f"kernel us/step {sum(total.values()) / steps:.0f}, nodes/step {sum(count.values()) // steps}")
    for op, micros in total.most_common(12):
        print(f"  {op:34s} {micros / steps:8.0f} us {count[op] // steps:5d} nodes")
    if args.by_shape:
        print_matmulnbits_shapes(args.model_dir / "model.onnx", kernels, steps)
    return 0


def kernel_events(events: list, first: int) -> list[tuple[str, str, int]]:
    """(node name, operator, us) of every kernel the profiler timed from timestamp `first` on."""
    return [(event["name"].removesuffix("_kernel_time"), event["args"]["op_name"], event["dur"]) for event in events
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first]


def print_matmulnbits_shapes(graph_path: Path, kernels: list[tuple[str, str, int]], steps: int) -> None:
    import onnx

    shapes = {}
    for node in onnx.load(str(graph_path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            shapes[node.name] = tuple(attributes[k] for k in ("K", "N", "bits", "block_size"))
    total, count = collections.Counter(), collections.Counter()
    for name, _, micros in kernels:
        if name in shapes:
            total[shapes[name]] += micros
            count[shapes[name]] += 1
    print("  MatMulNBits by shape (K, N, bits, block):")
    for (k, n, bits, block), micros in total.most_common():
        per_node = micros / count[k, n, bits, block]
        print(f"    K={k:5d} N={n:6d} {bits}-bit/{block:<3d} {count[k, n, bits, block] // steps:4d} nodes/step "
              f"{micros / steps:7.0f} us/step {per_node:7.1f} us/node {k * n * bits / 8 / per_node / 1e3:5.1f} GB/s")


if __name__ == "__main__":
    raise SystemExit(main())
