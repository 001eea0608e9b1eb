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
