"""`unskill stats`: probe an exported model with datasets and write a stats .npz (or merge shards)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("stats", help="probe an exported model with datasets -> stats .npz")
    p.add_argument("--model", help="directory written by `unskill export`")
    p.add_argument("--forget", help="dataset SPEC of the skill to forget: builtin:math, gsm8k[:split], PATH[:FIELD] …")
    p.add_argument("--retain", help="dataset SPEC of what to keep (adds NA and SP statistics)")
    p.add_argument("--out", required=True, help="stats .npz to write")
    p.add_argument("--data-dir", help="benchmark data in the shared/data layout (default: $UNSKILL_DATA_DIR)")
    p.add_argument("--limit", type=int, help="take the first N items of each dataset")
    p.add_argument("--skill", help="name reported when KSD abstains (default: the forget dataset's name)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-text-tokens", type=int, default=512)
    p.add_argument("--no-chat", action="store_true", help="probe raw prompts, without the chat template")
    p.add_argument("--merge", nargs="+", metavar="NPZ", help="merge stats shards into --out instead of probing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.statsfile import load_stats

    if args.merge:
        from .probe import merge_stats
        merged = load_stats(args.merge[0])
        for path in args.merge[1:]:
            merged = merge_stats(merged, load_stats(path), where=path)
        merged.save(args.out)
        print(f"merged {len(args.merge)} shards -> {args.out}")
        return 0
    if not args.model or not args.forget:
        raise UnskillError("unskill stats needs --model and --forget (or --merge)")
    if args.limit is not None and args.limit < 1:
        raise UnskillError(f"--limit must be >= 1, got {args.limit}")

    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer

    from .datasets import load_dataset
    from .probe import ProbeConfig, probe

    forget = load_dataset(args.forget, args.data_dir, args.limit)
    retain = load_dataset(args.retain, args.data_dir, args.limit) if args.retain else None
    model = OnnxLM(args.model)
    tokenizer = TextTokenizer(args.model, model.manifest)
    config = ProbeConfig(not args.no_chat, args.batch_size, args.max_text_tokens, not args.no_progress)
    stats = probe(model, tokenizer, forget, retain, config, args.skill)
    stats.save(Path(args.out))
    groups = ", ".join(f"{g} ({int(m.count[0])} rows/layer)" for g, m in stats.groups.items())
    print(f"wrote {args.out}: {groups}")
    return 0


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="write a dataset SPEC's prompts as JSONL (input for ksd-run --prompts)")
    p.add_argument("spec", help="builtin:math, gsm8k:test, mbpp:test, PATH[:FIELD] …")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int)
    p.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    from unskill.runtime.cli import write_jsonl

    from .datasets import load_dataset

    dataset = load_dataset(args.spec, args.data_dir, args.limit)
    write_jsonl(args.out, [{"prompt": item.prompt, "completion": item.completion} for item in dataset.items])
    print(f"{len(dataset.items)} prompts from {dataset.name} -> {args.out}")
    return 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="token-level accuracy / NLL per task, and KSD abstention rates")
    p.add_argument("--model", required=True, help="exported (or edited) model directory")
    p.add_argument("--tasks", required=True, help="comma-separated dataset SPECs with completions, e.g. gsm8k:test,mbpp:test")
    p.add_argument("--stats", action="append", default=[], help="KSD stats to also measure abstention with")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--alpha-mode", choices=("k", "sigma"), default="k")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from unskill.runtime.ksd import KSDGuard
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.statsfile import load_stats
    from unskill.runtime.tokenizer import TextTokenizer

    from .datasets import load_dataset
    from .evaluate import token_metrics

    datasets = [load_dataset(spec, args.data_dir, args.limit) for spec in args.tasks.split(",")]
    model = OnnxLM(args.model)
    tokenizer = TextTokenizer(args.model, model.manifest)
    stats = [load_stats(path, model.manifest) for path in args.stats]
    guard = KSDGuard(stats, model.manifest, args.alpha, args.alpha_mode) if stats else None
    scores = [token_metrics(model, tokenizer, d, max_tokens=args.max_tokens, guard=guard,
                            progress=not args.no_progress) for d in datasets]
    for s in scores:
        extra = f"  abstain {s.abstain_rate:.3f}  top1(abstain=wrong) {s.top1_with_abstain:.4f}" if guard else ""
        print(f"{s.task:24s} items {s.items:4d}  tokens {s.tokens:6d}  top1 {s.top1:.4f}  nll {s.nll:.4f}{extra}")
    if args.out:
        from unskill.runtime.cli import write_jsonl
        record = {"model": args.model, "edits": model.manifest.edits, "scores": [s.as_dict() for s in scores]}
        write_jsonl(args.out, [record])
    return 0


def add_calibrate_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="choose KSD alpha so retain prompts are refused at most --target")
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="KSD stats of the skill to forget")
    p.add_argument("--retain", required=True, help="validation prompts that must stay answered, e.g. mbpp:validation")
    p.add_argument("--forget", help="validation prompts of the skill, to report coverage, e.g. gsm8k:validation")
    p.add_argument("--target", type=float, default=0.01, help="largest allowed retain false-abstain rate (default 0.01)")
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--no-chat", action="store_true")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.statsfile import load_stats
    from unskill.runtime.tokenizer import TextTokenizer

    from .calibrate import calibrate
    from .datasets import load_dataset

    model = OnnxLM(args.model)
    stats = load_stats(args.stats, model.manifest)
    retain = load_dataset(args.retain, args.data_dir, args.limit)
    forget = load_dataset(args.forget, args.data_dir, args.limit) if args.forget else None
    result = calibrate(model, TextTokenizer(args.model, model.manifest), stats, retain, forget, args.target,
                       args.layer, not args.no_chat)
    coverage = f", forget refused {result.forget_abstain:.1%} of {result.forget_items}" if forget else ""
    print(f"alpha {result.alpha:.4g} (x k, layer {result.layer}): retain refused {result.retain_abstain:.1%} "
          f"of {result.retain_items}{coverage}\nuse: ksd-run --stats {args.stats} --alpha {result.alpha:.4g} "
          f"--layers {result.layer}")
    return 0
