"""`unskill export --model M --out DIR` and `unskill edit METHOD --model DIR --out DIR2` (exporter/)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a HF model, .gguf or built-in name to ONNX with FFL outputs")
    parser.add_argument("--model", required=True, help="HF directory, .gguf file, or smollm2-135m / gemma3-270m")
    parser.add_argument("--out", required=True, help="new directory for model.onnx, tokenizer.json, unskill.json")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep optimum's plain graph (default: fused, GroupQueryAttention; `unskill edit fuse`)")
    parser.add_argument("--no-pack", action="store_true",
                        help="fused graph: one MatMul per projection (default: q/k/v and gate/up packed, exact)")
    _add_target(parser)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def _add_target(parser) -> None:
    parser.add_argument("--target", choices=("full", "deploy"), default="full",
                        help="full: graph with key/pre-activation outputs for stats and edits; deploy: a serving "
                             "folder (logits, present.*, key_last.*; onnx/model.onnx), as `unskill edit slim`")
    parser.add_argument("--no-guard", action="store_true", help="with --target deploy: drop key_last.* too")
    parser.add_argument("--guard", action="append", default=[], metavar="NPZ",
                        help="stats file whose KSD rule goes into the graph as guard.refuse / guard.score.* outputs "
                             "(repeatable; as `unskill edit guard`)")
    _add_rule(parser, "--guard")


def _add_rule(parser, stats_option: str) -> None:
    """--rule as ksd-run's: a stats file without a stored rule is refused unless the paper's cube is asked for."""
    parser.add_argument("--rule", choices=("stored", "paper"), default=None,
                        help=f"stored: each {stats_option} file's calibrated rule, stored by `unskill guard` (the "
                             f"default; a file without one is refused); paper: the paper's cube (last layer, "
                             f"1 x k) for every {stats_option} file")


def _check_rule_has_stats(rule: str | None, guard_stats) -> None:
    """--rule chooses among --guard's stats files' rules: alone it would be silently ignored."""
    from unskill.runtime.errors import UnskillError

    if rule and not guard_stats:
        raise UnskillError(f"--rule {rule} applies to --guard's stats files; give --guard NPZ")


def _with_target(args: argparse.Namespace, build):
    """Run build(out) for --target full without --guard; else build the full model in a hidden sibling, then
    slim it (deploy) and/or put the guard of --guard's stats files into its graph."""
    import shutil
    import tempfile
    from pathlib import Path

    from unskill.exporter.folder import refuse_nonempty_out
    from unskill.exporter.guard_graph import require_rules
    from unskill.runtime.errors import UnskillError

    out = Path(args.out)
    guard_stats = list(getattr(args, "guard", None) or [])
    rule = getattr(args, "rule", None)
    deploy = getattr(args, "target", "full") == "deploy"
    _check_rule_has_stats(rule, guard_stats)
    if not deploy and not guard_stats:
        return build(out)
    refuse_nonempty_out(out)
    if guard_stats and getattr(args, "no_guard", False):
        raise UnskillError("--guard and --no-guard contradict each other: a guard reads key_last.*")
    if guard_stats:   # a bad stats file, or one without a rule, fails now, not after minutes of export
        require_rules(guard_stats, rule)
    from unskill.exporter.deploy import guard_edit, slim

    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unskill-full-", dir=out.resolve().parent) as scratch:
        build(Path(scratch) / "full")
        if deploy:
            done = slim(Path(scratch) / "full", out, guard=not args.no_guard, guard_stats=guard_stats,
                        guard_rule=rule)
        else:
            done = guard_edit(Path(scratch) / "full", guard_stats, out, rule=rule)
        shutil.rmtree(Path(scratch) / "full")
    return done


def run(args: argparse.Namespace) -> int:
    from unskill.exporter.export import export_model

    manifest = _with_target(args, lambda out: export_model(args.model, out, opset=args.opset,
                                                           progress=not args.no_progress,
                                                           fused=not args.no_fuse, pack=not args.no_pack))
    print(f"exported {args.model} -> {args.out} ({manifest.num_layers} layers, key width {manifest.key_width}, "
          f"{manifest.fingerprint[:19]})")
    return 0


def add_edit_parser(subparsers) -> None:
    edit = subparsers.add_parser("edit", help="bake Neuron Adjust or Selective Pruning into an exported model")
    methods = edit.add_subparsers(dest="method", required=True)
    na = methods.add_parser("na", help="Neuron Adjust: graph nodes that move forget-like pre-activations")
    prune = methods.add_parser("prune", help="Selective Pruning: remove the most forget-specific FFL neurons")
    for p in (na, prune):
        p.add_argument("--model", required=True, help="directory written by `unskill export` (or an edited one)")
        p.add_argument("--stats", required=True, help="stats .npz of this model, built with --retain")
        p.add_argument("--out", required=True, help="new directory for the edited model")
        _add_target(p)
    na.add_argument("--ratio", type=float, default=0.03, help="share of all FFL neurons to adjust (default 0.03)")
    na.add_argument("--seed", type=int, default=0)
    na.add_argument("--form", choices=("masked", "gather"), default="masked",
                    help="masked: rule over the whole layer; gather: only the selected columns, scattered back")
    na.add_argument("--noise", choices=("hash", "session", "input"), default="hash",
                    help="hash: noise from (seed, position, neuron), the same output for the same prompt; session: "
                         "stateful RandomUniformLike op; input: na_noise.{layer} inputs (for exact tests)")
    prune.add_argument("--ratio", type=float, default=0.02, help="share of all FFL neurons to remove (default 0.02)")
    prune.add_argument("--steps", type=int, default=1, help="prune ratio/steps at a time, re-probing in between")
    prune.add_argument("--scorer", choices=("abs", "freq", "rms"), default="abs")
    prune.add_argument("--data-dir", help="benchmark data for re-probing (default: $UNSKILL_DATA_DIR)")
    prune.add_argument("--no-progress", action="store_true")
    quant = methods.add_parser("quantize", help="int8 (MatMulInteger) or int4 (MatMulNBits) weights")
    quant.add_argument("--model", required=True)
    quant.add_argument("--out", required=True)
    quant.add_argument("--mode", choices=("int8", "int4", "fp16"), default="int8",
                       help="fp16: weights and compute in float16 for --device cuda, inputs/outputs stay fp32")
    quant.add_argument("--block-size", type=int, default=32, help="int4: weights per scale (default 32)")
    quant.add_argument("--accuracy-level", type=int, default=4,
                       help="int4: MatMulNBits compute type, 4 = int8 activations (fastest on CPU), 0 = fp32")
    quant.add_argument("--embeddings", action="store_true", help="int4: quantize the token embedding too")
    quant.add_argument("--asymmetric", action="store_true",
                       help="int4: a zero point per block (GGUF Q4_1/Q4_K weights are min+scale blocks)")
    quant.add_argument("--grid", choices=("source", "exact", "rtn"), default="source",
                       help="int4: source (default) keeps weights that lie on a block grid (dequantized GGUF) on "
                            "it, block mins to 1/238; exact: to float rounding (slower); rtn: re-quantize all")
    quant.add_argument("--grid-bits", type=int, choices=(4, 8), default=8,
                       help="int4 --grid source: widest grid kept exactly (8: Q5_0/Q6_K/Q8_0 as 8-bit; 4: those re-quantized to 4-bit)")
    quant.add_argument("--residual-digits", type=int, choices=(1, 2), default=2,
                       help="int4 --grid source: 4-bit digits carrying Q4_1/Q4_K block mins off the zero-point "
                            "grid (2: to 1/238, 1: to 1/14, fewer rows)")
    quant.add_argument("--block-8bit", choices=("source", "head", "all"), default="head",
                       help="int4 --grid source: which 8-bit grids are re-rounded to 8-bit blocks of 128 (MLAS's "
                            "faster kernel): the LM head (default; top-1 as fp32), all (Q5_0/Q6_K too), none (source)")
    quant.add_argument("--no-pack", action="store_true",
                       help="int4: keep one MatMulNBits per projection (default: q/k/v and gate/up packed, exact)")
    _add_target(quant)
    quant.set_defaults(run=run_quantize)
    slim = methods.add_parser("slim", help="a serving folder: only logits, present.* and key_last.* (onnx/model.onnx)")
    slim.add_argument("--model", required=True, help="directory written by `unskill export` (or an edited one)")
    slim.add_argument("--out", required=True, help="new directory for the deploy folder")
    slim.add_argument("--no-guard", action="store_true", help="drop key_last.* too (no KSD guard will run)")
    slim.add_argument("--guard", action="append", default=[], metavar="NPZ",
                      help="stats file whose KSD rule goes into the graph (guard.refuse; repeatable)")
    _add_rule(slim, "--guard")
    slim.set_defaults(run=run_slim)
    fuse = methods.add_parser("fuse", help="fuse a --no-fuse export: GroupQueryAttention, onnxruntime's fusions, key outputs kept")
    fuse.add_argument("--model", required=True)
    fuse.add_argument("--out", required=True)
    fuse.add_argument("--model-type", choices=("qwen3", "gpt2"), default="qwen3",
                      help="onnxruntime.transformers fusion table (qwen3: llama-shaped, adds RotaryEmbedding)")
    fuse.add_argument("--rotary-in-op", action="store_true",
                      help="packed q/k/v and GroupQueryAttention's own rotary (llama-style; faster decode, "
                           "left-padded rows' keys move by float rounding with their padding)")
    fuse.add_argument("--no-pack", action="store_true",
                      help="one MatMul per projection (default: q/k/v and gate/up packed into one each, exact)")
    fuse.set_defaults(run=run_fuse)
    packer = methods.add_parser("pack", help="q/k/v and gate/up MatMuls packed into one each (exact, faster decode; "
                                             "the default export and int4 quantize already pack)")
    packer.add_argument("--model", required=True)
    packer.add_argument("--out", required=True)
    _add_target(packer)
    packer.set_defaults(run=run_pack)
    guard = methods.add_parser("guard", help="the KSD guard of stats files as graph outputs guard.refuse / "
                                             "guard.score.SKILL, enforced by any onnxruntime stack")
    guard.add_argument("--model", required=True, help="directory written by `unskill export` (full or deploy)")
    guard.add_argument("--stats", action="append", required=True, metavar="NPZ",
                       help="stats file of this model (repeatable) whose stored rule goes into the graph")
    _add_rule(guard, "--stats")
    guard.add_argument("--out", required=True, help="new directory for the guarded model")
    guard.set_defaults(run=run_guard)
    probe = methods.add_parser("probe-graph", help="add probe.onnx (keys only, no LM head) to an older export, in place")
    probe.add_argument("--model", required=True)
    probe.set_defaults(run=run_probe_graph)
    na.set_defaults(run=run_na)
    prune.set_defaults(run=run_prune)


def _refuse_guarded(model_dir: str, method: str) -> None:
    """NA and pruning change the keys the graph's guard reads (and pruning their width): the guard goes in last."""
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.manifest import load_manifest

    if load_manifest(model_dir).guard:
        raise UnskillError(f"{model_dir}: carries a KSD guard in its graph; {method} changes the keys it reads: "
                           f"edit the unguarded model, then `unskill edit guard` (or --guard) with stats of the result")


def run_na(args: argparse.Namespace) -> int:
    from unskill.exporter.neuron_adjust import neuron_adjust

    _refuse_guarded(args.model, "na")
    manifest = _with_target(args, lambda out: neuron_adjust(args.model, args.stats, args.ratio, out, args.noise,
                                                            args.seed, args.form))
    edit = next(e for e in reversed(manifest.edits) if e["method"] == "na")
    print(f"NA on {edit['selected']} neurons ({args.ratio:.2%}) -> {args.out}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from unskill.exporter.prune import prune

    _refuse_guarded(args.model, "prune")
    manifest = _with_target(args, lambda out: prune(args.model, args.stats, args.ratio, out, args.steps, args.scorer,
                                                    args.data_dir, not args.no_progress))
    edit = next(e for e in reversed(manifest.edits) if e["method"] == "prune")
    print(f"pruned {edit['removed']} neurons ({args.ratio:.2%}, {args.steps} step(s)) -> {args.out}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from unskill.exporter.quantize import quantize

    _with_target(args, lambda out: quantize(args.model, out, args.mode, block_size=args.block_size,
                                            accuracy_level=args.accuracy_level, embeddings=args.embeddings,
                                            symmetric=not args.asymmetric, grid=args.grid,
                                            grid_bits=args.grid_bits, pack=not args.no_pack,
                                            digits=args.residual_digits,
                                            block_8bit=args.block_8bit))
    print(f"quantized {args.model} to {args.mode} -> {args.out}")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from unskill.exporter.pack import pack

    manifest = _with_target(args, lambda out: pack(args.model, out))
    edit = next(e for e in reversed(manifest.edits) if e["method"] == "pack")
    print(f"packed {edit['packed_projections']} projections of {args.model} -> {args.out}")
    return 0


def run_slim(args: argparse.Namespace) -> int:
    from unskill.exporter.deploy import slim

    _check_rule_has_stats(args.rule, args.guard)
    manifest = slim(args.model, args.out, guard=not args.no_guard, guard_stats=args.guard, guard_rule=args.rule)
    kept = "logits, present.*" + (", key_last.*" if manifest.key_last_outputs else "")
    print(f"deploy folder ({kept}) -> {args.out}/{manifest.model_file}")
    return 0


def run_guard(args: argparse.Namespace) -> int:
    from unskill.exporter.deploy import guard_edit

    manifest = guard_edit(args.model, args.stats, args.out, rule=args.rule)
    rules = "; ".join(f"{s['skill']}: {s['rule']}" for s in manifest.guard["skills"])
    print(f"guard in the graph ({rules}) -> {args.out}")
    return 0


def run_fuse(args: argparse.Namespace) -> int:
    from unskill.exporter.fuse import fuse

    edit = fuse(args.model, args.out, args.model_type, rotary_in_op=args.rotary_in_op, pack=not args.no_pack).edits[-1]
    print(f"fused {args.model}: {edit['nodes_before']} -> {edit['nodes_after']} nodes -> {args.out}")
    return 0


def run_probe_graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unskill.runtime.errors import UnskillError
    from unskill.runtime.manifest import load_manifest

    from unskill.exporter.folder import write_probe_graph
    from unskill.exporter.metadata import write_metadata

    directory = Path(args.model)
    manifest = load_manifest(directory)
    if not manifest.key_last_outputs:
        raise UnskillError(f"{directory}: export lacks key_last outputs; re-export it with `unskill export`")
    write_probe_graph(directory, manifest)
    manifest.save(directory)
    write_metadata(directory, manifest, None)
    print(f"wrote {directory / manifest.probe_file}")
    return 0
