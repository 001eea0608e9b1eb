"""`unskill serve --ray`: the OpenAI-compatible app of runtime/server.py as a Ray Serve deployment.

Each replica builds the same app `unskill serve` runs (cli/serve.build_server): its own model session, stats
files and KSD guard, its own batching engine; replicas share nothing and hold no request state, so Serve's
proxy may send any request to any of them. One HTTP endpoint (Serve's proxy, --host/--port), routed to
the replicas.
"""

from __future__ import annotations

import argparse
import time

from unskill.runtime.errors import UnskillError

from .pool import RayOptions, connect, import_ray

APP_NAME = "unskill"


class GuardedReplica:
    """One replica: checks the model is the driver's, then builds the app (Serve calls __serve_build_asgi_app__
    after the constructor and runs the app's lifespan, which starts the batching engine)."""

    def __init__(self, args: argparse.Namespace, fingerprint: str, build_server):
        """build_server: cli/serve.build_server, passed in (the commands import this package, not back)."""
        import socket

        from unskill.runtime.manifest import load_manifest

        found = load_manifest(args.model).fingerprint
        if found != fingerprint:
            raise UnskillError(f"replica on {socket.gethostname()}: {args.model} holds another model (fingerprint "
                               f"{found[:23]}, the driver's {fingerprint[:23]}); every node needs the same files")
        device = "cuda" if args.replica_gpus > 0 else "cpu"
        # (not `self.app`: Serve's wrapper class owns that name)
        self.guarded_app, self.model_name = build_server(args, device, max(1, int(args.replica_cpus)))

    def __serve_build_asgi_app__(self):
        return self.guarded_app


def deploy(args: argparse.Namespace, build_server) -> str:
    """Starts (or updates) the deployment and returns its base URL; the replicas keep running after it returns.
    build_server(args, device, threads) -> (ASGI app, model name) runs in every replica."""
    import_ray()
    from ray import serve

    from unskill.runtime.manifest import load_manifest

    fingerprint = load_manifest(args.model).fingerprint   # the driver's: every replica must match it
    connect(RayOptions(address=args.ray))
    serve.start(http_options={"host": args.host, "port": args.port})
    # Serve's own queue limit sits above the engine's, so the engine answers 503 when it is full, as without Ray.
    deployment = serve.deployment(
        name="guarded", num_replicas=args.replicas, max_ongoing_requests=args.max_batch + args.max_queue,
        max_constructor_retry_count=3,   # a replica that refuses its files will refuse them again
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
    )(serve.ingress()(GuardedReplica))
    try:
        serve.run(deployment.bind(args, fingerprint, build_server), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:   # a replica's refusal arrives wrapped in Serve's deployment error
        from .pool import _worker_error
        raise UnskillError(_worker_error(exc)) from None
    return f"http://{args.host}:{args.port}/v1"


def serve_on_ray(args: argparse.Namespace, build_server) -> int:
    from ray import serve

    url = deploy(args, build_server)
    print(f"unskill serve: {args.model} on {url} ({args.replicas} Ray Serve replicas, {len(args.stats)} stats "
          f"file(s), batch {args.max_batch} each, auth {'on' if args.api_key else 'off'}); Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
