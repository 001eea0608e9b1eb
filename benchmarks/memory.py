"""Peak RSS of one long prompt pass (issue 18: a 6,000-token prompt must stay <= 1.5 GB on SmolLM2 fp32).

Each setting runs in its own process (peak RSS is per process): the runtime's default (LM head on the last
position, prompt in chunks of PREFILL_CHUNK tokens), and the old behaviour for comparison (logits for every
position, one pass). Prints a Markdown table and writes JSON.

    python benchmarks/memory.py --model-dir out/smollm2 --tokens 6000 --out benchmarks/results/memory_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": "last-position logits, prompt in chunks (runtime default)",
    "one-pass": "last-position logits, one pass (no chunking)",
    "all-logits": "logits for every position, one pass (before issue 18)",
}


def run_setting(model_dir: Path, tokens: int, setting: str, chunk: int | None, shrink: bool, arena: bool) -> dict:
    import numpy as np
    import onnxruntime as ort

    from unskill.runtime import session as session_module

    if setting != "default":
        session_module.PREFILL_CHUNK = 1 << 30
    elif chunk:
        session_module.PREFILL_CHUNK = chunk
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    model = session_module.OnnxLM(model_dir, device="cpu", options=options)
    if not shrink or not arena:
        model.prompt_run_options = None
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, tokens)).astype(np.int64)
    start = time.perf_counter()
    logits, past, _ = model.forward(ids, np.ones_like(ids), model.empty_past(1), all_logits=setting == "all-logits")
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": rss_loaded,
            "prompt_s": seconds, "logits_shape": list(logits.shape)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--chunk", type=int, help="prompt tokens per forward (default: the runtime's PREFILL_CHUNK)")
    parser.add_argument("--no-shrink", action="store_true", help="keep the arena's growth after prompt passes")
    parser.add_argument("--no-arena", action="store_true", help="session without onnxruntime's CPU memory arena")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(run_setting(args.model_dir, args.tokens, args.setting, args.chunk, not args.no_shrink,
                                     not args.no_arena)))
        return 0
    results = {}
    for setting in args.settings.split(","):
        cmd = [sys.executable, __file__, "--setting", setting, "--model-dir", str(args.model_dir),
               "--tokens", str(args.tokens), *(["--chunk", str(args.chunk)] if args.chunk else []),
               *(["--no-shrink"] if args.no_shrink else []), *(["--no-arena"] if args.no_arena else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{setting} failed (rc {done.returncode}):\n{done.stderr[-1500:]}", file=sys.stderr)
            continue
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{args.tokens}-token prompt, one forward, {args.model_dir}\n")
    print("| setting | peak RSS MB | after load MB | prompt s |")
    print("|---|---|---|---|")
    for setting, r in results.items():
        print(f"| {SETTINGS[setting]} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {r['prompt_s']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"tokens": args.tokens, "model_dir": str(args.model_dir), "results": results,
                                        "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
