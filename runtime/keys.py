"""The one path for reading keys: prefill prompts and return the FFL key at the last prompt token of the
requested layers (the `key_last.{i}` outputs). Probing (`unskill stats`), calibration, the bypass benchmark
and the decode-time guard all read keys through these outputs (KeyEntry: their entry alphas into a stats file's
cubes, for calibration and eval), with layers numbered 0..L-1 (negative
indices count from the end, anything else is an error).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from .ksd import build_cubes
from .manifest import require_key_last, resolve_layers  # noqa: F401  (evals import them from here too)
from .session import EVERY_POSITION, OnnxLM, left_pad
from .statsfile import StatsFile
from .tokenizer import TextTokenizer

MIN_SHARED_PREFIX = 4   # shorter common prefixes are not worth a separate prefill


def _order(sequences: list[list[int]]) -> list[int]:
    """Longest first, so padding stays small and the first batch shows the peak memory at once."""
    return sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))


def _batches(sequences: list[list[int]], batch_size: int):
    order = _order(sequences)
    for start in range(0, len(order), batch_size):
        yield [sequences[i] for i in order[start:start + batch_size]]


def shared_prefix_length(sequences: list[list[int]], keep: int = 1) -> int:
    """Tokens every sequence starts with (the chat template's system turn, a few-shot header), leaving at
    least `keep` tokens of each sequence (one; a guard rule over the last tokens: those) to run after it."""
    shortest = min(map(len, sequences))
    first = sequences[0]
    length = 0
    while length < shortest - keep and all(seq[length] == first[length] for seq in sequences):
        length += 1
    return length


def plan_batches(sequences: list[list[int]], batch_size: int, share_prefix: bool = True,
                 keep: int = 1) -> tuple[int, list[list[int]]]:
    """How a prompt pass runs: (tokens of the common prefix run once, 0 for none; the batches as lists of
    sequence indices, longest first). A distributed pass (cluster/) runs the same plan, so its keys are the
    same floats. keep: tokens of every sequence left after the prefix."""
    shared = shared_prefix_length(sequences, keep) if share_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    order = _order(sequences)
    return shared, [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def prefix_cache(model: OnnxLM, prefix: list[int]) -> dict[str, np.ndarray]:
    """The KV cache of a prefix every row of a pass starts with (one row, as NumPy); {} for no prefix."""
    if not prefix:
        return {}
    ids = np.asarray([prefix], dtype=np.int64)
    _, past, _ = model.forward(ids, np.ones_like(ids), model.empty_past(1), [], logits=False)
    return {name: value.numpy() for name, value in past.items()}


def prefix_cacher(model: OnnxLM):
    """prefix (tuple) -> its prefix_cache, keeping the last one: the tasks of a distributed pass (cluster/jobs.py)
    come in plan order, so consecutive ones share a prefix; one is held at a time to bound memory."""
    held = {}

    def cache_of(prefix: tuple) -> dict[str, np.ndarray]:
        if prefix not in held:
            held.clear()
            held[prefix] = prefix_cache(model, list(prefix))
        return held[prefix]

    return cache_of


def prefill_rows(model: OnnxLM, suffixes: list[list[int]], shared: int, cache: dict[str, np.ndarray],
                 outputs: list[str], tail: int = 0) -> dict[str, np.ndarray]:
    """One batch of a pass: rows are [prefix (its cache) | left padding | suffix]; positions from the mask."""
    ids, mask = left_pad(suffixes, model.manifest.pad_token_id)
    if shared:
        mask = np.concatenate([np.ones((len(suffixes), shared), dtype=np.int64), mask], axis=1)
        past = {name: ort.OrtValue.ortvalue_from_numpy(np.repeat(value, len(suffixes), axis=0))
                for name, value in cache.items()}
    else:
        past = model.empty_past(len(suffixes))
    _, _, values = model.forward(ids, mask, past, outputs, logits=False, tail=tail)
    return values


def last_position_keys(model: OnnxLM, sequences: list[list[int]], outputs: list[str], batch_size: int,
                       progress: bool = False, desc: str = "keys", share_prefix: bool = True, bar=None,
                       tail: int = 0, cache: dict[str, np.ndarray] | None = None):
    """Yield (sequence indices, {output: value at each sequence's last token}) batch by batch. The common
    prefix of all sequences runs once; its KV cache is repeated for every batch, so a prompt pass costs
    the tokens after it only. Rows are [prefix | left padding | suffix]; positions come from the mask.
    cache: the prefix's KV cache when the caller ran it already (every_position_keys reads its keys too)."""
    shared, batches = plan_batches(sequences, batch_size, share_prefix, keep=max(tail, 1))
    if cache is None:
        cache = prefix_cache(model, sequences[0][:shared]) if shared else {}
    for rows in (batches if bar is not None else tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        values = prefill_rows(model, [sequences[i][shared:] for i in rows], shared, cache, outputs, tail)
        if bar is not None:
            bar.update(len(rows))
        yield rows, values


class KeyReader:
    """Prefills token sequences through the keys-only graph and returns last-token keys, (n, layers, F)."""

    def __init__(self, model: OnnxLM, batch_size: int = 8, progress: bool = False):
        self.names = require_key_last(model.manifest, model.directory)
        self.model, self.batch_size, self.progress = model, batch_size, progress

    def last_keys(self, sequences: list[list[int]], layers=None, desc: str = "keys", bar=None) -> np.ndarray:
        """bar: a tqdm (counting prompts) to advance instead of one of its own."""
        layers = resolve_layers(range(len(self.names)) if layers is None else layers, len(self.names))
        outputs = [self.names[i] for i in layers]
        keys = np.empty((len(sequences), len(layers), self.model.manifest.key_width), dtype=np.float32)
        own = bar is None
        bar = tqdm(total=len(sequences), desc=desc, unit="prompt", disable=not self.progress) if own else bar
        try:
            for rows, values in last_position_keys(self.model.key_only(), sequences, outputs, self.batch_size, bar=bar):
                keys[rows] = np.stack([values[name] for name in outputs], axis=1)
        finally:
            if own:
                bar.close()
        return keys

    def last_keys_each(self, groups: list[list[list[int]]], layers=None, desc: str = "keys") -> list[np.ndarray]:
        """last_keys of several groups of sequences, each planned on its own (its own shared prefix); a
        distributed reader (cluster/jobs.py) runs them in one job."""
        return [self.last_keys(sequences, layers, desc) for sequences in groups]

    def window_keys(self, sequences: list[list[int]], last_layers, window_layers, positions: int, desc: str = "keys",
                    pool: bool = False):
        """prompt_window_keys on this reader's model (the full graph: its per-position keys)."""
        return prompt_window_keys(self.model, sequences, last_layers, window_layers, positions, self.batch_size, desc,
                                  pool)


def prompt_window_keys(model: OnnxLM, sequences: list[list[int]], last_layers, window_layers, positions: int,
                       batch_size: int = 8, desc: str = "keys", pool: bool = False):
    """One prompt pass for a rule over the prompt's last tokens (runtime/ksd.py LinearRegion.positions): keys at
    the last token of last_layers (n, L, F), and at the last `positions` tokens of window_layers (n, P, W, F) with
    valid (n, P): which of those positions hold the sequence's own tokens; pool: their mean over the valid ones
    instead ((n, W, F), ksd.pool_keys), what calibration fits. The per-position keys come from the full graph's
    key.* outputs (the probe graph has key_last.* only). Prompts are grouped by their start as in
    grouped_last_keys; a shared prefix always leaves the last `positions` tokens, so a position is valid exactly
    when the prompt has that many tokens, as in the decode loop's left-padded batch and the server's engine."""
    out = WindowArrays(model, len(sequences), last_layers, window_layers, positions, pool)
    for group in prefix_groups(sequences, batch_size):
        members = [sequences[i] for i in group]
        # tail=positions: any shared prefix leaves each prompt's last `positions` tokens in its own row
        for rows, values in last_position_keys(model, members, out.last_names + out.window_names, batch_size,
                                               desc=desc, tail=positions):
            lengths = np.array([len(members[row]) for row in rows])
            out.put([group[row] for row in rows],
                    window_batch(values, lengths, out.last_names, out.window_names, positions, pool))
    return out.last, out.window, out.valid


class WindowArrays:
    """The outputs of one window pass (prompt_window_keys, or cluster/jobs.py's on a pool), filled batch by batch:
    last (n, L, F), window (n, P, W, F) or pooled (n, W, F), valid (n, P); and the key outputs that feed them."""

    def __init__(self, model: OnnxLM, count: int, last_layers, window_layers, positions: int, pool: bool):
        manifest = model.manifest
        self.last_layers = resolve_layers(last_layers, manifest.num_layers)
        self.window_layers = resolve_layers(window_layers, manifest.num_layers)
        key_last = require_key_last(manifest, model.directory) if self.last_layers else []
        self.last_names = [key_last[i] for i in self.last_layers]
        self.window_names = [manifest.key_outputs[i] for i in self.window_layers]
        width = manifest.key_width
        self.last = np.empty((count, len(self.last_layers), width), dtype=np.float32)
        shape = (len(self.window_layers), width) if pool else (positions, len(self.window_layers), width)
        self.window = np.zeros((count,) + shape, dtype=np.float32)
        self.valid = np.zeros((count, positions), dtype=bool)

    def put(self, index: list[int], part: tuple):
        """part: window_batch's (last or None, window, valid) of the sequences at index."""
        part_last, self.window[index], self.valid[index] = part
        if self.last_layers:
            self.last[index] = part_last


def window_batch(values: dict[str, np.ndarray], lengths: np.ndarray, last_names: list[str], window_names: list[str],
                 positions: int, pool: bool):
    """One batch of a window pass (prompt_window_keys; cluster/jobs.py runs the same on a pool) from its prefill's
    values (tail=positions): (keys at the last token (B, L, F) or None without last_names, the last `positions`
    tokens' keys (B, P, W, F) or their mean (B, W, F), valid (B, P)); lengths: each row's whole prompt length."""
    from .ksd import pool_keys

    last = np.stack([values[name] for name in last_names], axis=1) if last_names else None
    per_position = np.stack([values[name] for name in window_names], axis=2)   # (B, S, W, F)
    take = min(positions, per_position.shape[1])
    valid = np.arange(positions)[None, :] >= positions - np.minimum(lengths, take)[:, None]
    tokens = np.zeros((len(lengths), positions) + per_position.shape[2:], dtype=np.float32)
    tokens[:, positions - take:] = per_position[:, -take:]
    return last, (pool_keys(tokens, valid) if pool else tokens), valid


def every_position_keys(model: OnnxLM, sequences: list[list[int]], layers, batch_size: int = 8, desc: str = "keys"):
    """Yield (sequence indices, keys (B, S, layers, F) at every position of each row, valid (B, S): which positions
    hold the row's own tokens) batch by batch: what a rule read at every prompt position sees (runtime/ksd.py
    LinearRegion.every_position), as the decode loop reads one prompt alone. Sequences are grouped by their start
    and a common prefix runs once; its positions are read too (once, the same for every row), because a batch's
    common prefix can be anything the rows share: ten mutations of one request share the request itself. Long
    prompts run in chunks (OnnxLM.forward tail=EVERY_POSITION)."""
    names = [model.manifest.key_outputs[i] for i in resolve_layers(layers, model.manifest.num_layers)]
    for group in prefix_groups(sequences, batch_size):
        members = [sequences[i] for i in group]
        shared, _ = plan_batches(members, batch_size)
        cache, lead = prefix_pass(model, members[0][:shared], names)   # lead: (shared, layers, F)
        for rows, values in last_position_keys(model, members, names, batch_size, desc=desc, tail=EVERY_POSITION,
                                               cache=cache):
            keys = np.stack([values[name] for name in names], axis=2)   # (B, S, W, F), the rows after the prefix
            lengths = np.array([len(members[row]) - shared for row in rows])
            valid = np.arange(keys.shape[1])[None, :] >= keys.shape[1] - lengths[:, None]
            if shared:   # rows are [prefix | left padding | own tokens]
                keys = np.concatenate([np.broadcast_to(lead, (len(rows),) + lead.shape), keys], axis=1)
                valid = np.concatenate([np.ones((len(rows), shared), bool), valid], axis=1)
            yield [group[row] for row in rows], keys, valid


def prefix_pass(model: OnnxLM, prefix: list[int], names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One forward of a prefix alone: (its KV cache as prefix_cache returns it, the keys of names at every
    position (len(prefix), len(names), F))."""
    if not prefix:
        return {}, np.zeros((0, len(names), model.manifest.key_width), np.float32)
    ids = np.asarray([prefix], dtype=np.int64)
    _, past, values = model.forward(ids, np.ones_like(ids), model.empty_past(1), names, logits=False,
                                    tail=EVERY_POSITION)
    return ({name: value.numpy() for name, value in past.items()},
            np.stack([values[name][0] for name in names], axis=1))


def guard_prompt_keys(model: OnnxLM, guard, sequences: list[list[int]], batch_size: int = 8, desc: str = "keys",
                      reader=None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """What the runtime guard (runtime/ksd.py KSDGuard) sees at the prompt of each sequence, for
    `guard.check(keys, mask)`: output name -> keys, and the mask of the positions (None for a last-token rule).
    A rule over several positions gets its layers' keys at the last guard.positions tokens (B, P, F)."""
    layers = sorted(guard._output_of_layer)
    if getattr(guard, "every_position", False):   # every position: left-padded to the longest prompt's
        parts = {index: (keys[row], valid[row]) for rows, keys, valid in every_position_keys(
            model, sequences, layers, batch_size, desc) for row, index in enumerate(rows)}
        width = max(int(part[1].sum()) for part in parts.values())
        window = np.zeros((len(sequences), width, len(layers), model.manifest.key_width), np.float32)
        mask = np.zeros((len(sequences), width), bool)
        for index, (keys, valid) in parts.items():
            own = keys[valid]
            window[index, width - len(own):], mask[index, width - len(own):] = own, True
        return {guard._prompt_output_of_layer[layer]: window[:, :, i] for i, layer in enumerate(layers)}, mask
    if getattr(guard, "positions", 1) <= 1:
        keys = (reader or KeyReader(model, batch_size)).last_keys(sequences, layers, desc)
        return {guard._output_of_layer[layer]: keys[:, i] for i, layer in enumerate(layers)}, None
    _, window, valid = prompt_window_keys(model, sequences, [], layers, guard.positions, batch_size, desc)
    return {guard._prompt_output_of_layer[layer]: window[:, :, i] for i, layer in enumerate(layers)}, valid


def grouped_last_keys(reader, sequences: list[list[int]], layers=None, desc: str = "keys", bar=None) -> np.ndarray:
    """reader.last_keys with the sequences split by prefix_groups, each group planned on its own (its own shared
    prefix: prompts in several formats), through last_keys_each so a distributed reader plans them alike; bar
    (a local KeyReader only): one progress bar over all groups."""
    groups = prefix_groups(sequences, reader.batch_size)
    if len(groups) == 1:
        return reader.last_keys(sequences, layers, desc, bar=bar) if bar is not None else \
            reader.last_keys(sequences, layers, desc)
    members = [[sequences[i] for i in group] for group in groups]
    parts = ([reader.last_keys(part, layers, desc, bar=bar) for part in members] if bar is not None
             else reader.last_keys_each(members, layers, desc))
    keys = np.empty((len(sequences),) + parts[0].shape[1:], dtype=np.float32)
    for group, part in zip(groups, parts):
        keys[group] = part
    return keys


def prefix_groups(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Sequence indices grouped by their first MIN_SHARED_PREFIX tokens, so prompts of several formats (chat
    template with its system turn, raw text) each share their own prefix prefill; starts seen fewer than
    batch_size times go together in one last group. Sequences that all share a prefix stay one group."""
    if not sequences or shared_prefix_length(sequences) >= MIN_SHARED_PREFIX:
        return [list(range(len(sequences)))]
    by_start: dict[tuple, list[int]] = {}
    for index, seq in enumerate(sequences):
        by_start.setdefault(tuple(seq[:MIN_SHARED_PREFIX]), []).append(index)
    groups = [members for members in by_start.values() if len(members) >= max(batch_size, 2)]
    rest = sorted(i for members in by_start.values() if len(members) < max(batch_size, 2) for i in members)
    return groups + ([rest] if rest else [])


class KeyEntry:
    """Entry alphas of key vectors for several stats files at one layer."""

    def __init__(self, stats: dict[str, StatsFile], num_layers: int, key_outputs: list[str], layer: int,
                 key_last_outputs: list[str] | None = None):
        self.layer = resolve_layers([layer], num_layers)[0]   # out of range is an error, as in the guard
        self.output = key_outputs[self.layer]                 # every position: token-level tasks
        self.last_output = (key_last_outputs or key_outputs)[self.layer]   # the guard's: decode steps
        self.cubes = {name: build_cubes(s, [self.layer], 1.0, "k")[0] for name, s in stats.items()}

    def __call__(self, keys: np.ndarray) -> list[dict[str, float]]:
        """keys (B, F) -> per row {stats name: entry alpha}."""
        per_name = {name: cube.score(keys) for name, cube in self.cubes.items()}   # the guard's own cube score
        return [{name: float(values[row]) for name, values in per_name.items()} for row in range(keys.shape[0])]

    def digest(self) -> dict[str, str]:
        return {name: hashlib.sha256(c.center.tobytes() + c.halfwidth.tobytes()).hexdigest()[:16]
                for name, c in self.cubes.items()}


def prompt_keys(model: OnnxLM, tokenizer: TextTokenizer, dataset, layer: int, chat: bool = True,
                batch_size: int = 8) -> np.ndarray:
    """Key vectors at the last prompt token of one layer, (items, F), in dataset order (calibration);
    `dataset` is a stats Dataset (its `items` carry a `prompt`)."""
    sequences = [tokenizer.encode_prompt(item.prompt, chat) for item in dataset.items]
    return KeyReader(model, batch_size).last_keys(sequences, [layer])[:, 0]
