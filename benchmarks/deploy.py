"""Decode speed of a full export against its deploy folder (`unskill edit slim`), in the unskill runtime and in
optimum's ORTModelForCausalLM loading each folder as it is; one process per engine holding both folders, runs
interleaved (full, deploy, full, deploy, ...) so drift in machine load hits both alike; same prompt, greedy,
EOS masked, token ids compared.

    python benchmarks/deploy.py out/smollm2 out/smollm2-deploy --new-tokens 128 --runs 3 --out deploy.json
    python benchmarks/deploy.py out/deploy-untied out/deploy --labels untied,tied --engines unskill   # any two folders

A folder that carries its guard in the graph runs unguarded here (graph_guard=False: no refusal on the prompt), but
onnxruntime still computes its guard nodes every step, so their cost is in the figure.

optimum fetches every graph output at every step on CPU (no IO binding), so the full export's 90
`key.*`/`preact.*` [B, S, ffn] outputs cost it copies the deploy folder does not have; the runtime fetches
only what it asks for, but onnxruntime still computes every output's nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from decode import PROMPT, timed

from unskill.runtime import GenerationParams, load


def engine(name: str, folder: Path):
    generator = load(folder, device="cpu", graph_guard=False)
    prompt_ids = generator.tokenizer.encode_prompt(PROMPT)
    if name == "unskill":
        return lambda n: generator.generate([PROMPT], GenerationParams(max_new_tokens=n, ignore_eos=True))[0].token_ids
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider")
    inputs = torch.tensor([prompt_ids])

    def generate(n):
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate


def data_mb(folder: Path) -> float:
    """Size of the folder's external weight files (model.onnx.data, onnx/model.onnx_data)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.name.endswith(("onnx.data", "onnx_data"))) / 1e6


def interleaved(generators: dict, new_tokens: int, runs: int) -> dict:
    """TTFT = a 1-token generate, decode tok/s = (N - 1) / (T_N - TTFT), medians over runs, folders alternating."""
    import statistics

    samples = {label: {"ttft": [], "total": []} for label in generators}
    ids = {}
    for generate in generators.values():
        generate(4)   # warm-up: session start, arenas, caches
    for _ in range(runs):
        for label, generate in generators.items():
            samples[label]["ttft"].append(timed(lambda: generate(1))[0])
            total, ids[label] = timed(lambda: generate(new_tokens))
            samples[label]["total"].append(total)
    result = {}
    for label, sample in samples.items():
        ttft, total = statistics.median(sample["ttft"]), statistics.median(sample["total"])
        result[label] = {"ttft_s": ttft, "decode_tok_s": (new_tokens - 1) / max(total - ttft, 1e-9),
                         "ids": [int(i) for i in ids[label]]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("full", type=Path, help="folder written by `unskill export` / `unskill edit`")
    parser.add_argument("deploy", type=Path, help="its `unskill edit slim` folder")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default="unskill,optimum")
    parser.add_argument("--labels", default="full,deploy", help="names of the two folders in the table")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        generators = {"full": engine(args.child, args.full), "deploy": engine(args.child, args.deploy)}
        result = interleaved(generators, args.new_tokens, args.runs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0
    results = {}
    for name in args.engines.split(","):
        cmd = [sys.executable, __file__, str(args.full), str(args.deploy), "--new-tokens", str(args.new_tokens),
               "--runs", str(args.runs), "--child", name]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        child = json.loads(done.stdout.strip().splitlines()[-1])
        for label in ("full", "deploy"):
            results[f"{name} {label}"] = child[label]
            print(f"{name} {label}: {child[label]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    base = results.get("unskill full")
    print(f"\n{args.new_tokens} new tokens, greedy, median of {args.runs} interleaved runs\n")
    labels = dict(zip(("full", "deploy"), args.labels.split(",")))
    print(f"| engine | folder | decode tok/s | vs same engine, {labels['full']} | vs unskill {labels['full']} | TTFT s "
          "| ids match |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, label = key.split()
        own = results.get(f"{name} full")
        same = base is not None and r["ids"] == base["ids"]
        print(f"| {name} | {labels[label]} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / own['decode_tok_s']:.2f}x | "
              f"{r['decode_tok_s'] / base['decode_tok_s'] if base else float('nan'):.2f}x | {r['ttft_s']:.3f} | {same} |")
    if args.out:
        summary = {"results": {k: {kk: vv for kk, vv in v.items() if kk != "ids"} for k, v in results.items()},
                   "new_tokens": args.new_tokens, "runs": args.runs, "full": str(args.full),
                   "deploy": str(args.deploy), "labels": args.labels, "date": time.strftime("%Y-%m-%d"),
                   "cpu_count": os.cpu_count(), "data_mb": {label: data_mb(folder) for label, folder in
                                                            zip(args.labels.split(","), (args.full, args.deploy))}}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
