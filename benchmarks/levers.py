"""Decode levers, one by one: each row changes one setting of the unskill runtime and is measured in the
same process against the default, interleaved, so the ratios hold on a noisy machine.

    python benchmarks/levers.py --model-dir out/smollm2 --stats gsm8k.npz --new-tokens 64 --rounds 3

Rows: the KV cache kept as OrtValues (default) or copied through NumPy each step; intra-op threads;
thread-pool spinning; graph optimization levels at load, and an offline-optimized copy saved once (as an
export step would) and loaded with optimizations off; the KSD guard fetching key_last (default) or the full
key output, at one layer or all. Columns: session load, time to first token at a short and a long prompt,
decode tok/s (median over rounds), each as a ratio to the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from decode import PROMPT, decode_rate

from unskill.runtime import GenerationParams, Generator, KSDGuard, OnnxLM, TextTokenizer, load_stats

LONG_PROMPT = " ".join([PROMPT] * 40)   # about 1,000 tokens with SmolLM2's tokenizer
GUARD_ALPHA = 0.3   # small cubes: the guard checks every step at full cost and never ends a run early


def options(level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads=0, spinning=True, save_to=None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if save_to:   # the optimized graph with weights of its own beside it
        opts.optimized_model_filepath = str(save_to)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      Path(save_to).name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return opts


class NumpyKV(OnnxLM):
    """What a plain session.run loop does: the KV cache leaves onnxruntime as NumPy and goes back in."""

    def forward(self, *args, **kwargs):
        logits, past, extras = super().forward(*args, **kwargs)
        past = {name: ort.OrtValue.ortvalue_from_numpy(value.numpy()) for name, value in past.items()}
        return logits, past, extras


class FullKeyGuard(KSDGuard):
    """The guard as it was before key_last: it fetches key.{i}, every position of the prompt."""

    def __init__(self, stats, manifest, layers=None):
        super().__init__(stats, manifest, GUARD_ALPHA, layers=layers)
        chosen = sorted({cube.layer for cube in self.cubes})
        self.output_names = [manifest.key_outputs[i] for i in chosen]
        self._output_of_layer = {i: manifest.key_outputs[i] for i in chosen}


def build_variants(model_dir: Path, stats_paths: list[str], scratch: Path):
    """name -> zero-argument factory of (Generator, load seconds)."""
    def make(model_cls=OnnxLM, opts=None, path=None, guard=None, layers=None):
        def factory():
            start = time.perf_counter()
            model = model_cls(model_dir, device="cpu", options=opts, path=path)
            load_s = time.perf_counter() - start
            tokenizer = TextTokenizer(model_dir, model.manifest)
            stats = [load_stats(p, model.manifest) for p in stats_paths]
            checker = guard(stats, model.manifest, layers) if guard else None
            return Generator(model, tokenizer, checker), load_s
        return factory

    offline = scratch / "optimized.onnx"
    manifest = OnnxLM(model_dir, device="cpu", options=options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                                                save_to=offline)).manifest
    all_layers = list(range(manifest.num_layers))
    return {
        "default (KV as OrtValues, ORT_ENABLE_ALL, all cores, spinning)": make(),
        "KV cache through NumPy each step": make(NumpyKV),
        "1 intra-op thread": make(opts=options(threads=1)),
        "spinning off": make(opts=options(spinning=False)),
        "ORT_ENABLE_EXTENDED": make(opts=options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)),
        "ORT_ENABLE_BASIC": make(opts=options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)),
        "ORT_DISABLE_ALL": make(opts=options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)),
        "offline-optimized (EXTENDED, saved), loaded with DISABLE_ALL":
            make(opts=options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), path=offline),
        "KSD guard, 1 layer, key_last output (default)": make(guard=_guard),
        "KSD guard, 1 layer, full key output": make(guard=FullKeyGuard),
        "KSD guard, all layers, key_last outputs": make(guard=_guard, layers=all_layers),
    }


class TimedGuard(KSDGuard):
    """The guard with a stopwatch on its check: the one thing it adds per step (key_last is computed by the
    graph whether fetched or not, and fetching one (B, F) vector is a copy of a few kilobytes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds, self.calls = 0.0, 0

    def check(self, last_keys, mask=None):   # the runtime passes the attention mask for multi-position rules
        start = time.perf_counter()
        hits = super().check(last_keys, mask)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return hits


def _guard(stats, manifest, layers=None):
    return TimedGuard(stats, manifest, GUARD_ALPHA, layers=layers)


def ttft(generator: Generator, prompt: str, repeats: int = 3) -> float:
    params = GenerationParams(max_new_tokens=1, ignore_eos=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = generator.generate([prompt], params)[0]
        times.append(time.perf_counter() - start)
        assert not result.abstained, "the benchmark prompts must not be refused"
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--stats", action="append", default=[], help="one stats file for the guard rows")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        variants = build_variants(args.model_dir, args.stats[:1], Path(scratch))
        if not args.stats:
            variants = {k: v for k, v in variants.items() if not k.startswith("KSD")}
        loaded = {name: factory() for name, factory in variants.items()}
        rates = {name: [] for name in variants}
        for _ in range(args.rounds):   # interleaved: drift hits every row alike
            for name, (generator, _) in loaded.items():
                rates[name].append(decode_rate(generator, [PROMPT], args.new_tokens))
        rows = {}
        for name, (generator, load_s) in loaded.items():
            rows[name] = {"load_s": load_s, "ttft_s": ttft(generator, PROMPT),
                          "ttft_long_s": ttft(generator, LONG_PROMPT, 2),
                          "decode_tok_s": statistics.median(rates[name])}
            if isinstance(generator.guard, TimedGuard) and generator.guard.calls:
                per_check = generator.guard.seconds / generator.guard.calls
                rows[name]["check_us"] = per_check * 1e6
                rows[name]["check_share"] = per_check * rows[name]["decode_tok_s"]

    long_tokens = len(next(iter(loaded.values()))[0].tokenizer.encode_prompt(LONG_PROMPT))
    base = next(iter(rows.values()))
    print(f"{args.new_tokens} new tokens, median of {args.rounds} interleaved rounds; TTFT at "
          f"{len(next(iter(loaded.values()))[0].tokenizer.encode_prompt(PROMPT))} and {long_tokens} prompt tokens\n")
    print("| setting | load s | TTFT s | TTFT long s | vs default | decode tok/s | vs default | guard check |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['load_s']:.2f} | {r['ttft_s']:.3f} | {r['ttft_long_s']:.2f} | "
              f"{r['ttft_long_s'] / base['ttft_long_s']:.2f}x | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
              + (f"{r['check_us']:.0f} us = {r['check_share']:.2%} of a step |" if "check_us" in r else " |"))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "new_tokens": args.new_tokens, "rounds": args.rounds,
                                        "long_prompt_tokens": long_tokens, "date": time.strftime("%Y-%m-%d")},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
