"""The evaluation harness behind `unskill eval`: every task of `tasks.py` scored per item, KSD abstention taken
from the same forward passes, and a per-item cache so an interrupted run resumes where it stopped.

KSD costs no extra pass. For each stats file the harness records an item's *entry alpha*: the smallest alpha
(in units of the file's fitted k) whose cube holds the key at the last prompt token, max_d |v - mu| / (k sigma).
In generation it is the minimum over every forward the row took part in, because the guard checks each one.
KSD at alpha abstains on an item exactly when its entry alpha <= alpha, so one prefill (or one generation) per
item serves every hypercube and every alpha; `ksd_view` turns the records into abstention-as-failure scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from unskill.runtime.canonical import SecondLook
from unskill.runtime.errors import UnskillError
from unskill.runtime.generator import GenerationParams, Generator
from unskill.runtime.keys import (MIN_SHARED_PREFIX, KeyEntry, KeyReader, guard_prompt_keys, require_key_last,
                                  resolve_layers, shared_prefix_length)
from unskill.runtime.ksd import region_layers, vote
from unskill.runtime.session import OnnxLM, left_pad
from unskill.runtime.statsfile import StatsFile
from unskill.runtime.tokenizer import TextTokenizer, messages_of

from unskill.stats.datasets import Dataset, Item, load_dataset, sample

from . import tasks as T
from .sandbox import Limits

HARNESS_VERSION = 1          # bump when a change alters cached per-item records
LOGITS_BUDGET = 1 << 28      # floats of all-position logits per token-level batch (1 GiB)


@dataclass
class EvalConfig:
    data_dir: str | None = None
    limit: int = 200              # items per token-level task (a seeded sample)
    gen_limit: int = 50           # items per generation task
    seed: int = 0
    chat: bool = True
    batch_size: int = 4
    gen_batch_size: int = 8
    max_tokens: int = 1024        # token level: prompt + completion cut to this
    layer: int = -1               # the layer whose key KSD checks (ksd-run's default: the last)
    timeout_s: float = 10.0       # per MBPP program
    progress: bool = True
    bypass_decode: int = 0        # bypass: also generate this many tokens per prompt, checking each (0: prefill only)
    bypass_format: str = "chat"   # bypass and attack: chat (the template) | raw (plain text, as --no-chat and
                                  # /v1/completions see it) | both
    attack_budget: int = 100      # attack: Best-of-N tries and search queries per request at most
    attackers: tuple[str, ...] = ("bon", "search")   # attack: which attackers of evals/attack.py run


BYPASS_FORMATS = {"chat": ("chat",), "raw": ("raw",), "both": ("chat", "raw")}


class _StepRecorder:
    """Stands in for the KSD guard in the decode loop: abstains never, records every check's entry alphas
    (the paper's cube) and whether each stored rule in `guards` fires. Every row thus decodes its full budget
    (the tokens before a first refusal are the tokens a refusing guard would have produced; after it they do
    not matter)."""

    def __init__(self, entry: KeyEntry, guards: dict | None = None):
        self.entry, self.guards, self.steps = entry, guards or {}, []
        self.output_names = sorted({entry.last_output, *(n for g in self.guards.values() for n in g.output_names)})
        # a rule over several prompt positions reads per-position keys at the prompt (Generator.check_guard)
        self.positions = max([g.positions for g in self.guards.values()], default=1)
        self.every_position = any(g.every_position for g in self.guards.values())
        self.prompt_output_names = sorted({entry.last_output,
                                           *(n for g in self.guards.values() for n in g.prompt_output_names)})

    def check(self, last_keys: dict[str, np.ndarray], mask: np.ndarray | None = None):
        fired = {name: [hit is not None for hit in guard.check(last_keys, mask)] for name, guard in self.guards.items()}
        self.steps.append((self.entry(last_keys[self.entry.last_output]), fired))
        return [None] * len(self.steps[-1][0])

    def row(self, row: int, forwards: int) -> tuple[dict[str, float], dict[str, bool]]:
        """(min entry alpha per stats name, whether each stored rule fired) over the row's first `forwards` checks."""
        seen = self.steps[:max(forwards, 1)]
        return ({name: min(entries[row][name] for entries, _ in seen) for name in seen[0][0][row]},
                {name: any(fired[name][row] for _, fired in seen) for name in self.guards})


class ItemCache:
    """One JSONL file per (model fingerprint, task, settings): a line per finished item, appended as it ends."""

    def __init__(self, directory: Path | None, identity: dict):
        self.records: dict[str, dict] = {}
        self.path = None
        if directory is None:
            return
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{digest}.jsonl"
        if self.path.exists():
            self._read()
        else:
            self.path.write_text(json.dumps({"identity": identity}) + "\n")

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                if number < len(lines) - 1:   # only a torn last line (a killed run) is expected
                    raise UnskillError(f"{self.path}: line {number} is not JSON; delete the file to re-run") from None
                record = None
            if record:
                self.records[record.pop("key")] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, key: str, record: dict) -> None:
        self.records[key] = record
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, **record}) + "\n")


def item_key(item: Item) -> str:
    return hashlib.sha256(json.dumps([item.prompt, item.completion, item.tests]).encode()).hexdigest()[:20]


class Harness:
    def __init__(self, model: OnnxLM, tokenizer: TextTokenizer, config: EvalConfig,
                 stats: dict[str, StatsFile] | None = None, cache_dir: Path | None = None):
        self.model, self.tokenizer, self.config, self.cache_dir = model, tokenizer, config, cache_dir
        manifest = model.manifest
        self.stats = stats or {}
        self.entry = (KeyEntry(stats, manifest.num_layers, manifest.key_outputs, config.layer,
                               manifest.key_last_outputs) if stats else None)
        self.templated = config.chat and tokenizer.has_chat_template
        # Set by `unskill eval --ray` (cluster/jobs.py): runs a task's items elsewhere, (spec, dataset, todo) ->
        # (index, record); and a KeyReader stand-in for the bypass benchmark's prefills.
        self.distribute = None
        self.reader = None

    # ----------------------------------------------------------------------------------------- driver

    def run(self, task_names: list[str]) -> dict[str, dict]:
        return {name: self.run_task(T.parse_task(name)) for name in task_names}

    def run_task(self, spec: T.TaskSpec) -> dict:
        if spec.kind == "bypass":
            return self._bypass(spec)
        if spec.kind == "attack":
            return self._attack(spec)
        size = self.config.limit if spec.kind == "tokens" else self.config.gen_limit
        dataset = sample(load_dataset(spec.source, self.config.data_dir), size, self.config.seed)
        T.check_items(spec, dataset)
        cache = ItemCache(self.cache_dir, self._identity(spec))
        keys = [item_key(item) for item in dataset.items]
        todo = [i for i, key in enumerate(keys) if key not in cache]
        runner = self.distribute if self.distribute and todo else self.runner(spec)
        with tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"eval {spec.name}", unit="item",
                  disable=not self.config.progress) as bar:
            for index, record in runner(spec, dataset, todo):
                cache.add(keys[index], record)
                bar.update()
        return summarise(spec, dataset.name, [cache.records[key] for key in keys])

    def runner(self, spec: T.TaskSpec):
        """The function that scores a task's items: (spec, dataset, todo indices) -> (index, record) pairs."""
        return {"tokens": self._tokens, "mmlu": self._mmlu}.get(spec.kind, self._generation)

    def _identity(self, spec: T.TaskSpec) -> dict:
        return {"harness": HARNESS_VERSION, "model": self.model.manifest.fingerprint, "task": spec.name,
                "chat": self.templated, "max_tokens": self.config.max_tokens if spec.kind == "tokens" else None,
                "timeout_s": self.config.timeout_s if spec.kind == "mbpp" else None,
                "ksd": {"layer": self.entry.layer, "cubes": self.entry.digest()} if self.entry else None}

    def _key_outputs(self) -> list[str]:
        return [self.entry.output] if self.entry else []

    # ----------------------------------------------------------------------------------------- bypass

    def _formats(self) -> list[str]:
        """The prompt formats a bypass/attack run sends: --bypass-format, raw only under --no-chat, and chat only
        for a model without a chat template (its raw text is what the chat path sends: one column is enough)."""
        if self.config.bypass_format not in BYPASS_FORMATS:
            raise UnskillError(f"--bypass-format {self.config.bypass_format!r}: use one of {', '.join(BYPASS_FORMATS)}")
        formats = list(BYPASS_FORMATS[self.config.bypass_format])
        if not self.config.chat:
            return ["raw"]
        return formats if self.tokenizer.has_chat_template else formats[:1]

    def _default_guards(self) -> dict:
        """Per stats file the rule eval scores: its stored rule (what ksd-run applies), else the paper's cube.
        ksd-run and the in-graph guard refuse a file without a rule unless the paper's cube is asked for; eval
        measures that cube for such a file (a measurement, not a guard)."""
        from unskill.runtime.ksd import KSDGuard
        return {name: KSDGuard([s], self.model.manifest, rule=None if s.guard else "paper")
                for name, s in self.stats.items()}

    def _bypass(self, spec: T.TaskSpec) -> dict:
        """Attack families and retain sets (evals/bypass.py), one prefill per prompt: per stats file the entry
        alpha of the paper's cube at the eval layer, and whether the stats file's stored rule refuses. With
        --bypass-format both, the raw-prompt run's sets sit under "raw" beside the chat run's "sets"."""
        from unskill.runtime.ksd import KSDGuard

        from .bypass import bypass_sets

        if not self.entry:
            raise UnskillError(f"{spec.name}: the bypass benchmark scores a guard; give --stats")
        guards = {name: KSDGuard([s], self.model.manifest) for name, s in self.stats.items() if s.guard}
        parts = bypass_sets(spec.source, self.config.data_dir, self.config.gen_limit, self.config.seed)
        formats = self._formats()
        runs = {fmt: self._bypass_sets(spec, parts, guards, chat=fmt == "chat") for fmt in formats}
        first = runs[formats[0]]
        result = {"kind": "bypass", "metric": "refused", "dataset": spec.name, "forget": spec.source,
                  "items": sum(s["items"] for s in first.values()), "layer": self.entry.layer,
                  "format": formats[0], "templated": self.tokenizer.has_chat_template, "sets": first}
        if len(formats) > 1:
            result["raw"] = {"format": "raw", "sets": runs["raw"]}
        return result

    def _bypass_sets(self, spec: T.TaskSpec, parts: list, guards: dict, chat: bool) -> dict:
        layers = sorted({self.entry.layer} | {i for g in guards.values() for r in g.cubes for i in region_layers(r)})
        reader = self.reader or KeyReader(self.model, self.config.batch_size * 2, self.config.progress)
        sets = {}
        encoded = [[self.tokenizer.encode_turns(c, chat) for c in part.conversations] for part in parts]
        desc = f"{spec.name}{'' if chat else ' raw'}"
        for part, sequences, keys in zip(parts, encoded, reader.last_keys_each(encoded, layers, desc=desc)):
            by_output = {self.model.manifest.key_last_outputs[layer]: keys[:, i] for i, layer in enumerate(layers)}
            entries = self.entry(keys[:, layers.index(self.entry.layer)])
            stored, second = {}, {}
            for name, guard in guards.items():   # a rule over several prompt positions reads them all
                last_only = guard.positions <= 1 and not guard.every_position
                seen, mask = (by_output, None) if last_only else guard_prompt_keys(
                    self.model, guard, sequences, self.config.batch_size * 2, desc)
                second[name] = self._second_look(guard, part.conversations, chat)
                stored[name] = [hit is not None or again for hit, again in
                                zip(guard.check(seen, mask), second[name]["refused"])]
            sets[part.name] = {
                "side": part.side, "items": len(sequences),
                "entry": {name: [row[name] for row in entries] for name in self.stats},
                "stored": stored,
                "second_look": {name: {"looked": sum(look["looked"]), "refused": sum(look["refused"])}
                                for name, look in second.items()},
                "rules": {name: guard.describe()[0] for name, guard in guards.items()},
                "example": part.conversations[0][-1][1][:300]}
            if self.config.bypass_decode:
                decoded = self._bypass_decode(part.conversations, sequences, guards, chat)
                for name, look in second.items():   # the second look is the prompt's: it ends the row there too
                    decoded["stored_decode"][name] = [fired or again for fired, again in
                                                      zip(decoded["stored_decode"][name], look["refused"])]
                sets[part.name].update(decoded)
        return sets

    # ----------------------------------------------------------------------------------------- attackers

    def _attack(self, spec: T.TaskSpec) -> dict:
        """The adaptive attackers of evals/attack.py against each stats file's default guard, on --gen-limit
        held-out requests, per prompt format: Best-of-N success vs N and random-search success vs queries."""
        from . import attack as A
        from .bypass import attack_requests

        if not self.stats:
            raise UnskillError(f"{spec.name}: the attackers attack a guard; give --stats")
        requests = attack_requests(spec.source, self.config.data_dir, self.config.gen_limit, self.config.seed)
        vocab_size = self.tokenizer.tokenizer.get_vocab_size()
        budget = self.config.attack_budget
        if budget < 1:
            raise UnskillError(f"--attack-budget must be >= 1, got {budget}")
        unknown = set(self.config.attackers) - set(A.ATTACKERS)
        if unknown or not self.config.attackers:
            raise UnskillError(f"--attackers {','.join(self.config.attackers)}: use some of {','.join(A.ATTACKERS)}")
        runs = {}
        for name, guard in self._default_guards().items():
            for fmt in self._formats():
                decide = self._decider(guard, chat=fmt == "chat", desc=f"{spec.name} {name} {fmt}")
                run = {"rule": guard.describe()[0]}
                if "bon" in self.config.attackers:
                    run["bon"] = A.best_of_n(requests, decide, self.config.seed, A.steps_within(A.BON_N, budget))
                if "search" in self.config.attackers:
                    run["search"] = A.random_search(requests, decide, vocab_size, self.tokenizer.decode,
                                                    self.config.seed, A.steps_within(A.SEARCH_QUERIES, budget))
                runs.setdefault(name, {})[fmt] = run
        return {"kind": "attack", "metric": "attack_success", "dataset": spec.name, "forget": spec.source,
                "items": len(requests), "seed": self.config.seed, "templated": self.tokenizer.has_chat_template,
                "guards": runs}

    def _decider(self, guard, chat: bool, desc: str):
        """conversations -> (refused, score) from the runtime guard on their prompt's last-token keys."""
        from .attack import guard_decision

        reader = KeyReader(self.model, self.config.batch_size * 2, False)
        look = SecondLook(self.model, self.tokenizer, guard, self.config.batch_size * 2)

        def decide(conversations):
            sequences = [self.tokenizer.encode_turns(c, chat) for c in conversations]
            keys, mask = guard_prompt_keys(self.model, guard, sequences, self.config.batch_size * 2, desc, reader)
            refused, score = guard_decision(guard, keys, mask)
            # the runtime's second look at garbled prompts (runtime/canonical.py)
            seen = look.keys([messages_of(turns) for turns in conversations], chat)
            if seen is not None:
                rows, keys, mask = seen
                again, again_score = guard_decision(guard, keys, mask)
                refused[rows] |= again
                score[rows] = np.minimum(score[rows], again_score)
            return refused, score
        return decide

    def _second_look(self, guard, conversations: list, chat: bool) -> dict:
        """The runtime's second look (runtime/canonical.py) at each conversation: per row whether it had one
        (the prompt reads as garbled) and whether its repaired spelling is refused."""
        prompts = [messages_of(turns) for turns in conversations]
        return SecondLook(self.model, self.tokenizer, guard, self.config.batch_size * 2).refused(prompts, chat)

    def _bypass_decode(self, conversations: list, sequences: list[list[int]], guards: dict, chat: bool) -> dict:
        """Greedy decode of `bypass_decode` tokens per prompt with the guard checked at the prompt's last token
        and after every generated one (as ksd-run does): per stats file the smallest entry alpha and whether the
        stored rule fired at any step. Check 0 is the prefill's (the same keys, tested)."""
        params = GenerationParams(max_new_tokens=self.config.bypass_decode, chat=chat)
        prompts = [messages_of(turns) for turns in conversations]
        order = sorted(range(len(prompts)), key=lambda i: -len(sequences[i]))
        entries: dict[int, dict] = {}
        stored: dict[int, dict] = {}
        for batch in self._batches(order, {i: len(sequences[i]) for i in order}, self.config.gen_batch_size):
            recorder = _StepRecorder(self.entry, guards)
            generator = Generator(self.model, self.tokenizer, recorder, second_look=False)
            results = generator.generate([prompts[i] for i in batch], params)
            for row, (index, result) in enumerate(zip(batch, results)):
                entries[index], stored[index] = recorder.row(row, result.forwards)
        rows = range(len(prompts))
        return {"decode_tokens": self.config.bypass_decode,
                "entry_decode": {name: [entries[i][name] for i in rows] for name in self.stats},
                "stored_decode": {name: [stored[i][name] for i in rows] for name in guards}}

    # ----------------------------------------------------------------------------------------- token level

    def _scored_sequence(self, item: Item) -> tuple[list[int], int]:
        """(prompt ids + completion ids, prompt length). The prompt is encoded exactly as KSD's probes and
        ksd-run encode it, so its last token's key is the one the guard would check."""
        prompt = self.tokenizer.encode_prompt(item.prompt, self.config.chat)
        separator = "" if self.templated else item.context[len(item.prompt):]
        encode = self.tokenizer.tokenizer.encode
        completion = encode(separator + T.completion_text(item, self.templated), add_special_tokens=False).ids
        return prompt + completion, len(prompt)

    def _tokens(self, spec: T.TaskSpec, dataset: Dataset, todo: list[int]):
        limit = min(self.config.max_tokens, self.model.manifest.max_context)
        sequences = {}
        for index in todo:
            ids, first = self._scored_sequence(dataset.items[index])
            if first >= limit:
                yield index, {"skipped": f"prompt of {first} tokens exceeds {limit}"}
            else:
                sequences[index] = (ids[:limit], first)
        groups: dict[str, list[int]] = {}
        for index in sequences:
            groups.setdefault(dataset.items[index].group, []).append(index)
        for members in groups.values():
            shared, past = self._shared_prefill(members, sequences)
            rest = {i: (seq[shared:], first - shared) for i, (seq, first) in sequences.items() if i in members}
            for batch in self._token_batches(rest):
                yield from self._score_batch(batch, rest, shared, past)

    def _shared_prefill(self, members: list[int], sequences) -> tuple[int, dict[str, np.ndarray] | None]:
        """The prompt start every member shares (an XQuAD paragraph's context, the chat template's system
        turn) run once: (its length, its KV cache as NumPy), or (0, None) when too short to matter. It stops
        before each prompt's last token, whose logits score the first completion token."""
        shared = min(shared_prefix_length([sequences[i][0] for i in members]),
                     min(sequences[i][1] for i in members) - 1)
        if shared < MIN_SHARED_PREFIX or len(members) < 2:
            return 0, None
        ids = np.asarray([sequences[members[0]][0][:shared]], dtype=np.int64)
        _, past, _ = self.model.forward(ids, np.ones_like(ids), self.model.empty_past(1), logits=False)
        return shared, {name: value.numpy() for name, value in past.items()}

    def _batches(self, order: list[int], lengths: dict[int, int], batch_size: int):
        """`order` is longest first. The graph computes logits at every position, so rows * width * vocab
        stays under LOGITS_BUDGET (Gemma's vocabulary is 262k): long prompts go a few at a time."""
        budget = max(1, LOGITS_BUDGET // self.model.vocab_size)
        while order:
            rows = max(1, min(batch_size, budget // lengths[order[0]]))
            yield order[:rows]
            order = order[rows:]

    def _token_batches(self, sequences: dict[int, tuple[list[int], int]]):
        order = sorted(sequences, key=lambda i: -len(sequences[i][0]))
        yield from self._batches(order, {i: len(seq) for i, (seq, _) in sequences.items()}, self.config.batch_size)

    def _score_batch(self, batch: list[int], sequences, shared: int = 0, prefix: dict | None = None):
        """Score rows that continue a shared prefix of `shared` tokens (KV cache `prefix`), or none."""
        ids, mask = left_pad([sequences[i][0] for i in batch], self.model.manifest.pad_token_id)
        if prefix:
            mask = np.concatenate([np.ones((len(batch), shared), dtype=np.int64), mask], axis=1)
            past = {name: ort.OrtValue.ortvalue_from_numpy(np.repeat(value, len(batch), axis=0))
                    for name, value in prefix.items()}
        else:
            past = self.model.empty_past(len(batch))
        logits, _, extras = self.model.forward(ids, mask, past, self._key_outputs(), all_logits=True)
        for row, index in enumerate(batch):
            seq, first = sequences[index]
            offset = ids.shape[1] - len(seq)   # left padding
            predicted = logits[row, offset + first - 1: offset + len(seq) - 1].astype(np.float64)
            target = np.asarray(seq[first:])
            top = predicted.max(axis=-1)
            log_norm = np.log(np.exp(predicted - top[:, None]).sum(axis=-1)) + top
            nll = log_norm - predicted[np.arange(target.size), target]
            record = {"hits": int((predicted.argmax(-1) == target).sum()), "tokens": int(target.size),
                      "nll": float(nll.sum())}
            if self.entry:
                record["entry"] = self.entry(extras[self.entry.output][row, offset + first - 1][None])[0]
            yield index, record

    # ----------------------------------------------------------------------------------------- MMLU 5-shot

    def _mmlu(self, spec: T.TaskSpec, dataset: Dataset, todo: list[int]):
        letters = T.letter_ids(self.tokenizer, self.templated)
        _, encoded, order, skipped = self._fit_prompts(spec, dataset, todo)
        yield from skipped
        for chunk in self._batches(order, {i: len(encoded[i]) for i in order}, self.config.batch_size):
            ids, mask = left_pad([encoded[i] for i in chunk], self.model.manifest.pad_token_id)
            if self.entry:
                logits, keys = last_prompt_keys(self.model, ids, mask, self.entry.layer)
                entries = self.entry(keys)
            else:
                logits, _, _ = self.model.forward(ids, mask, self.model.empty_past(len(chunk)))
            for row, index in enumerate(chunk):
                choice = T.LETTERS[int(np.argmax(logits[row, letters]))]
                record = {"score": choice == dataset.items[index].completion.strip(), "reply": choice}
                if self.entry:
                    record["entry"] = entries[row]
                yield index, record

    def _fit_prompts(self, spec: T.TaskSpec, dataset: Dataset, todo: list[int]):
        """Item index -> prompt text and -> its ids; the indices that fit the context, longest first; skip
        records for the rest."""
        prompts = dict(zip(todo, T.few_shot_prompts(spec, [dataset.items[i] for i in todo], self.config.data_dir)))
        encoded = {i: self.tokenizer.encode_prompt(p, self.config.chat) for i, p in prompts.items()}
        limit = self.model.manifest.max_context
        skipped = [(i, {"skipped": f"prompt of {len(ids)} tokens exceeds the context of {limit}"})
                   for i, ids in encoded.items() if len(ids) >= limit]
        order = sorted((i for i in todo if len(encoded[i]) < limit), key=lambda i: -len(encoded[i]))
        return prompts, encoded, order, skipped

    # ----------------------------------------------------------------------------------------- generation

    def _generation(self, spec: T.TaskSpec, dataset: Dataset, todo: list[int]):
        prompts, encoded, order, skipped = self._fit_prompts(spec, dataset, todo)
        yield from skipped
        params = GenerationParams(max_new_tokens=spec.max_new_tokens, stop=spec.stop, chat=self.config.chat)
        limits = Limits(timeout_s=self.config.timeout_s)
        for batch in self._batches(order, {i: len(encoded[i]) for i in order}, self.config.gen_batch_size):
            recorder = _StepRecorder(self.entry) if self.entry else None
            generator = Generator(self.model, self.tokenizer, recorder, second_look=False)
            results = generator.generate([prompts[i] for i in batch], params)
            for row, (index, result) in enumerate(zip(batch, results)):
                item = dataset.items[index]
                if spec.kind == "gsm8k":
                    passed = T.score_gsm8k(result.text, item)
                elif spec.kind == "mbpp":
                    passed = T.score_mbpp(result.text, item, limits)
                else:
                    passed = T.score_xquad(result.text, item)
                record = {"score": bool(passed), "reply": result.text[:1000]}
                if recorder:
                    record["entry"] = recorder.row(row, result.forwards)[0]
                yield index, record


# --------------------------------------------------------------------------------------------- summaries

def summarise(spec: T.TaskSpec, dataset_name: str, records: list[dict]) -> dict:
    scored = [r for r in records if "skipped" not in r]
    if not scored:
        raise UnskillError(f"{spec.name}: every item was skipped ({records[0]['skipped']})")
    summary = {"kind": spec.kind, "metric": spec.metric, "dataset": dataset_name, "items": len(scored),
               "skipped": len(records) - len(scored)}
    if spec.kind == "tokens":
        hits, tokens, nll = (np.array([r[f] for r in scored], dtype=np.float64) for f in ("hits", "tokens", "nll"))
        summary.update(score=float(hits.sum() / tokens.sum()), nll=float(nll.sum() / tokens.sum()),
                       tokens=int(tokens.sum()), per_item={"hits": hits.astype(int).tolist(),
                                                           "tokens": tokens.astype(int).tolist()})
    else:
        passed = [bool(r["score"]) for r in scored]
        summary.update(score=float(np.mean(passed)), per_item={"score": passed},
                       replies=[r.get("reply", "") for r in scored[:3]])
    if "entry" in scored[0]:
        summary["entry"] = {name: [r["entry"][name] for r in scored] for name in scored[0]["entry"]}
    return summary


def ksd_view(task: dict, stats_name: str, alpha: float) -> dict:
    """Abstention rate and the score with abstentions counted as failures, for KSD with one stats file at
    `alpha` (x its fitted k), from the entry alphas recorded with the task."""
    entries = task.get("entry", {}).get(stats_name)
    if entries is None:
        raise UnskillError(f"{task['dataset']}: no KSD entries recorded for {stats_name!r} (run eval with its --stats)")
    abstained = vote(np.asarray(entries, dtype=np.float64)[:, None], [alpha], 1)   # the guard's decision
    per_item = task["per_item"]
    if task["kind"] == "tokens":
        hits, tokens = np.asarray(per_item["hits"]), np.asarray(per_item["tokens"])
        score = float((hits * ~abstained).sum() / tokens.sum())
    else:
        score = float(np.mean(np.asarray(per_item["score"]) & ~abstained))
    return {"abstain": float(abstained.mean()), "score": score}


def last_prompt_keys(model: OnnxLM, ids: np.ndarray, mask: np.ndarray, layer: int, logits: bool = True):
    """One prefill: (last-position logits or None, the key at the last position of `layer`, (B, F)), from the
    graph's key_last output (the same one the guard reads while decoding)."""
    output = require_key_last(model.manifest, model.directory)[resolve_layers([layer], model.manifest.num_layers)[0]]
    out_logits, _, extras = model.forward(ids, mask, model.empty_past(ids.shape[0]), [output], logits=logits)
    return out_logits, extras[output]
