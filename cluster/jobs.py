"""The Ray versions of the three batch jobs, as drop-ins for the single-process pieces they replace:

  ray_prober     for stats/probe.Prober (`unskill stats`): prompt and text passes on one pool, each task's
                 Moments merged in task order on the driver (Moments.merge, as `unskill stats --merge` does)
  RayKeyReader   for runtime/keys.KeyReader (`unskill calibrate`, `unskill guard`, the bypass benchmark):
                 last-token keys, and the keys of the prompt's last tokens (window_keys)
  RayGuard       what `unskill guard --ray` hands stats/guard.make_guard: the prober and the reader above
  eval_runner    for the item runners of evals/evaluate.Harness (`unskill eval`): per-item records

The driver tokenizes and plans the batches exactly as the single-process pass does (runtime/keys.plan_batches:
the same shared prefix, the same rows in each batch), so every key is the same float; sums differ from the
single-process file by float64 summation order only. Workers load the model by path and run one onnxruntime
session each; the driver reads the manifest and the tokenizer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unskill.runtime.manifest import load_manifest

from .pool import RayOptions, imap_items, map_items

ROWS_PER_TASK = 32   # prompts per task: enough to keep an actor busy, small enough to spread over the pool


class DriverModel:
    """What the driver needs of a model when the actors do the forward passes: its manifest and directory
    (the weights load in the actors only)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)


@dataclass(frozen=True)
class _ModelWork:
    model_dir: str
    device: str = "cpu"
    threads: int = 1

    def _load(self, graph: str = "model"):
        from unskill.runtime.session import OnnxLM

        return OnnxLM(self.model_dir, self.device, self.threads, graph=graph)

    def _load_keys_only(self):
        """The keys-only probe graph alone where the export has one (no second session of the full graph)."""
        return self._load("probe") if load_manifest(Path(self.model_dir)).probe_file else self._load()


@dataclass(frozen=True)
class PrefillTask:
    """Batches of one planned prompt pass: each row is prefix + suffix; the prefix's KV cache runs once."""
    prefix: tuple
    batches: list                 # list of batches, each a list of suffix token lists
    layers: tuple                 # layers whose last-token key is returned
    moments: bool = False         # True: the `ksd` Moments over the rows (all layers), not the keys


@dataclass(frozen=True)
class KeyWork(_ModelWork):
    def start(self):
        run = _prefill_runner(self._load_keys_only())
        return lambda tasks: [run(task) for task in tasks]


def _prefill_runner(model):
    """PrefillTask -> its rows' keys (or their `ksd` Moments) on this keys graph, as KeyReader computes them."""
    from unskill.runtime.keys import prefill_rows, prefix_cacher, require_key_last

    names = require_key_last(model.manifest, model.directory)
    cache_of = prefix_cacher(model)   # tasks of one chunk share a prefix: run it once per actor

    def one(task: PrefillTask):
        outputs = [names[i] for i in task.layers]
        keys = np.concatenate([np.stack([values[name] for name in outputs], axis=1) for values in
                               (prefill_rows(model, suffixes, len(task.prefix), cache_of(task.prefix), outputs)
                                for suffixes in task.batches)])
        return _ksd_moments(keys, model.manifest) if task.moments else keys

    return one


def _ksd_moments(keys: np.ndarray, manifest):
    from unskill.runtime.statsfile import GROUP_FIELDS, Moments

    moments = Moments.empty(GROUP_FIELDS["ksd"], manifest.num_layers, manifest.key_width)
    for layer in range(manifest.num_layers):
        moments.add(layer, keys[:, layer])
    return moments


def _plan(sequences: list[list[int]], batch_size: int, make_task, rows_per_task: int, keep: int = 1):
    """Tasks of whole batches, in the single-process plan's order (runtime/keys.plan_batches, `keep` tokens after
    the prefix), and the sequence indices of their rows; make_task(prefix tuple, batches of suffixes) -> a task."""
    from unskill.runtime.keys import plan_batches

    shared, batches = plan_batches(sequences, batch_size, keep=keep)
    prefix = tuple(sequences[0][:shared])
    per_task = max(1, rows_per_task // batch_size)
    tasks, rows = [], []
    for start in range(0, len(batches), per_task):
        group = batches[start:start + per_task]
        tasks.append(make_task(prefix, [[sequences[i][shared:] for i in batch] for batch in group]))
        rows.append([i for batch in group for i in batch])
    return tasks, rows


def _prefill_tasks(layers, moments: bool):
    """_plan's make_task for a last-token pass."""
    return lambda prefix, batches: PrefillTask(prefix, batches, tuple(layers), moments)


class RayKeyReader:
    """KeyReader's interface (last_keys) on the pool: the same keys, computed by the actors."""

    def __init__(self, model, options: RayOptions, batch_size: int = 8, rows_per_task: int = ROWS_PER_TASK):
        self.model, self.options, self.batch_size, self.rows_per_task = model, options, batch_size, rows_per_task
        self.work = KeyWork(str(model.directory), options.device, options.threads)

    def last_keys(self, sequences: list[list[int]], layers=None, desc: str = "keys", bar=None) -> np.ndarray:
        """bar: a tqdm counting prompts, advanced when the job is done (the pool shows its own progress)."""
        keys = self.last_keys_each([sequences], layers, desc)[0]
        if bar is not None:
            bar.update(len(sequences))
        return keys

    def last_keys_each(self, groups: list[list[list[int]]], layers=None, desc: str = "keys") -> list[np.ndarray]:
        """Each group planned on its own, as KeyReader plans it; all groups' tasks in one pool (one model load
        per actor for the bypass benchmark's dozen sets)."""
        from unskill.runtime.keys import resolve_layers

        manifest = self.model.manifest
        layers = resolve_layers(range(manifest.num_layers) if layers is None else layers, manifest.num_layers)
        keys = [np.empty((len(sequences), len(layers), manifest.key_width), dtype=np.float32) for sequences in groups]
        tasks, owners = [], []   # owners: per task, (group, the group's sequence indices of its rows)
        for group, sequences in enumerate(groups):
            if sequences:
                planned, rows = _plan(sequences, self.batch_size, _prefill_tasks(layers, False),
                                      self.rows_per_task)
                tasks += planned
                owners += [(group, task_rows) for task_rows in rows]
        for index, task_keys in imap_items(tasks, self.work, self.options, model_dir=self.model.directory,
                                           fingerprint=manifest.fingerprint, desc=desc):
            group, rows = owners[index]
            keys[group][rows] = task_keys
        return keys

    def window_keys(self, sequences: list[list[int]], last_layers, window_layers, positions: int, desc: str = "keys",
                    pool: bool = False):
        """KeyReader.window_keys on the pool (the actors load the full graph)."""
        return window_keys_on_pool(self.model, self.options, sequences, last_layers, window_layers, positions,
                                   self.batch_size, desc, pool, self.rows_per_task)


@dataclass(frozen=True)
class WindowTask:
    """Batches of one planned window pass (runtime/keys.prompt_window_keys): rows are prefix + suffix."""
    prefix: tuple
    batches: list                 # list of batches, each a list of suffix token lists
    last_layers: tuple            # layers whose last-token key is returned
    window_layers: tuple          # layers whose keys at the last `positions` tokens are returned
    positions: int
    pool: bool                    # their mean over the row's own tokens instead


@dataclass(frozen=True)
class WindowWork(_ModelWork):
    def start(self):
        from unskill.runtime.keys import prefill_rows, prefix_cacher, require_key_last, window_batch

        model = self._load()   # the full graph: the per-position key.* outputs
        last_of, window_of = require_key_last(model.manifest, model.directory), model.manifest.key_outputs
        cache_of = prefix_cacher(model)

        def one(task: WindowTask):
            last_names = [last_of[i] for i in task.last_layers]
            window_names = [window_of[i] for i in task.window_layers]
            parts = [window_batch(prefill_rows(model, suffixes, len(task.prefix), cache_of(task.prefix),
                                               last_names + window_names, tail=task.positions),
                                  np.array([len(task.prefix) + len(suffix) for suffix in suffixes]), last_names,
                                  window_names, task.positions, task.pool) for suffixes in task.batches]
            return tuple(None if parts[0][i] is None else np.concatenate([part[i] for part in parts])
                         for i in range(3))

        return lambda tasks: [one(task) for task in tasks]


def window_keys_on_pool(model, options: RayOptions, sequences: list[list[int]], last_layers, window_layers,
                        positions: int, batch_size: int, desc: str, pool: bool, rows_per_task: int):
    """runtime/keys.prompt_window_keys with its batches run by the actors: the same groups, shared prefixes and
    batches (plan_batches keeping `positions` tokens), so the same keys."""
    from unskill.runtime.keys import WindowArrays, prefix_groups

    out = WindowArrays(model, len(sequences), last_layers, window_layers, positions, pool)

    def make_task(prefix, batches):
        return WindowTask(prefix, batches, tuple(out.last_layers), tuple(out.window_layers), positions, pool)

    tasks, owners = [], []   # owners: per task, the sequence indices of its rows
    for group in prefix_groups(sequences, batch_size):
        planned, rows = _plan([sequences[i] for i in group], batch_size, make_task, rows_per_task, keep=positions)
        tasks += planned
        owners += [[group[i] for i in task_rows] for task_rows in rows]
    work = WindowWork(str(model.directory), options.device, options.threads)
    for index, part in imap_items(tasks, work, options, model_dir=model.directory,
                                  fingerprint=model.manifest.fingerprint, desc=desc):
        out.put(owners[index], part)
    return out.last, out.window, out.valid


@dataclass(frozen=True)
class TextTask:
    side: str
    batches: list                 # list of batches of token lists (every token counts)


@dataclass(frozen=True)
class ProbeWork(_ModelWork):
    """Both passes of `unskill stats` in one actor: prompt-pass tasks on the keys-only graph, text-pass tasks
    on the full one, so one pool serves the whole job."""

    def start(self):
        from unskill.stats.probe import ProbeConfig, Prober

        prober = Prober(self._load(), None, ProbeConfig(progress=False))   # the full graph (text pass)
        run_prefill = _prefill_runner(prober.key_model)   # its keys-only graph, as Prober.prompt_pass uses

        def one(task):
            if isinstance(task, PrefillTask):
                return run_prefill(task)
            return prober.text_moments(task.batches, task.side)

        return lambda tasks: [one(task) for task in tasks]


def _merge_in_order(results: list):
    merged = results[0]
    for result in results[1:]:
        merged = {name: merged[name].merge(result[name]) for name in merged} if isinstance(merged, dict) \
            else merged.merge(result)
    return merged


def ray_prober(model, tokenizer, config, options: RayOptions, rows_per_task: int = ROWS_PER_TASK):
    """A stats/probe.Prober whose passes run on the pool, all of a job's passes in one Ray Data job (imported
    lazily: stats stays free of this package)."""
    from unskill.runtime.keys import _batches
    from unskill.stats.probe import CHUNK, Prober

    class RayProber(Prober):
        def reader(self):
            return RayKeyReader(self.model, options, self.config.batch_size, rows_per_task)

        def prompt_tasks(self, dataset) -> list:
            sequences, tasks = self.prompt_sequences(dataset), []
            moments = _prefill_tasks(range(self.manifest.num_layers), True)
            # planned per CHUNK as the single-process pass does: the same shared prefix, the same batches
            for start in range(0, len(sequences), CHUNK):
                tasks += _plan(sequences[start:start + CHUNK], self.config.batch_size, moments, rows_per_task)[0]
            return tasks

        def text_tasks(self, dataset, side: str) -> list:
            batches = list(_batches(self.text_sequences(dataset), self.config.batch_size))
            per_task = max(1, rows_per_task // self.config.batch_size)
            return [TextTask(side, batches[start:start + per_task]) for start in range(0, len(batches), per_task)]

        def passes(self, probes, text_sides):
            if self.keep_layers:   # `unskill guard` keeps the probes' keys here: its prompt pass reads them from the
                return super().passes(probes, text_sides)   # pool (self.reader); a guard has no text pass
            jobs = {"ksd": self.prompt_tasks(probes)}
            for dataset, side in text_sides:
                jobs[side] = self.text_tasks(dataset, side)
            if not all(jobs.values()):   # an empty dataset: the single-process passes say what is wrong
                return super().passes(probes, text_sides)
            tasks = [task for part in jobs.values() for task in part]
            work = ProbeWork(str(self.model.directory), options.device, options.threads)
            results = map_items(tasks, work, options, model_dir=self.model.directory,
                                fingerprint=self.manifest.fingerprint, desc=f"stats {probes.name}")
            groups, start = {}, 0
            for name, part in jobs.items():   # each pass's tasks merged in their planned order
                merged = _merge_in_order(results[start:start + len(part)])
                groups.update({"ksd": merged} if name == "ksd" else merged)
                start += len(part)
            return groups

    return RayProber(model, tokenizer, config)


@dataclass(frozen=True)
class EvalTask:
    spec: object                  # evals/tasks.TaskSpec
    dataset: object               # stats/datasets.Dataset: this task's items only


@dataclass(frozen=True)
class EvalWork(_ModelWork):
    config: object = None         # evals/evaluate.EvalConfig
    stats: dict = field(default_factory=dict)   # name -> stats path (read by every actor, shared storage)

    def start(self):
        from unskill.evals.evaluate import Harness
        from unskill.runtime.statsfile import load_stats
        from unskill.runtime.tokenizer import TextTokenizer

        model = self._load()
        stats = {name: load_stats(path, model.manifest) for name, path in self.stats.items()}
        harness = Harness(model, TextTokenizer(self.model_dir, model.manifest), self.config, stats, None)

        def one(task: EvalTask) -> list:
            records = dict(harness.runner(task.spec)(task.spec, task.dataset, list(range(len(task.dataset.items)))))
            return [records[i] for i in range(len(task.dataset.items))]

        return lambda tasks: [one(task) for task in tasks]


def eval_runner(model_dir, fingerprint: str, config, stats_paths: dict, options: RayOptions,
                items_per_task: int = 16):
    """Harness.distribute: (spec, dataset, todo) -> (index, record) as tasks finish. Items are split into
    tasks of consecutive todo items; each actor runs the task's items through the harness's own runner."""
    from dataclasses import replace

    from unskill.stats.datasets import Dataset

    work = EvalWork(str(model_dir), options.device, options.threads, replace(config, progress=False),
                    {name: str(path) for name, path in stats_paths.items()})

    def run(spec, dataset, todo):
        groups = [todo[start:start + items_per_task] for start in range(0, len(todo), items_per_task)]
        tasks = [EvalTask(spec, Dataset(dataset.name, [dataset.items[i] for i in group])) for group in groups]
        for index, records in imap_items(tasks, work, options, model_dir=model_dir, fingerprint=fingerprint,
                                         desc=f"eval {spec.name}"):
            yield from zip(groups[index], records)

    return run


@dataclass(frozen=True)
class RayGuard:
    """`unskill guard --ray`: stats/guard.make_guard's prompt passes (the probes, the calibration's retain and
    validation prompts, the last positions' pass) run on the pool; the decode check's few greedy decodes run in
    this process. stats/ imports nothing of this package: make_guard calls these two."""
    options: RayOptions

    def prober(self, model, tokenizer, config):
        return ray_prober(model, tokenizer, config, self.options)

    def reader(self, model, batch_size: int):
        return RayKeyReader(model, self.options, batch_size)
