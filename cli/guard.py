"""`unskill guard`: probe, calibrate and store a KSD guard in one run (stats/guard.py)."""

from __future__ import annotations

import argparse

from .stats_eval import _add_ray_arguments, _ray


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "guard", help="make a KSD guard: probe the skill, calibrate the rule, store it -> stats .npz",
        description="Probes the skill to forget (with framed variants and in several prompt formats), chooses the "
                    "refusal rule on validation prompts against the retain sets, and stores it: `ksd-run --stats "
                    "OUT` and `unskill serve --stats OUT` use it with no other option.")
    p.add_argument("--model", required=True, help="directory written by `unskill export`")
    p.add_argument("--forget", required=True,
                   help="the skill to forget: builtin:math, builtin:code, gsm8k, mbpp, PATH[:FIELD] …")
    p.add_argument("--retain", action="append", default=[], metavar="SPEC",
                   help="a set that must stay answered, added to the defaults (repeatable)")
    p.add_argument("--no-default-retain", action="store_true",
                   help="only the --retain sets (default also: the other built-in skill, general requests, chat, "
                        "instructions:calibration-no<skill>, MMLU dev less the skill's subjects)")
    p.add_argument("--out", required=True, help="stats .npz to write, with the rule in it")
    p.add_argument("--limit", type=int, default=200, help="forget probes, validation prompts and items per retain "
                   "set (default 200)")
    p.add_argument("--target", type=float, default=0.01, help="largest false-refusal rate on retain (default 0.01)")
    p.add_argument("--formats", choices=("all", "chat", "raw"), default="all",
                   help="prompt formats to fit and calibrate on (default all: chat, raw, completion frames, system "
                        "prompt, conversation)")
    p.add_argument("--augment", choices=("auto", "math", "code", "none"), default="auto",
                   help="framed variants of the forget prompts (auto: by the skill)")
    p.add_argument("--skill", help="name reported when the guard refuses (default: the --forget spec)")
    p.add_argument("--data-dir", help="benchmark data (default: $UNSKILL_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    _add_ray_arguments(p)   # --ray: the prompt passes on a Ray pool
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from unskill.runtime.io import check_output_path
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.stats.calibrate import _check_target
    from unskill.stats.guard import GuardConfig, make_guard

    check_output_path(args.out, "--out")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UnskillError(f"{flag} must be >= 1, got {value}")
    _check_target(args.target)
    options = _ray(args)
    model = OnnxLM(args.model)   # under --ray too: the decode check's few greedy decodes run here
    tokenizer = TextTokenizer(args.model, model.manifest)
    config = GuardConfig(args.limit, list(args.retain), not args.no_default_retain, args.formats, args.augment,
                         args.target, args.data_dir, args.batch_size, progress=not args.no_progress)
    ray = None
    if options:   # the prompt passes on the pool (cluster/ stays out of stats/: make_guard is handed them)
        from unskill.cluster.jobs import RayGuard
        ray = RayGuard(options)
    stats, result = make_guard(model, tokenizer, args.forget, config, args.skill, ray=ray)
    stats.save(args.out)
    setting, cal = result.setting, result.setting.calibration
    print(f"{stats.skill}: {setting.name} (thresholds {', '.join(f'{t:.4g}' for t in setting.thresholds)})\n"
          f"  retain refused {cal['retain_refused']:.1%} of {cal['retain_items']} ({' + '.join(cal['retain'])})\n"
          f"  forget refused {cal['forget_plain_refused']:.1%} plain, {cal['forget_refused']:.1%} with framed "
          f"variants, of {cal['forget_items']} validation prompts in formats {', '.join(cal['formats'])}")
    if "decode_refused" in cal:
        print(f"  decoded: {cal['decode_refused']:.1%} of {cal['decode_prompts']} retain prompts refused within "
              f"{cal['decode_tokens']} tokens")
    if len(cal.get("considered", {})) > 1:
        print("  considered (forget refused, with framed variants): "
              + "; ".join(f"{name} {rate:.1%}" for name, rate in cal["considered"].items()))
    print(f"wrote {args.out}: `ksd-run --stats {args.out}` and `unskill serve --stats {args.out}` use this rule")
    return 0
