"""`unskill stats` (probe an exported model with datasets -> stats .npz, or merge shards), `unskill data`,
`unskill eval` and `unskill calibrate`: the commands over stats/ and evals/."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--text", action="store_true",
                   help="also keep the forget side's NA/SP statistics without --retain (a shard for --compose)")
    p.add_argument("--augment", choices=("auto", "math", "code", "none"), default="auto",
                   help="add framed variants of the first 100 forget prompts (wrappers, personas, code requests, "
                        "noise, other languages; stats/augment.py) to the KSD probes (auto, the default: math "
                        "for gsm8k, code for mbpp, none for other datasets)")
    p.add_argument("--merge", nargs="+", metavar="NPZ", help="merge stats shards into --out instead of probing")
    p.add_argument("--compose", nargs="+", metavar="NPZ",
                   help="FORGET.npz RETAIN.npz...: forget's stats, retain side from the others' forget-side "
                        "text stats (each probed with --text), e.g. one XQuAD language against the rest")
    p.add_argument("--no-progress", action="store_true")
    _add_ray_arguments(p)
    p.set_defaults(run=run)


def _add_ray_arguments(parser) -> None:
    from unskill.cluster.pool import add_ray_arguments   # imports no ray

    add_ray_arguments(parser)


def _ray(args: argparse.Namespace):
    """--ray's options (cluster/pool.py), or None for a run in this process."""
    from unskill.cluster.pool import ray_options

    return ray_options(args)


def _check_args(args: argparse.Namespace) -> None:
    """What can be refused before any model loads or any probe runs."""
    from unskill.runtime.io import check_output_path
    from unskill.runtime.errors import UnskillError

    for flag, value in (("--batch-size", args.batch_size), ("--max-text-tokens", args.max_text_tokens)):
        if value < 1:
            raise UnskillError(f"{flag} must be >= 1, got {value}")
    check_output_path(args.out, "--out")
    shards = args.merge or args.compose or []
    seen = {}
    for path in shards:
        key = _file_identity(path)
        if key in seen:
            raise UnskillError(f"{path}: the same stats as {seen[key]}; merging it twice would count its probes twice")
        seen[key] = path


def _file_identity(path: str):
    """A shard's real path and content hash: the same file under two names, or a copy, is still the same."""
    import hashlib

    file = Path(path)
    if not file.is_file():
        return path
    return hashlib.sha256(file.read_bytes()).hexdigest()


def run(args: argparse.Namespace) -> int:
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.statsfile import load_stats

    _check_args(args)
    if args.merge:
        from unskill.stats.probe import merge_stats
        merged = load_stats(args.merge[0])
        for path in args.merge[1:]:
            merged = merge_stats(merged, load_stats(path), where=path)
        merged.save(args.out)
        print(f"merged {len(args.merge)} shards -> {args.out}")
        return 0
    if args.compose:
        from unskill.stats.probe import compose_stats
        if len(args.compose) < 2:
            raise UnskillError("--compose needs FORGET.npz and at least one RETAIN.npz")
        shards = [load_stats(path) for path in args.compose]
        compose_stats(shards[0], shards[1:], where=args.out).save(args.out)
        print(f"composed {args.compose[0]} against {len(shards) - 1} retain shards -> {args.out}")
        return 0
    if not args.model or not args.forget:
        raise UnskillError("unskill stats needs --model and --forget (or --merge)")
    if args.limit is not None and args.limit < 1:
        raise UnskillError(f"--limit must be >= 1, got {args.limit}")
    options = _ray(args)

    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer

    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    forget = load_dataset(args.forget, args.data_dir, args.limit)
    retain = load_dataset(args.retain, args.data_dir, args.limit) if args.retain else None
    prober = None
    config = ProbeConfig(not args.no_chat, args.batch_size, args.max_text_tokens, not args.no_progress)
    if options:   # the actors load the weights; here only the manifest and the tokenizer
        from unskill.cluster.jobs import DriverModel, ray_prober
        model = DriverModel(args.model)
        tokenizer = TextTokenizer(args.model, model.manifest)
        prober = ray_prober(model, tokenizer, config, options)
    else:
        model = OnnxLM(args.model)
        tokenizer = TextTokenizer(args.model, model.manifest)
    from unskill.stats.augment import chosen_kind

    stats = probe(model, tokenizer, forget, retain, config, args.skill, text=args.text,
                  augment=chosen_kind(args.augment, args.forget), prober=prober)
    stats.save(Path(args.out))
    groups = ", ".join(f"{g} ({int(m.count[0])} rows/layer)" for g, m in stats.groups.items())
    print(f"wrote {args.out}: {groups}")
    print(f"  not a guard yet (no calibrated rule): `unskill calibrate --model {args.model} --stats {args.out} ...` "
          f"stores one, or make the guard in one run with `unskill guard --model {args.model} --forget {args.forget}`")
    return 0


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="write a dataset SPEC's prompts as JSONL (input for ksd-run --prompts)")
    p.add_argument("spec", help="builtin:math, gsm8k:test, mbpp:test, PATH[:FIELD] …")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int)
    p.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    from unskill.runtime.io import write_jsonl

    from unskill.stats.datasets import load_dataset

    dataset = load_dataset(args.spec, args.data_dir, args.limit)
    write_jsonl(args.out, [{"prompt": item.prompt, "completion": item.completion} for item in dataset.items])
    print(f"{len(dataset.items)} prompts from {dataset.name} -> {args.out}")
    return 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a model on token-level and generation tasks, with KSD abstention")
    p.add_argument("--model", required=True, help="exported (or edited) model directory")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: dataset SPECs (token level, e.g. gsm8k:test,mbpp:test,mmlu:test,"
                        "xquad-en:test), generation tasks gen:gsm8k, gen:mbpp, gen:mmlu, gen:xquad-LL, and the "
                        "bypass benchmark bypass:gsm8k, bypass:mbpp (--gen-limit items per family), adaptive "
                        "attackers attack:gsm8k, attack:mbpp (--gen-limit requests)")
    p.add_argument("--stats", action="append", default=[], metavar="[NAME=]NPZ",
                   help="record KSD entry alphas for these stats (NAME defaults to the stats' skill)")
    p.add_argument("--alpha", type=float, help="also print abstention and abstain-as-failure scores at this alpha (x k)")
    p.add_argument("--layer", type=int, default=-1, help="the layer KSD checks (default: the last)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=200, help="items per token-level task (seeded sample; default 200)")
    p.add_argument("--gen-limit", type=int, default=50, help="items per generation task (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per MBPP program in the sandbox")
    p.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    p.add_argument("--method", help="label for the report: original, na, sp … (default: from the model's edits)")
    p.add_argument("--setting", help="label for the report: the forgotten skill, e.g. gsm8k or xquad-en")
    p.add_argument("--cache", help="per-item cache directory (default: $UNSKILL_CACHE/eval or ~/.cache/unskill/eval)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--bypass-decode", type=int, default=0, metavar="N",
                   help="bypass tasks: also decode N greedy tokens per prompt and check every one, as ksd-run does "
                        "(reported beside the prefill rate; default 0: prefill only)")
    p.add_argument("--attack-budget", type=int, default=100, metavar="N",
                   help="attack tasks: Best-of-N tries and search queries per request at most (default 100)")
    p.add_argument("--attackers", default="bon,search",
                   help="attack tasks: comma-separated, bon (Best-of-N) and/or search (default both)")
    p.add_argument("--bypass-format", choices=("chat", "raw", "both"), default="chat",
                   help="bypass and attack tasks: send prompts through the chat template, as raw text (what "
                        "`ksd-run --no-chat` and /v1/completions see; turns joined by blank lines) or both")
    p.add_argument("--out", help="write the results as JSON here (input of `unskill report`)")
    p.add_argument("--no-progress", action="store_true")
    _add_ray_arguments(p)
    p.set_defaults(run=run_eval)


def _split_named(value: str) -> tuple[str, str]:
    """NAME=PATH -> (NAME, PATH); a bare path (even one with '=' in its name) -> ("", PATH)."""
    name, sep, path = value.partition("=")
    return ("", value) if not sep or Path(value).exists() else (name, path)


def _named_stats(values: list[str], manifest) -> dict:
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.statsfile import load_stats

    named = {}
    for value in values:
        name, path = _split_named(value)
        stats = load_stats(path, manifest)
        name = name or stats.skill
        if name in named:
            raise UnskillError(f"{path}: a second stats file named {name!r}; name them with NAME=PATH")
        named[name] = stats
    return named


def _default_method(edits: list) -> str:
    kinds = [{"prune": "sp"}.get(edit.get("method"), edit.get("method", "?")) for edit in edits]
    return "+".join(kinds) if kinds else "original"


def run_eval(args: argparse.Namespace) -> int:
    from unskill.runtime.cache import cache_dir
    from unskill.runtime.io import write_json
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer

    from unskill.evals.evaluate import EvalConfig, Harness, ksd_view

    options = _ray(args)
    if options and not args.bypass_decode:   # the actors load the weights; here only the manifest and tokenizer
        from unskill.cluster.jobs import DriverModel
        model = DriverModel(args.model)
    else:
        model = OnnxLM(args.model)
    tokenizer = TextTokenizer(args.model, model.manifest)
    stats = _named_stats(args.stats, model.manifest)
    config = EvalConfig(args.data_dir, args.limit, args.gen_limit, args.seed, not args.no_chat,
                        max_tokens=args.max_tokens, layer=args.layer, timeout_s=args.timeout,
                        progress=not args.no_progress, bypass_decode=args.bypass_decode,
                        bypass_format=args.bypass_format, attack_budget=args.attack_budget,
                        attackers=tuple(a for a in args.attackers.split(",") if a))
    cache = None if args.no_cache else Path(args.cache) if args.cache else cache_dir() / "eval"
    harness = Harness(model, tokenizer, config, stats, cache)
    if options:
        from unskill.cluster.jobs import RayKeyReader, eval_runner
        paths = {name: _split_named(value)[1] for name, value in zip(stats, args.stats)}
        harness.distribute = eval_runner(args.model, model.manifest.fingerprint, config, paths, options)
        harness.reader = RayKeyReader(model, options, config.batch_size * 2)
    results = harness.run([t for t in args.tasks.split(",") if t])
    for name, task in results.items():
        if task["kind"] == "bypass":
            from unskill.evals.robustness import print_bypass
            print_bypass(name, task, args.alpha)
            continue
        if task["kind"] == "attack":
            from unskill.evals.robustness import print_attack
            print_attack(name, task)
            continue
        line = f"{name:20s} {task['metric']:12s} {task['score']:.4f}  items {task['items']}"
        if task["kind"] == "tokens":
            line += f"  nll {task['nll']:.4f}"
        if args.alpha is not None:
            for stats_name in stats:
                view = ksd_view(task, stats_name, args.alpha)
                line += f"  | KSD {stats_name}: abstain {view['abstain']:.3f} score {view['score']:.4f}"
        print(line)
    if args.out:
        manifest = model.manifest
        write_json(args.out, {
            "model": str(args.model), "source": manifest.source, "fingerprint": manifest.fingerprint,
            "edits": manifest.edits, "method": args.method or _default_method(manifest.edits),
            "setting": args.setting, "chat": harness.templated, "seed": args.seed, "command": _eval_command(args),
            "ksd": {"layer": harness.entry.layer,
                    "stats": {n: {"skill": s.skill, "k": harness.entry.cubes[n].k} for n, s in stats.items()}}
            if stats else None,
            "tasks": results})
        print(f"wrote {args.out}")
    return 0


def _eval_command(args: argparse.Namespace) -> str:
    """The options that decide an eval's items and prompts, as a command line (quoted above robustness tables)."""
    parts = ["unskill eval --model", args.model, "--tasks", args.tasks, *(f"--stats {s}" for s in args.stats),
             "--limit", str(args.limit), "--gen-limit", str(args.gen_limit), "--seed", str(args.seed)]
    parts += ["--no-chat"] if args.no_chat else []
    parts += [f"--bypass-decode {args.bypass_decode}"] if args.bypass_decode else []
    parts += [f"--bypass-format {args.bypass_format}"] if args.bypass_format != "chat" else []
    parts += [f"--attack-budget {args.attack_budget}"] if args.attack_budget != 100 else []
    parts += [f"--attackers {args.attackers}"] if args.attackers != "bon,search" else []
    return " ".join(parts)


def add_calibrate_parser(subparsers) -> None:
    from unskill.stats.calibrate import DECODE_PROMPTS, DECODE_TOKENS, RULE_KINDS

    p = subparsers.add_parser("calibrate", help="choose KSD alpha so retain prompts are refused at most --target",
                              description="One skill: --stats NPZ --retain SPEC [--forget SPEC] --out JSON. "
                              "Several skills in one pass: --stats NAME=NPZ and --forget NAME=SPEC for each, "
                              "[--retain SPEC shared by all] --out-dir DIR; a skill's retain set is then the "
                              "shared retain plus every other skill's forget prompts.")
    p.add_argument("--model", required=True)
    p.add_argument("--stats", action="append", required=True, metavar="[NAME=]NPZ",
                   help="KSD stats of the skill to forget (repeat with NAME=NPZ for several skills)")
    p.add_argument("--retain", help="validation prompts that must stay answered, e.g. mbpp:validation")
    p.add_argument("--forget", action="append", default=[], metavar="[NAME=]SPEC",
                   help="validation prompts of the skill, to report coverage, e.g. gsm8k:validation")
    p.add_argument("--target", type=float, default=0.01, help="largest allowed retain false-abstain rate (default 0.01)")
    p.add_argument("--layer", type=int, help="calibrate the paper's one-cube rule at this layer only (default: search "
                   "rules over all layers, region kinds and votes, and store the winner in the stats file)")
    p.add_argument("--augment", choices=("auto", "math", "code", "none"), default="auto",
                   help="add framed variants of the forget prompts (stats/augment.py) to the forget side "
                        "(auto: as `unskill stats` did for these stats: math for gsm8k, code for mbpp, else none)")
    p.add_argument("--no-chat-retain", action="store_true",
                   help="retain side without the built-in general-chat prompts (on by default)")
    p.add_argument("--no-mmlu-retain", action="store_true",
                   help="retain side without MMLU dev (on by default, less the skill's own subjects)")
    p.add_argument("--rules", nargs="+", choices=RULE_KINDS, default=list(RULE_KINDS),
                   help="region kinds to search (default both: gauss = mean squared z-score under the forget "
                        "probes, ratio = that over the same under the retain prompts; calibration picks)")
    p.add_argument("--decode-check", type=int, default=DECODE_TOKENS, metavar="TOKENS",
                   help="decode this many tokens greedily for --decode-prompts retain prompts; no stored rule may "
                        f"refuse more of them at a decoded token than --target, with a margin (default "
                        f"{DECODE_TOKENS}; 0 = prompts only)")
    p.add_argument("--decode-prompts", type=int, default=DECODE_PROMPTS,
                   help=f"retain prompts the decode check decodes, evenly spaced over the retain sets (default "
                        f"{DECODE_PROMPTS})")
    p.add_argument("--no-store", action="store_true", help="do not write the chosen rule into the stats file")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=200, help="items per dataset spec part (default 200)")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--out", help="write the choice as JSON here (input of `unskill report --calibration`)")
    p.add_argument("--out-dir", help="several skills: write ksd-NAME.json for each here")
    p.add_argument("--no-progress", action="store_true")
    _add_ray_arguments(p)
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.statsfile import load_stats
    from unskill.runtime.tokenizer import TextTokenizer

    from unskill.stats.calibrate import calibrate
    from unskill.stats.datasets import load_dataset

    if _ray(args) and (len(args.stats) > 1 or args.out_dir or args.layer is not None):
        raise UnskillError("unskill calibrate: --ray runs the default rule search of one skill; "
                           "--layer and several skills run in one process (drop --ray)")
    if len(args.stats) > 1 or args.out_dir:
        return _run_calibrate_skills(args)
    if not args.retain:
        raise UnskillError("unskill calibrate: one skill needs --retain SPEC")
    if len(args.forget) > 1:
        raise UnskillError("unskill calibrate: one --stats takes at most one --forget")
    stats_path, forget_spec = args.stats[0], (args.forget or [None])[0]
    model = OnnxLM(args.model)
    stats = load_stats(stats_path, model.manifest)
    retain = load_dataset(args.retain, args.data_dir, args.limit)
    forget = load_dataset(forget_spec, args.data_dir, args.limit) if forget_spec else None
    tokenizer = TextTokenizer(args.model, model.manifest)
    if args.layer is None:
        return _calibrate_rule(args, model, tokenizer, stats, stats_path, retain, forget)
    result = calibrate(model, tokenizer, stats, retain, forget, args.target, args.layer, not args.no_chat)
    _print_calibration(stats.skill, stats_path, result)
    if not args.no_store:
        from unskill.runtime.statsfile import GuardSetting
        stats.guard = GuardSetting("box", [result.layer], [result.alpha], 1, {"retain": [retain.name],
                                   "target": args.target, "retain_refused": result.retain_abstain,
                                   "forget_refused": result.forget_abstain})
        stats.save(stats_path)
        print(f"  stored in {stats_path}: ksd-run --stats {stats_path} uses it")
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, {"method": "ksd", "source": model.manifest.source, "skill": stats.skill,
                              "stats": stats_path, "retain": args.retain, "forget": forget_spec,
                              "target": args.target, **result.as_dict()})
    return 0


def _calibrate_rule(args, model, tokenizer, stats, stats_path, retain, forget) -> int:
    """The default: search rules on every layer's key, store the winner in the stats file (atomically)."""
    from unskill.runtime.errors import UnskillError

    from unskill.stats.augment import chat_dataset, chosen_kind, without_skill_subjects
    from unskill.stats.calibrate import _check_target, calibrate_rule
    from unskill.stats.datasets import load_dataset

    if forget is None:
        raise UnskillError("unskill calibrate: choosing a rule needs --forget SPEC (validation prompts of the skill)")
    _check_target(args.target)   # before the retain sets load
    if args.decode_check < 0 or args.decode_prompts < 0:
        raise UnskillError(f"unskill calibrate: --decode-check and --decode-prompts must be >= 0, "
                           f"got {args.decode_check} and {args.decode_prompts}")
    # auto: what `unskill stats` chose for these stats' forget set (the same function decides both)
    kind = chosen_kind(args.augment, stats.meta.get("forget", {}).get("name") or forget.name)
    retain_sets = [retain] + ([] if args.no_chat_retain else
                              [chat_dataset(), load_dataset("builtin:general", None, min(args.limit, 100))])
    if not args.no_mmlu_retain:   # general knowledge, less the skill's own subjects (MMLU dev holds math)
        retain_sets.append(without_skill_subjects(load_dataset("mmlu:dev", args.data_dir), kind))
    options, reader = _ray(args), None
    if options:   # prompt keys from the actors; the decode check's few greedy decodes stay in this process
        from unskill.cluster.jobs import RayKeyReader
        reader = RayKeyReader(model, options)
    result = calibrate_rule(model, tokenizer, stats, retain_sets, forget, args.target, not args.no_chat, kind,
                            progress=not args.no_progress, rules=tuple(args.rules),
                            decode_prompts=args.decode_prompts, decode_tokens=args.decode_check,
                            formats=stats.meta.get("prompt_template", {}).get("formats"),   # as probed
                            reader=reader)
    setting, paper = result.setting, result.paper
    print(f"{stats.skill}: the paper's rule (layer {paper.layer}, one cube): alpha {paper.alpha:.4g} x k refuses "
          f"{paper.retain_abstain:.1%} of {paper.retain_items} retain, {paper.forget_abstain:.1%} of "
          f"{paper.forget_items} forget")
    cal = setting.calibration
    print(f"{stats.skill}: chosen {setting.name} (thresholds {', '.join(f'{t:.4g}' for t in setting.thresholds)}): "
          f"retain refused {cal['retain_refused']:.1%} of {cal['retain_items']} ({' + '.join(cal['retain'])}), "
          f"forget refused {cal['forget_plain_refused']:.1%} plain / {cal['forget_refused']:.1%} with framed "
          f"variants of {cal['forget_items']}")
    if "decode_refused" in cal:
        print(f"  decoded: {cal['decode_refused']:.1%} of {cal['decode_prompts']} retain prompts refused at one of "
              f"{cal['decode_tokens']} decoded tokens")
    if not args.no_store:
        from unskill.stats.guard import store_rule
        store_rule(stats, result)
        stats.save(stats_path)
        print(f"  stored in {stats_path}: `ksd-run --stats {stats_path}` uses it (give --alpha/--layers to override)")
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, {"method": "ksd", "source": model.manifest.source, "skill": stats.skill,
                              "stats": stats_path, "retain": args.retain, "forget": forget.name,
                              "target": args.target, **paper.as_dict(),
                              "guard": json.loads(setting.to_json())})
    return 0


def _run_calibrate_skills(args: argparse.Namespace) -> int:
    from unskill.runtime.io import write_json
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer

    from unskill.stats.calibrate import calibrate_skills
    from unskill.stats.datasets import load_dataset

    if not args.out_dir or args.out:
        raise UnskillError("unskill calibrate: several --stats write one file each: give --out-dir DIR, not --out")
    model = OnnxLM(args.model)
    stats = _named_stats(args.stats, model.manifest)
    paths = dict(zip(stats, (_split_named(value)[1] for value in args.stats)))   # same order as the values
    forget_specs = {}
    for value in args.forget:
        name, spec = _split_named(value)
        if not name:
            raise UnskillError(f"unskill calibrate: --forget {value!r}: several skills need NAME=SPEC")
        forget_specs[name] = spec
    forget = {name: load_dataset(spec, args.data_dir, args.limit) for name, spec in forget_specs.items()}
    retain = load_dataset(args.retain, args.data_dir, args.limit) if args.retain else None
    results = calibrate_skills(model, TextTokenizer(args.model, model.manifest), stats, forget, retain,
                               args.target, -1 if args.layer is None else args.layer, not args.no_chat)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        _print_calibration(name, paths[name], result)
        retain_spec = "+".join([spec for other, spec in forget_specs.items() if other != name]
                               + ([args.retain] if args.retain else []))
        write_json(str(out_dir / f"ksd-{name}.json"),
                   {"method": "ksd", "source": model.manifest.source, "skill": stats[name].skill, "setting": name,
                    "stats": paths[name], "retain": retain_spec, "forget": forget_specs[name],
                    "target": args.target, **result.as_dict()})
    print(f"wrote {len(results)} calibrations to {out_dir}")
    return 0


def _print_calibration(name: str, stats_path: str, result) -> None:
    coverage = (f", forget refused {result.forget_abstain:.1%} of {result.forget_items}"
                if result.forget_items is not None else "")
    print(f"{name}: alpha {result.alpha:.4g} (x k, layer {result.layer}): retain refused "
          f"{result.retain_abstain:.1%} of {result.retain_items}{coverage}\n"
          f"  use: ksd-run --stats {stats_path} --alpha {result.alpha:.4g} --layers {result.layer}")
