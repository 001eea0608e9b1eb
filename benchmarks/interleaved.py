"""int4 copies against llama.cpp in one process, interleaved round by round (A B C A B C ...), for a box whose
load drifts: `decode.py` runs each engine in its own process one after the other, so drift lands on one engine.

    python benchmarks/interleaved.py out/smollm2-int4 [more int4 copies] --hf smollm2-135m --threads 1 --rounds 9

Each round: one `decode.py` measurement (warm-up, 1-token TTFT, N-token run) per engine. Medians over rounds;
the ratio of each copy to llama.cpp on the model's own GGUF (decode.py's engines, same prompt, greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from decode import engine_llama_cpp, engine_unskill, measure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("int4_dirs", nargs="+", type=Path)
    parser.add_argument("--hf", default="smollm2-135m", help="built-in model whose GGUF llama.cpp runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    engines, prompt_ids = {}, None
    for directory in args.int4_dirs:
        prompt_ids, engines[str(directory)] = engine_unskill(argparse.Namespace(**{**vars(args), "model_dir": directory}), [])
    engines["llama.cpp"] = engine_llama_cpp(args, prompt_ids)
    rates = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, generate in engines.items():
            rates[name].append(measure(generate, args.new_tokens, 1)["decode_tok_s"])
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    peer = statistics.median(rates["llama.cpp"])
    print(f"threads {args.threads}, {args.rounds} rounds, {args.new_tokens} new tokens; {load}")
    print("| engine | decode tok/s (median) | vs llama.cpp |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / peer:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "load": load,
                                        "rates": rates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
