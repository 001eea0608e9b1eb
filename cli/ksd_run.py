"""`ksd-run`: generate with an exported model, abstaining on the skills in the given stats files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unskill.runtime.errors import UnskillError
from unskill.runtime.generator import ABSTAIN_MESSAGE, GenerationParams, Result
from unskill.runtime.io import check_output_path, write_jsonl
from unskill.runtime.ksd import ALPHA_MODES
from unskill.runtime.sampling import SamplingParams
from unskill.runtime.statsfile import alpha_problem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksd-run", description=__doc__)
    p.add_argument("--onnx", required=True, help="DIR/model.onnx written by `unskill export` (or DIR)")
    p.add_argument("--stats", action="append", default=[], help="stats .npz, one hypercube set per file (repeatable)")
    p.add_argument("--alpha", type=float, help="cube half-width: multiple of the fitted k or of sigma (default: each stats "
                   "file's calibrated rule, stored by `unskill guard`; a file without one is refused)")
    p.add_argument("--rule", choices=("stored", "paper"), default=None,
                   help="stored: each stats file's calibrated rule (the default); paper: the paper's cube at "
                        "--alpha (default 1.0 x k) on --layers (default the last), for stats without a rule")
    p.add_argument("--alpha-mode", choices=ALPHA_MODES, default="k", help="k: alpha*k*sigma (fitted k, default); sigma: alpha*sigma")
    p.add_argument("--layers", help="comma-separated FFL layers to check, or 'all' (default: the stored rule's, else -1)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="JSONL with a \"prompt\" field per line, or a text file with one prompt per line")
    p.add_argument("--output", help="write one JSON line per prompt here (prompt, text, abstained, skill, layer)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--abstain-message", default=ABSTAIN_MESSAGE)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UnskillError(f"{path}: no such prompts file")
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise UnskillError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise UnskillError(f"{path}: cannot read it ({exc.strerror})") from None
    if file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UnskillError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UnskillError(f"{path}:{number}: needs a string field \"prompt\"")
            prompts.append(record["prompt"])
        lines = prompts
    if not lines:
        raise UnskillError(f"{path}: no prompts")
    return lines


def parse_layers(text: str, num_layers: int) -> list[int]:
    if text.strip() == "all":
        return list(range(num_layers))
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise UnskillError(f"--layers {text!r}: expected comma-separated integers or 'all'") from None
    if len(set(layers)) != len(layers):
        raise UnskillError(f"--layers {text!r}: a layer is named twice")
    return layers


def result_record(result: Result) -> dict:
    return {"prompt": result.prompt, "text": result.text, "abstained": result.abstained, "skill": result.skill,
            "layer": result.layer, "rule": result.rule, "finish_reason": result.finish_reason}


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model, before it loads."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise UnskillError(f"{flag} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UnskillError(f"--threads must be >= 1, got {args.threads}")
    problem = alpha_problem(args.alpha, args.alpha_mode) if args.alpha is not None else None   # None: stored rule
    if problem:
        raise UnskillError(f"--alpha {problem}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).validate()
    if args.output:
        check_output_path(args.output)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from unskill.runtime import load

    check_args(args)
    model_dir = Path(args.onnx)
    model_dir = model_dir if model_dir.is_dir() else model_dir.parent
    if model_dir.name == "onnx" and not (model_dir / "unskill.json").is_file():   # DEPLOY/onnx/model.onnx
        model_dir = model_dir.parent
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    from unskill.runtime.manifest import load_manifest
    layers = parse_layers(args.layers, load_manifest(model_dir).num_layers) if args.layers is not None else None
    generator = load(model_dir, args.stats, args.alpha, args.alpha_mode, layers, args.device, args.threads,
                     args.abstain_message, rule=args.rule)
    if generator.guard and not args.quiet:
        print("\n".join(f"guard: {line}" for line in generator.guard.describe()), file=sys.stderr)
    params = GenerationParams(args.max_new_tokens, SamplingParams(args.temperature, args.top_k, args.top_p, args.seed),
                              tuple(args.stop), not args.no_chat)
    if not prompts:
        return interactive(generator, params)
    generator.encode(prompts, params)   # fail on any bad prompt before spending time on the others
    results = []
    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="ksd-run", unit="batch", disable=args.quiet or len(batches) == 1):
        results += generator.generate(prompts[start:start + args.batch_size], params)
    if args.output:
        write_jsonl(args.output, [result_record(r) for r in results])
        abstained = sum(r.abstained for r in results)
        print(f"{len(results)} prompts, {abstained} abstained ({abstained / len(results):.1%}) -> {args.output}")
    else:
        for result in results:
            tag = f" [abstained: {result.skill}, layer {result.layer}, {result.rule}]" if result.abstained else ""
            print(f">>> {result.prompt}\n{result.text}{tag}\n")
    return 0


def interactive(generator, params: GenerationParams) -> int:
    print("ksd-run: type a prompt, empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.strip()
        if not prompt:
            break
        try:
            for event in generator.stream(prompt, params):
                print(event.text, end="", flush=True)
        except UnskillError as exc:
            print(f"error: {exc}", end="", file=sys.stderr)
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import ksd_run

    return ksd_run(argv)


if __name__ == "__main__":
    sys.exit(main())
