"""`unskill export --model M --out DIR`."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a HF model, .gguf or built-in name to ONNX with FFL outputs")
    parser.add_argument("--model", required=True, help="HF directory, .gguf file, or smollm2-135m / gemma3-270m")
    parser.add_argument("--out", required=True, help="new directory for model.onnx, tokenizer.json, unskill.json")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .export import export_model

    manifest = export_model(args.model, args.out, opset=args.opset, progress=not args.no_progress)
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
    na.add_argument("--ratio", type=float, default=0.03, help="share of all FFL neurons to adjust (default 0.03)")
    na.add_argument("--seed", type=int, default=0)
    na.add_argument("--form", choices=("masked", "gather"), default="masked",
                    help="masked: rule over the whole layer; gather: only the selected columns, scattered back")
    na.add_argument("--noise", choices=("random", "input"), default="random",
                    help="random: RandomUniform op inside the graph; input: na_noise.{layer} inputs (for exact tests)")
    prune.add_argument("--ratio", type=float, default=0.02, help="share of all FFL neurons to remove (default 0.02)")
    prune.add_argument("--steps", type=int, default=1, help="prune ratio/steps at a time, re-probing in between")
    prune.add_argument("--scorer", choices=("abs", "freq", "rms"), default="abs")
    prune.add_argument("--data-dir", help="benchmark data for re-probing (default: $UNSKILL_DATA_DIR)")
    prune.add_argument("--no-progress", action="store_true")
    quant = methods.add_parser("quantize", help="int8 (MatMulInteger) or int4 (MatMulNBits) weights")
    quant.add_argument("--model", required=True)
    quant.add_argument("--out", required=True)
    quant.add_argument("--mode", choices=("int8", "int4"), default="int8")
    quant.add_argument("--block-size", type=int, default=32, help="int4: weights per scale (default 32)")
    quant.add_argument("--accuracy-level", type=int, default=4,
                       help="int4: MatMulNBits compute type, 4 = int8 activations (fastest on CPU), 0 = fp32")
    quant.add_argument("--embeddings", action="store_true", help="int4: quantize the token embedding too")
    quant.add_argument("--asymmetric", action="store_true",
                       help="int4: a zero point per block (GGUF Q4_1/Q4_K weights are min+scale blocks)")
    quant.set_defaults(run=run_quantize)
    fuse = methods.add_parser("fuse", help="onnxruntime's fusions + offline optimization, key outputs kept (opt-in)")
    fuse.add_argument("--model", required=True)
    fuse.add_argument("--out", required=True)
    fuse.add_argument("--model-type", choices=("qwen3", "gpt2"), default="qwen3",
                      help="onnxruntime.transformers fusion table (qwen3: llama-shaped, adds RotaryEmbedding)")
    fuse.set_defaults(run=run_fuse)
    probe = methods.add_parser("probe-graph", help="add probe.onnx (keys only, no LM head) to an older export, in place")
    probe.add_argument("--model", required=True)
    probe.set_defaults(run=run_probe_graph)
    na.set_defaults(run=run_na)
    prune.set_defaults(run=run_prune)


def run_na(args: argparse.Namespace) -> int:
    from .neuron_adjust import neuron_adjust

    manifest = neuron_adjust(args.model, args.stats, args.ratio, args.out, args.noise, args.seed, args.form)
    edit = manifest.edits[-1]
    print(f"NA on {edit['selected']} neurons ({args.ratio:.2%}) -> {args.out}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from .prune import prune

    manifest = prune(args.model, args.stats, args.ratio, args.out, args.steps, args.scorer, args.data_dir,
                     not args.no_progress)
    print(f"pruned {manifest.edits[-1]['removed']} neurons ({args.ratio:.2%}, {args.steps} step(s)) -> {args.out}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    quantize(args.model, args.out, args.mode, block_size=args.block_size, accuracy_level=args.accuracy_level,
             embeddings=args.embeddings, symmetric=not args.asymmetric)
    print(f"quantized {args.model} to {args.mode} -> {args.out}")
    return 0


def run_fuse(args: argparse.Namespace) -> int:
    from .fuse import fuse

    edit = fuse(args.model, args.out, args.model_type).edits[-1]
    print(f"fused {args.model}: {edit['nodes_before']} -> {edit['nodes_after']} nodes -> {args.out}")
    return 0


def run_probe_graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unskill.runtime.errors import UnskillError
    from unskill.runtime.manifest import load_manifest

    from .export import write_probe_graph

    directory = Path(args.model)
    manifest = load_manifest(directory)
    if not manifest.key_last_outputs:
        raise UnskillError(f"{directory}: export lacks key_last outputs; re-export it with `unskill export`")
    write_probe_graph(directory, manifest)
    manifest.save(directory)
    print(f"wrote {directory / manifest.probe_file}")
    return 0
