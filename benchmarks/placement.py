"""Thread placement and spinning of onnxruntime's intra-op pool on decode: every run's tok/s, so speed modes show.

    python benchmarks/placement.py out/smollm2 --new-tokens 64 --rounds 10 --threads 2

One session per setting in one process, decode runs interleaved (A B C, B C A, ...: each round starts one
setting later), a bandwidth probe and the CPU steal time after each round (the bound is the best probe, as in
fused.py). Settings: the runtime's default; a second session of it (the control: two identical
sessions have run 5-10 % apart, in either load order); the worker pinned to the other core
(session.intra_op_thread_affinities, as onnxruntime does when it picks the thread count itself); the calling
thread pinned (os.sched_setaffinity, applied around that setting's runs only); spinning off / longer /
stopped after each run; dynamic block sizing; onnxruntime's own thread count; the IO binding made anew every
step (how the runtime once bound them). --profile adds one row per setting: the share of a decode step spent
outside session.run (Python: feeds, IO binding, sampling, KV bookkeeping), median of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

from decode import PROMPT, decode_rate, memory_bandwidth_gbs, weight_bytes_per_token

from unskill.runtime import GenerationParams, Generator, OnnxLM, TextTokenizer

ALL_CPUS = frozenset(range(os.cpu_count() or 1))


def session_options(threads: int, **entries: str) -> ort.SessionOptions:
    """The runtime's default options (runtime/session.py) plus config entries."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return options


def settings(threads: int) -> dict[str, tuple[dict | None, set | None]]:
    """name -> (session config entries, or None for the runtime's own options; CPUs of the calling thread).
    Entries "threads": "0" leave the thread count to onnxruntime (physical cores, workers pinned by it);
    "runtime": "1" take the runtime's own options (its worker pinning included) with another change."""
    worker_cpus = ";".join(str(cpu + 1) for cpu in range(1, threads))   # 1-based logical processors
    return {
        "runtime default": (None, None),
        "runtime default, second session (control)": ({"runtime": "1"}, None),
        "worker pinned, caller free": ({"session.intra_op_thread_affinities": worker_cpus}, None),
        "worker pinned, caller pinned": ({"session.intra_op_thread_affinities": worker_cpus}, {0}),
        "caller pinned only": ({"runtime": "1"}, {0}),
        "spinning off": ({"session.intra_op.allow_spinning": "0"}, None),
        "spin 10 ms": ({"session.intra_op.spin_duration_us": "10000"}, None),
        "spin stop after run": ({"session.force_spinning_stop": "1"}, None),
        "dynamic block base 4": ({"session.dynamic_block_base": "4"}, None),
        "threads left to onnxruntime": ({"threads": "0"}, None),
        "IO binding made anew every step": ({"runtime": "1", "fresh_binding": "1"}, None),
    }


class FreshBinding(OnnxLM):
    """The control for IO binding reuse: every run binds all past and present tensors anew."""

    def _binding_for(self, feeds, present_names, fetched, past):
        return super()._binding_for(feeds, present_names, fetched, None)   # not kept on the buffer


def steal_share() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far (/proc/stat): time the hypervisor ran someone else."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return fields[7], sum(fields[:8])


class RunTimer:
    """Wraps a session's run_with_iobinding / run_with_ort_values to sum the seconds spent inside them."""

    def __init__(self, session):
        self.seconds, self.calls = 0.0, 0
        for name in ("run_with_iobinding", "run_with_ort_values"):
            setattr(session, name, self._timed(getattr(session, name)))

    def _timed(self, run):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return wrapper


def outside_run_share(generator: Generator, new_tokens: int) -> dict:
    """Wall time of the decode steps against the time inside onnxruntime's run: (T_N - T_1) both ways."""
    timer = RunTimer(generator.model.session)
    times = {}
    for n in (1, new_tokens):
        timer.seconds, timer.calls = 0.0, 0
        start = time.perf_counter()
        generator.generate([PROMPT], GenerationParams(max_new_tokens=n, ignore_eos=True))
        times[n] = (time.perf_counter() - start, timer.seconds)
    wall = times[new_tokens][0] - times[1][0]
    inside = times[new_tokens][1] - times[1][1]
    steps = new_tokens - 1
    return {"step_ms": wall / steps * 1e3, "run_ms": inside / steps * 1e3, "outside_share": 1 - inside / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="setting names separated by semicolons (default: all)")
    parser.add_argument("--profile", action="store_true", help="also the share of a step outside session.run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    chosen = settings(args.threads)
    if args.only:
        chosen = {name: chosen[name] for name in args.only.split(";")}
    generators, caller_cpus = {}, {}
    for name, (entries, cpus) in chosen.items():
        entries = dict(entries or {}) if entries is not None else None
        threads = int(entries.pop("threads", args.threads)) if entries is not None else args.threads
        model_cls = FreshBinding if entries and entries.pop("fresh_binding", None) else OnnxLM
        runtime_options = entries is None or entries.pop("runtime", None) or threads == 0
        options = None if runtime_options else session_options(threads, **entries)
        model = model_cls(args.model_dir, device="cpu", threads=threads or None, options=options)
        generators[name] = Generator(model, TextTokenizer(args.model_dir, model.manifest))
        caller_cpus[name] = cpus or ALL_CPUS
    params = GenerationParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    for generator in generators.values():   # warm-up
        generator.generate([PROMPT], params)

    rates = {name: [] for name in generators}
    probes, steal = [], []
    names = list(generators)
    for round_index in range(args.rounds):   # interleaved: drift and modes of the box hit every setting alike
        before = steal_share()
        start = round_index % len(names)   # rotated: no setting always runs first, right after the probe
        for name in names[start:] + names[:start]:
            generator = generators[name]
            os.sched_setaffinity(0, caller_cpus[name])
            time.sleep(0.05)   # the previous session's workers stop spinning
            rates[name].append(decode_rate(generator, [PROMPT], args.new_tokens))
            os.sched_setaffinity(0, ALL_CPUS)
        after = steal_share()
        steal.append((after[0] - before[0]) / max(after[1] - before[1], 1))
        probes.append(memory_bandwidth_gbs())
    profiles = {}
    if args.profile:
        for name, generator in generators.items():
            os.sched_setaffinity(0, caller_cpus[name])
            tries = [outside_run_share(generator, args.new_tokens) for _ in range(3)]
            profiles[name] = {key: statistics.median(t[key] for t in tries) for key in tries[0]}
            os.sched_setaffinity(0, ALL_CPUS)

    bandwidth = max(probes)
    bound = bandwidth * 1e9 / weight_bytes_per_token(args.model_dir)
    print(f"{args.model_dir}: bandwidth {bandwidth:.1f} GB/s (probes {min(probes):.1f}-{bandwidth:.1f}), "
          f"bound {bound:.1f} tok/s, threads {args.threads}, {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.2f}")
    print("per round: probe GB/s " + " ".join(f"{p:.0f}" for p in probes)
          + "; CPU steal " + " ".join(f"{x:.0%}" for x in steal) + "\n")
    print("| setting | median tok/s | share of bound | min-max | runs >= 85 % of bound | every run (tok/s) |")
    print("|---|---|---|---|---|---|")
    for name, runs in rates.items():
        median = statistics.median(runs)
        fast = sum(r >= 0.85 * bound for r in runs)
        print(f"| {name} | {median:.1f} | {median / bound:.0%} | {min(runs):.1f}-{max(runs):.1f} | "
              f"{fast}/{len(runs)} | {' '.join(f'{r:.0f}' for r in runs)} |")
    if profiles:
        print("\n| setting | step ms | inside session.run ms | outside run (Python) |\n|---|---|---|---|")
        for name, p in profiles.items():
            print(f"| {name} | {p['step_ms']:.2f} | {p['run_ms']:.2f} | {p['outside_share']:.1%} |")
    if args.out:
        args.out.write_text(json.dumps({
            "model_dir": str(args.model_dir), "threads": args.threads, "new_tokens": args.new_tokens,
            "bandwidth_gbs": bandwidth, "bandwidth_probes_gbs": probes, "steal_share": steal, "bound_tok_s": bound,
            "settings": {name: {"config": chosen[name][0], "caller_cpus": sorted(caller_cpus[name]),
                                "runs_tok_s": rates[name], "median_tok_s": statistics.median(rates[name]),
                                **profiles.get(name, {})} for name in generators},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": os.getloadavg()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
