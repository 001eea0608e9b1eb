"""Fused (`unskill edit fuse`) against unfused export: nodes onnxruntime runs per step, decode tok/s, ids.

    python benchmarks/fused.py out/smollm2 out/smollm2-fused [more fused copies] --new-tokens 128 --runs 5 --threads 2

Node count = the graph onnxruntime actually runs (ORT_ENABLE_ALL, as the runtime loads it, saved with
optimized_model_filepath). Decode runs are interleaved (A B C A B C ...) so load drift hits both alike; the
bound is measured bandwidth / weight bytes per token (tied head counted) of the unfused export.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

from decode import PROMPT, decode_rate, memory_bandwidth_gbs, weight_bytes_per_token

from unskill.runtime import GenerationParams, load


def runtime_node_counts(model_dir: Path) -> Counter:
    import onnx
    import onnxruntime as ort

    manifest = json.loads((model_dir / "unskill.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(scratch) / "run.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "run.data")
        options.log_severity_level = 3
        ort.InferenceSession(str(model_dir / manifest["model_file"]), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def key_output_error(unfused: Path, fused: Path, token_ids: list[int]) -> float:
    """Largest |fused - unfused| / max|unfused| over logits and every key.N / preact.N / key_last.N of one
    prompt pass in plain onnxruntime (no past: an empty KV cache)."""
    import numpy as np
    import onnxruntime as ort

    outputs = []
    for directory in (unfused, fused):
        session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        ids = np.array([token_ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in session.get_inputs():
            if i.name == "position_ids":
                feeds[i.name] = np.arange(ids.shape[1])[None]
            elif i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        names = [o.name for o in session.get_outputs() if not o.name.startswith("present.")]
        outputs.append(dict(zip(names, session.run(names, feeds))))
    return max(float(np.abs(outputs[1][n] - outputs[0][n]).max() / np.abs(outputs[0][n]).max())
               for n in outputs[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("unfused", type=Path)
    parser.add_argument("fused", nargs="+", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dirs = {"unfused": args.unfused, **{str(d): d for d in args.fused}}
    nodes = {name: runtime_node_counts(d) for name, d in dirs.items()}
    generators = {name: load(d, device="cpu", threads=args.threads) for name, d in dirs.items()}
    params = GenerationParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    ids = {name: g.generate([PROMPT], params)[0].token_ids for name, g in generators.items()}   # also warm-up
    errors = {name: key_output_error(args.unfused, d, ids["unfused"]) for name, d in dirs.items()}
    rates = {name: [] for name in dirs}
    probes = []   # one bandwidth probe per round: the bound is the best the box gave during the run, so a probe
    for _ in range(args.runs):   # that lands on a busy moment cannot inflate the shares (one probe read 31-47 GB/s)
        for name, generator in generators.items():
            rates[name].append(decode_rate(generator, [PROMPT], args.new_tokens))
        probes.append(memory_bandwidth_gbs())
    bandwidth = max(probes)
    bound = bandwidth * 1e9 / weight_bytes_per_token(args.unfused)
    identical = all(ids[name] == ids["unfused"] for name in dirs)
    print(f"bandwidth {bandwidth:.1f} GB/s, bound {bound:.1f} tok/s, threads {args.threads or 'all'}, "
          f"ids identical over {args.new_tokens} tokens: {identical}")
    print("| graph | nodes/step | decode tok/s (median) | vs unfused | share of bound | key outputs max rel. error |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(rates["unfused"])
    summary = {"bandwidth_gbs": bandwidth, "bandwidth_probes_gbs": probes, "bound_tok_s": bound, "threads": args.threads,
               "ids_identical": identical, "graphs": {}}
    for name in dirs:
        median = statistics.median(rates[name])
        total = sum(nodes[name].values())
        summary["graphs"][name] = {"dir": str(dirs[name]), "nodes": total, "ops": dict(nodes[name].most_common()),
                                   "decode_tok_s": median, "runs": rates[name],
                                   "key_outputs_max_rel_error": errors[name]}
        print(f"| {name} | {total} | {median:.1f} | {median / base:.2f}x | {median / bound:.0%} | {errors[name]:.1e} |")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
