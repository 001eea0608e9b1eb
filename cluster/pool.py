"""Run a list of work items on a Ray Data actor pool and get one result per item back, by index.

Each actor loads its model once (one onnxruntime session per actor) from a picklable `work` description and
then maps batches of items. A batch's output is a pure function of its items, and results are keyed by item
index on the driver: when Ray retries a failed task (an actor died), its output replaces, never adds to, what
the driver keeps. Ray Data schedules, retries and streams; nothing here is a scheduler of our own.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unskill.runtime.errors import UnskillError

# Test-only: a path; the first actor call that finds no file there creates it and kills its own process, so a
# test can check that a killed actor's batch is retried and counted once.
CRASH_ENV = "UNSKILL_RAY_CRASH_ONCE"
ACTOR_RESTARTS = 4   # a dead actor is restarted (model loaded again) this many times ...
TASK_RETRIES = 4     # ... and a batch it held is retried this many times before the job fails


@dataclass(frozen=True)
class RayOptions:
    address: str = "local"      # local: a cluster started in this process; auto: the running one; ray://… or host:port
    actors: int = 2             # actors in the pool, each with its own onnxruntime session
    actor_cpus: float = 1.0     # CPUs reserved per actor (its onnxruntime threads)
    actor_gpus: float = 0.0     # GPUs per actor; > 0 runs the session on CUDA
    progress: bool = True

    @property
    def device(self) -> str:
        return "cuda" if self.actor_gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, int(self.actor_cpus))


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS], --actors, --actor-cpus, --actor-gpus (stats, calibrate, eval)."""
    group = parser.add_argument_group("Ray cluster (needs the `ray` extra; model files on shared storage)")
    group.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run on Ray: 'auto' (the running cluster), ray://HOST:10001 or HOST:6379, or no value "
                            "for a local cluster started in this process")
    group.add_argument("--actors", type=int, default=2, help="actors in the pool (default 2)")
    group.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    group.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per actor (default 0: CPU sessions)")


def ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The options of --ray, or None when the job runs in this process."""
    if getattr(args, "ray", None) is None:
        return None
    if args.actors < 1:
        raise UnskillError(f"--actors must be >= 1, got {args.actors}")
    if args.actor_cpus <= 0 or args.actor_gpus < 0:
        raise UnskillError(f"--actor-cpus must be > 0 and --actor-gpus >= 0, got {args.actor_cpus}, {args.actor_gpus}")
    import_ray()
    return RayOptions(args.ray, args.actors, args.actor_cpus, args.actor_gpus, not getattr(args, "no_progress", False))


def import_ray():
    try:
        import ray
    except ImportError:
        raise UnskillError("--ray needs Ray: pip install 'unskill[ray]'") from None
    return ray


def connect(options: RayOptions) -> None:
    """Joins (or starts) the cluster once per process; a cluster already joined (tests) is kept."""
    ray = import_ray()
    if ray.is_initialized():
        return
    address = None if options.address == "local" else options.address
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UnskillError(f"--ray {options.address}: cannot join the cluster ({str(exc).splitlines()[0]})") from None


class _Actor:
    """One per pool slot: checks the model, loads `work` once, maps batches of pickled items."""

    def __init__(self, work, model_dir: str, fingerprint: str, crash_marker: str | None):
        from unskill.runtime.manifest import load_manifest

        self.error, self.crash_marker, self.run = None, crash_marker, None
        where = f"worker on {socket.gethostname()}"
        try:
            found = load_manifest(Path(model_dir)).fingerprint
            if found != fingerprint:
                self.error = (f"{where}: {model_dir} holds another model (fingerprint {found[:23]}, the driver's "
                              f"{fingerprint[:23]}); every node needs the same files at the same path")
            else:
                self.run = work.start()
        except UnskillError as exc:
            self.error = f"{where}: {exc}"

    def __call__(self, batch: dict) -> dict:
        if self.error:
            raise UnskillError(self.error)
        if self.crash_marker and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).touch()
            os._exit(1)   # the actor's process dies mid-run: Ray restarts it and retries this batch
        # Items and results travel pickled: they are our own objects (token lists, Moments, records) between our
        # own processes, and Arrow, under Ray Data, has no column type for them.
        results = self.run([pickle.loads(payload) for payload in batch["payload"]])
        return {"index": np.asarray(batch["index"]),
                "result": np.array([pickle.dumps(result, protocol=5) for result in results], dtype=object)}


def imap_items(items: list, work, options: RayOptions, *, model_dir, fingerprint: str, desc: str,
               items_per_call: int = 1):
    """Yields (index, result) as results arrive, every index once. `work.start()` runs in each actor and
    returns a function list[item] -> list[result] that must be a pure function of its items."""
    ray = import_ray()
    connect(options)
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()   # (importing ray.data sets its loggers up: quiet them after)
    logging.getLogger("ray.data").setLevel(logging.ERROR)   # its per-run INFO lines would bury the progress bar
    context.enable_progress_bars = False   # ours below, as the single-process path shows it
    context.enable_operator_progress_bars = False
    rows = [{"index": index, "payload": pickle.dumps(item, protocol=5)} for index, item in enumerate(items)]
    if not rows:
        return
    # one block per item: a retry re-runs one item, and every actor of the pool gets work
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _Actor, batch_size=items_per_call, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(options.actors, len(rows))),
        num_cpus=options.actor_cpus, num_gpus=options.actor_gpus or None,
        fn_constructor_kwargs={"work": work, "model_dir": str(model_dir), "fingerprint": fingerprint,
                               "crash_marker": os.environ.get(CRASH_ENV)},
        max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES)
    seen = set()
    try:
        with tqdm(total=len(rows), desc=desc, unit="task", disable=not options.progress) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for index, payload in zip(batch["index"], batch["result"]):
                    index = int(index)
                    if index in seen:   # a retried batch's second copy: the same result, kept once
                        continue
                    seen.add(index)
                    bar.update()
                    yield index, pickle.loads(payload)
    except UnskillError:
        raise
    except Exception as exc:   # Ray wraps a worker's error in its own types: report ours in one line
        raise UnskillError(_worker_error(exc)) from None
    missing = len(rows) - len(seen)
    if missing:
        raise UnskillError(f"{desc}: {missing} of {len(rows)} items came back from no worker")


def map_items(items: list, work, options: RayOptions, **kwargs) -> list:
    """The results of imap_items in item order."""
    results = dict(imap_items(items, work, options, **kwargs))
    return [results[index] for index in range(len(items))]


def _worker_error(exc: BaseException) -> str:
    """The first UnskillError in the chain (a worker's one-line refusal), else the exception's first line."""
    seen = exc
    while seen is not None:
        if isinstance(seen, UnskillError) and seen.args:
            return str(seen.args[0]).splitlines()[0]
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    marker = "UnskillError: "
    if marker in text:
        return text[text.index(marker) + len(marker):].splitlines()[0]
    return f"ray: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"
