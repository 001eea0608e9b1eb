"""Decode speed: unskill runtime (plain and KSD-guarded, fp32 and an int4 copy) vs HF transformers generate,
optimum ORTModelForCausalLM, onnxruntime-genai and llama.cpp (llama-cpp-python on the GGUF file the model
ships as), same prompt, greedy, same number of new tokens (EOS masked; token ids compared with unskill's).

Each engine runs in its own process so peak RSS is its own. Prints a table with ratios to unskill measured
in this run, and writes JSON.

    python benchmarks/decode.py --model-dir out/smollm2 --hf smollm2-135m --stats out/gsm8k.npz \
        --stats out/mbpp.npz --stats out/math.npz --new-tokens 128 --runs 3 --out benchmarks/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from unskill.runtime import GenerationParams

PROMPT = "Explain in a few sentences how a bicycle works, then list three ways to keep it in good condition."


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def decode_rate(generator, prompts: list[str], new_tokens: int, repeats: int = 1) -> float:
    """Generated tokens per second of an unskill Generator, all rows: batch * (N - 1) / (T_N - T_1), EOS
    masked. With repeats > 1 each time is a median, so prefill jitter at long prompts does not leak in."""
    def run(n):
        start = time.perf_counter()
        generator.generate(prompts, GenerationParams(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - start
    first = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new_tokens) for _ in range(repeats))
    return len(prompts) * (new_tokens - 1) / (total - first)


def measure(generate, new_tokens: int, runs: int) -> dict:
    """TTFT = time of a 1-token generate; decode tok/s = (N - 1) / (T_N - TTFT); medians over runs."""
    generate(4)   # warm-up: session start, memory arenas, caches
    ttfts, totals, ids = [], [], None
    for _ in range(runs):
        ttfts.append(timed(lambda: generate(1))[0])
        total, ids = timed(lambda: generate(new_tokens))
        totals.append(total)
    ttft, total = statistics.median(ttfts), statistics.median(totals)
    return {"ttft_s": ttft, "total_s": total, "decode_tok_s": (new_tokens - 1) / max(total - ttft, 1e-9),
            "ids": [int(i) for i in ids]}


def engine_unskill(args, stats):
    from unskill.runtime import load, load_stats

    # each file's stored rule where all have one, else the paper's cube (plain `unskill stats` files)
    rule = None if all(load_stats(path).guard for path in stats) else "paper"
    generator = load(args.model_dir, stats=stats, device="cpu", threads=args.threads, rule=rule)
    prompt_ids = generator.tokenizer.encode_prompt(PROMPT)

    def generate(n):
        result = generator.generate([PROMPT], GenerationParams(max_new_tokens=n, ignore_eos=True))[0]
        assert not result.abstained, "the benchmark prompt must not be refused"
        return result.token_ids

    return prompt_ids, generate


def hf_dir(name: str) -> Path:
    """A saved HF copy of the built-in model (dequantized GGUF), made once in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unskill.exporter.sources import cache_dir, resolve_model

    target = cache_dir() / "bench" / f"{name}-hf"
    if not (target / "config.json").is_file():
        source = resolve_model(name)
        AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file).save_pretrained(target)
        AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file).save_pretrained(target)
    return target


def engine_hf(args, prompt_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir(args.hf), torch_dtype=torch.float32).eval()
    inputs = torch.tensor([prompt_ids])

    def generate(n):
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    return generate


def engine_optimum(args, prompt_ids):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from unskill.exporter.sources import cache_dir

    target = cache_dir() / "bench" / f"{args.hf}-optimum"
    if not (target / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export
        main_export(str(hf_dir(args.hf)), output=target, task="text-generation-with-past", do_validation=False)
    model = ORTModelForCausalLM.from_pretrained(target, provider="CPUExecutionProvider")
    inputs = torch.tensor([prompt_ids])

    def generate(n):
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    return generate


def engine_genai(args, prompt_ids):
    """onnxruntime-genai on a model its builder made (see benchmarks/README.md for the build command)."""
    import onnxruntime_genai as og

    if not args.genai_dir:
        raise SystemExit("the genai engine needs --genai-dir")
    model = og.Model(str(args.genai_dir))

    def generate(n):
        params = og.GeneratorParams(model)
        total = len(prompt_ids) + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0))[len(prompt_ids):]

    return generate


def engine_llama_cpp(args, prompt_ids):
    """llama.cpp (llama-cpp-python) on the GGUF file the model ships as (Q4_1 for SmolLM2, Q4_K_M for Gemma-3):
    the quantized peer. Same prompt ids, greedy with EOS masked, one token per eval, as the other engines."""
    import numpy as np
    from llama_cpp import Llama

    from unskill.exporter.sources import resolve_model

    source = resolve_model(args.hf)
    threads = args.threads or len(os.sched_getaffinity(0))
    model = Llama(str(source.directory / source.gguf_file), n_ctx=len(prompt_ids) + args.new_tokens + 8,
                  n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    eos = [model.token_eos(), *(model.tokenize(t.encode(), add_bos=False, special=True)[0]
                                for t in source.eos_tokens)]

    vocab = model.n_vocab()

    def generate(n):
        model.reset()
        model.eval(prompt_ids)
        out = []
        for _ in range(n):
            # 0.3.x keeps no scores unless logits_all; read the context's last-row logits directly.
            logits = np.ctypeslib.as_array(model._ctx.get_logits(), shape=(vocab,)).astype(np.float32)
            logits[eos] = -np.inf
            out.append(int(logits.argmax()))
            model.eval([out[-1]])
        return out

    return generate


def prompt_ids_of(model_dir: Path) -> list[int]:
    """The benchmark prompt as the runtime tokenizes it (chat template), without loading the model: a peer's
    peak RSS is then its own."""
    from unskill.runtime.manifest import load_manifest
    from unskill.runtime.tokenizer import TextTokenizer

    return TextTokenizer(model_dir, load_manifest(model_dir)).encode_prompt(PROMPT)


def run_engine(args) -> dict:
    """Child process: one engine, printed as JSON."""
    name = args.engine.split(":")[0]
    if name in ("unskill", "unskill-ksd"):
        stats = args.stats[: int(args.engine.split(":")[1])] if name == "unskill-ksd" else []
        prompt_ids, generate = engine_unskill(args, stats)
    elif name == "unskill-int4":
        prompt_ids, generate = engine_unskill(argparse.Namespace(**{**vars(args), "model_dir": args.int4_dir}), [])
    else:
        prompt_ids = prompt_ids_of(args.model_dir)
        peers = {"hf": engine_hf, "optimum": engine_optimum, "genai": engine_genai, "llama.cpp": engine_llama_cpp}
        generate = peers[name](args, prompt_ids)
    result = measure(generate, args.new_tokens, args.runs)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["prompt_tokens"] = len(prompt_ids)
    return result


def weight_bytes_per_token(model_dir: Path) -> int:
    """Bytes of projection weights read for one token: the initializers of MatMul/Gemm (fp32) and of
    MatMulNBits (packed int4 + scales) nodes; embeddings are gathered, one row per token, so not counted."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        n = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        for d in init.dims:
            n *= d
        sizes[init.name] = n
    # A tied LM head is MatMul(x, Transpose(embedding)): onnxruntime folds the Transpose at load, so the
    # head reads the whole embedding-sized matrix every token. Count through it (before issue 18 it was missed).
    transposed = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Transpose"}
    return sum(sizes.get(transposed.get(name, name), 0) for node in model.graph.node
               if node.op_type in ("MatMul", "Gemm", "MatMulNBits") for name in node.input[1:])


def memory_bandwidth_gbs(size_mb: int = 2048, repeats: int = 5) -> float:
    """Read bandwidth with every core reading its own slice of a large float32 array (NumPy releases the
    GIL in reductions); best of a few passes. Decode uses all cores too, so one thread would understate it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(size_mb * (1 << 20) // 4, dtype=np.float32)
    workers = os.cpu_count() or 1
    slices = np.array_split(data, workers)
    with ThreadPoolExecutor(workers) as pool:
        def one_pass():
            return list(pool.map(lambda part: part.sum(dtype=np.float32), slices))
        best = min(timed(one_pass)[0] for _ in range(repeats))
    return data.nbytes / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--hf", default="smollm2-135m", help="built-in model name for the PyTorch / optimum peers")
    parser.add_argument("--stats", action="append", default=[], help="stats files for the guarded runs (up to 3)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default="unskill,unskill-ksd:1,unskill-ksd:3,optimum,hf,genai,unskill-int4,llama.cpp")
    parser.add_argument("--genai-dir", type=Path, help="onnxruntime-genai model folder (builder output)")
    parser.add_argument("--int4-dir", type=Path, help="`unskill edit quantize --mode int4` copy (engine unskill-int4)")
    parser.add_argument("--threads", type=int, help="threads of the unskill and llama.cpp engines (default: the "
                        "CPUs this process may use); 1 on a box shared with other jobs, where llama.cpp's "
                        "spinning thread barriers collapse")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args)))
        return 0

    bandwidth_before = memory_bandwidth_gbs()
    results = {}
    for name in args.engines.split(","):
        if name == "unskill-int4" and not args.int4_dir:
            print("skip unskill-int4: no --int4-dir", file=sys.stderr)
            continue
        if name == "genai" and not args.genai_dir:
            print("skip genai: no --genai-dir", file=sys.stderr)
            continue
        if name.startswith("unskill-ksd:") and len(args.stats) < int(name.split(":")[1]):
            print(f"skip {name}: needs {name.split(':')[1]} --stats files", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--engine", name, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['decode_tok_s']:.1f} tok/s", file=sys.stderr)

    base = results.get("unskill")
    for name, r in results.items():
        r["ids_match_unskill"] = base is not None and r["ids"] == base["ids"]
    # Probed before and after the engines, best of both: a probe that lands on a busy moment cannot inflate
    # the shares (single probes read 31-47 GB/s on the quiet box within minutes).
    bandwidth = max(bandwidth_before, memory_bandwidth_gbs())
    bytes_per_token = weight_bytes_per_token(args.model_dir)
    # Each row against the bytes its own model reads: the int4 copy's packed weights; llama.cpp's GGUF file
    # (tied embedding = LM head, so the whole file is read per token, less one embedding row).
    row_bytes = {"unskill-int4": weight_bytes_per_token(args.int4_dir) if args.int4_dir else bytes_per_token}
    if "llama.cpp" in results:
        from unskill.exporter.sources import resolve_model
        source = resolve_model(args.hf)
        row_bytes["llama.cpp"] = (source.directory / source.gguf_file).stat().st_size
    bound = bandwidth * 1e9 / bytes_per_token
    load = os.getloadavg()[0]
    print(f"\nprompt {base['prompt_tokens'] if base else '?'} tokens, {args.new_tokens} new tokens, greedy, "
          f"median of {args.runs}; bandwidth {bandwidth:.1f} GB/s, weights read/token {bytes_per_token / 1e6:.0f} MB, "
          f"bound {bound:.1f} tok/s; load average at the end {load:.1f} on {os.cpu_count()} CPUs\n")
    print("| engine | decode tok/s | vs unskill | TTFT s | vs unskill | peak RSS MB | ids match | MB read/token "
          "| share of its bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        speed = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        ttft = r["ttft_s"] / base["ttft_s"] if base else float("nan")
        r["bytes_per_token"] = row_bytes.get(name, bytes_per_token)
        r["share_of_bound"] = r["decode_tok_s"] * r["bytes_per_token"] / (bandwidth * 1e9)
        print(f"| {name} | {r['decode_tok_s']:.1f} | {speed:.2f}x | {r['ttft_s']:.3f} | {ttft:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {r['ids_match_unskill']} | {r['bytes_per_token'] / 1e6:.0f} "
              f"| {r['share_of_bound']:.0%} |")
    if args.out:
        summary = {"results": {k: {kk: vv for kk, vv in v.items() if kk != "ids"} for k, v in results.items()},
                   "bandwidth_gbs": bandwidth, "weight_bytes_per_token": bytes_per_token, "bound_tok_s": bound,
                   "new_tokens": args.new_tokens, "runs": args.runs, "model_dir": str(args.model_dir),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
                   "load_average": load}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
