"""`unskill serve`: the OpenAI-compatible guarded server (runtime/server.py) on uvicorn."""

from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path


def add_parser(subparsers) -> None:
    from unskill.runtime.ksd import ALPHA_MODES

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with the KSD guard and batching")
    p.add_argument("--model", required=True, help="directory written by `unskill export`")
    p.add_argument("--stats", action="append", default=[], help="stats .npz of a skill to refuse (repeatable)")
    p.add_argument("--alpha", type=float, help="cube half-width (default: each stats file's stored rule; a file "
                   "without one is refused: make it with `unskill guard`)")
    p.add_argument("--rule", choices=("stored", "paper"), default=None,
                   help="paper: the paper's cube at --alpha (default 1.0 x k), for stats without a stored rule")
    p.add_argument("--alpha-mode", choices=ALPHA_MODES, default="k")
    p.add_argument("--layers", help="FFL layers to check: comma-separated, or 'all' (default: the stored rule's, else -1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("UNSKILL_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $UNSKILL_API_KEY; none: open)")
    p.add_argument("--model-name", help="the id clients use (default: the model directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch; more get 503")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--context", type=int, help="prompt + max_tokens limit (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--hold-tokens", type=int, default=16,
                   help="streams send nothing until the guard passed this many tokens (-1: the whole answer)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--abstain-message", default=None)
    group = p.add_argument_group("Ray Serve (needs the `ray` extra; model and stats files on shared storage)")
    group.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="serve as a Ray Serve deployment: 'auto', ray://HOST:10001 or HOST:6379, or no value for "
                            "a local cluster; --host/--port are then Serve's HTTP proxy")
    group.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas, each with the model and the guard")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (its onnxruntime threads)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (> 0: CUDA sessions)")
    p.set_defaults(run=run)


def check_args(args: argparse.Namespace) -> None:
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.statsfile import alpha_problem

    for name in ("max_batch", "max_queue", "max_tokens", "default_max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UnskillError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.context is not None and args.context < 2:
        raise UnskillError(f"--context must be >= 2, got {args.context}")
    problem = alpha_problem(args.alpha, args.alpha_mode) if args.alpha is not None else None
    if problem:
        raise UnskillError(f"--alpha {problem}")
    if args.ray is not None and (args.replicas < 1 or args.replica_cpus <= 0 or args.replica_gpus < 0):
        raise UnskillError(f"--replicas must be >= 1, --replica-cpus > 0, --replica-gpus >= 0, got "
                           f"{args.replicas}, {args.replica_cpus}, {args.replica_gpus}")
    if args.hold_tokens < -1:
        raise UnskillError(f"--hold-tokens must be >= -1, got {args.hold_tokens}")
    if not 0 <= args.port <= 65535:
        raise UnskillError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UnskillError("--api-key is empty")
    try:   # fail now, in one line, rather than after the model has loaded
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UnskillError(f"cannot listen on {args.host}:{args.port} ({reason})") from None


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.ray is not None:
        from unskill.cluster.serve import serve_on_ray   # Ray Serve replicas of the same app
        return serve_on_ray(args, build_server)
    import uvicorn

    app, name = build_server(args)
    print(f"unskill serve: {name} on http://{args.host}:{args.port}/v1 "
          f"({len(args.stats)} stats file(s), batch {args.max_batch}, auth {'on' if args.api_key else 'off'})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def build_server(args: argparse.Namespace, device: str | None = None, threads: int | None = None):
    """(the guarded ASGI app, the model's name) for these arguments; each Ray Serve replica builds its own."""
    from unskill.runtime import ABSTAIN_MESSAGE, load
    from .ksd_run import parse_layers
    from unskill.runtime.engine import BatchEngine
    from unskill.runtime.manifest import load_manifest
    from unskill.runtime.server import ServeLimits, build_app

    # As in ksd-run: without --alpha and --layers each stats file's calibrated rule guards (`unskill calibrate`).
    layers = parse_layers(args.layers, load_manifest(args.model).num_layers) if args.layers is not None else None
    generator = load(args.model, args.stats, args.alpha, args.alpha_mode, layers, device or args.device,
                     threads or args.threads, args.abstain_message or ABSTAIN_MESSAGE, rule=args.rule)
    engine = BatchEngine(generator, args.max_batch, args.max_queue)
    limits = ServeLimits(args.max_body_bytes, args.max_tokens, args.default_max_tokens, args.context, args.hold_tokens)
    name = args.model_name or Path(args.model).resolve().name
    return build_app(engine, name, args.api_key, limits), name
