"""`unskill stats` on a Ray actor pool against one process: wall time of the KSD prompt pass and the NA/SP text
pass (the work `unskill stats --retain` does) for 1 and 2 actors of 1 CPU each, on a local cluster.

    .venv/bin/python benchmarks/ray_scaling.py --model /work/cache/smollm2 --prompts 96 [--actors 1 2]

Every configuration probes the same prompts; the script checks that the stats equal the single-process file
(counts exact, sums within 1e-12 of their magnitude) and writes benchmarks/results/ray_scaling_<model>.json.
Times include each pool's start (actors load the model; one pool per pass) but not the cluster's start,
reported apart. Configurations run interleaved, --rounds times; the median is reported with the load average
before each run (the box is shared: figures are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def probe_once(model_dir: str, forget, retain, options=None, threads: int | None = None):
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.stats.probe import ProbeConfig, probe

    config = ProbeConfig(progress=False)
    prober = None
    if options is None:
        model = OnnxLM(model_dir, device="cpu", threads=threads)
    else:
        from unskill.cluster.jobs import DriverModel, ray_prober
        model = DriverModel(model_dir)
    tokenizer = TextTokenizer(model_dir, model.manifest)
    if options is not None:
        prober = ray_prober(model, tokenizer, config, options)
    start = time.perf_counter()
    stats = probe(model, tokenizer, forget, retain, config, prober=prober)
    return time.perf_counter() - start, stats


def same_stats(a, b) -> bool:
    for name, moments in a.groups.items():
        other = b.groups[name]
        if not np.array_equal(moments.count, other.count):
            return False
        for field in moments.fields:
            x, y = moments.values[field], other.values[field]
            if not np.allclose(y, x, rtol=1e-12, atol=1e-12 * np.abs(x).max()):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/cache/smollm2")
    parser.add_argument("--prompts", type=int, default=96, help="forget and retain items each (builtin math / code)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every configuration")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray

    from unskill.cluster.pool import RayOptions
    from unskill.stats.datasets import load_dataset

    forget = load_dataset("builtin:math", None, args.prompts)
    retain = load_dataset("builtin:code", None, args.prompts)
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster_start = time.perf_counter() - start
    configs = [("one process, 1 thread", 0, 1), (f"one process, {args.cpus} threads", 0, args.cpus)]
    configs += [(f"ray, {n} actor(s) x 1 CPU", n, 1) for n in args.actors]
    runs, reference = [], None
    for round_ in range(args.rounds):   # interleaved: the shared box's load drifts between rounds
        for label, actors, threads in configs:
            load = os.getloadavg()[0]
            options = RayOptions(actors=actors, progress=False) if actors else None
            seconds, stats = probe_once(args.model, forget, retain, options, threads)
            reference = stats if reference is None else reference   # the first one-process run
            runs.append({"config": label, "actors": actors, "threads": threads, "round": round_,
                         "seconds": seconds, "load_before": load, "equal_to_one_process": same_stats(reference, stats)})
            print(f"round {round_} {label}: {seconds:.1f} s (load {load:.1f})", flush=True)
    ray.shutdown()
    rows = []
    for label, actors, threads in configs:
        times = sorted(r["seconds"] for r in runs if r["config"] == label)
        rows.append({"config": label, "actors": actors, "threads": threads, "median_s": float(np.median(times)),
                     "runs_s": times, "prompts_per_s": 2 * args.prompts / float(np.median(times)),
                     "equal_to_one_process": all(r["equal_to_one_process"] for r in runs if r["config"] == label)})
    one_actor = next((r["median_s"] for r in rows if r["actors"] == 1), None)
    print("| config | median s | prompts/s (forget+retain) | vs 1 actor | stats equal |\n|---|---|---|---|---|")
    for row in rows:
        row["speedup_vs_1_actor"] = one_actor / row["median_s"] if one_actor else None
        print(f"| {row['config']} | {row['median_s']:.1f} | {row['prompts_per_s']:.2f} | "
              f"{row['speedup_vs_1_actor']:.2f}x | {row['equal_to_one_process']} |")
    print(f"cluster start: {cluster_start:.1f} s")
    name = Path(args.model).resolve().name
    out = Path(args.out or Path(__file__).parent / "results" / f"ray_scaling_{name}.json")
    out.write_text(json.dumps({
        "model": name, "prompts": args.prompts, "passes": "KSD prompt pass + NA/SP text pass, forget and retain",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs "
                   "(figures are noisy)",
        "cluster_start_s": cluster_start, "rows": rows, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
