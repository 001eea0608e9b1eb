"""Run an exported model over datasets and accumulate the statistics each method needs (no torch).

Two kinds of pass:
  prompt pass  forget prompts as a user sends them (chat template by default, the same rendering the
               runtime uses), left-padded; keeps the key vector at the last prompt token of every layer.
  text pass    prompt + completion as plain text, all real tokens (the reference code probes GSM8K answers
               and MBPP code this way); keeps pre-activations (NA) and keys (SP) of every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tqdm import tqdm

from unskill.runtime.errors import UnskillError
# last_position_keys and shared_prefix_length live in runtime/keys.py now; re-exported for older imports
from unskill.runtime.keys import MIN_SHARED_PREFIX, KeyReader, grouped_last_keys, _batches, last_position_keys, shared_prefix_length  # noqa: F401
from unskill.runtime.session import OnnxLM, left_pad
from unskill.runtime.statsfile import CALIBRATION_GROUPS, GROUP_FIELDS, Moments, StatsFile
from unskill.runtime.tokenizer import TextTokenizer

from .datasets import Dataset


@dataclass
class ProbeConfig:
    chat: bool = True
    batch_size: int = 8
    max_text_tokens: int = 512      # text pass truncation; probes are about the skill, not long contexts
    progress: bool = True
    formats: tuple[str, ...] | None = None   # prompt formats of the KSD probes (stats/augment.py; None: chat or raw)

    @property
    def prompt_formats(self) -> tuple[str, ...]:
        return self.formats or (("chat",) if self.chat else ("raw",))


AUGMENT_ITEMS = 100   # forget prompts that also get framed variants (x every family) with `augment`
CHUNK = 256   # prompts whose keys (every layer) are held at once in the prompt pass


class Prober:
    def __init__(self, model: OnnxLM, tokenizer: TextTokenizer, config: ProbeConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.manifest = model.manifest
        self._key_model = None
        self.keep_layers: list[int] | None = None   # the prompt pass also keeps these layers' keys (`unskill guard`)
        self.keep_positions = 1   # > 1: and their mean over each prompt's last keep_positions tokens
        self.kept: list[np.ndarray] = []
        self.kept_means: list[np.ndarray] = []

    @property
    def key_model(self) -> OnnxLM:
        """The keys-only graph for prompt passes (loaded on first use; the text pass needs the full one)."""
        if self._key_model is None:
            self._key_model = self.model.key_only()
        return self._key_model

    def _new(self, group: str) -> Moments:
        return Moments.empty(GROUP_FIELDS[group], self.manifest.num_layers, self.manifest.key_width)

    def _run(self, batches, total, outputs, desc):
        """Batches of (real-token mask, requested outputs); logits are never fetched."""
        pad = self.manifest.pad_token_id
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not self.config.progress):
            ids, mask = left_pad(batch, pad)
            _, _, values = self.model.forward(ids, mask, self.model.empty_past(len(batch)), outputs, logits=False)
            yield mask.astype(bool), values

    def prompt_sequences(self, dataset: Dataset) -> list[list[int]]:
        """Token ids of the probes: every prompt in every configured format, framed variants (stats/augment.py,
        group FRAMED) in one format each, rotating over them (the frames already vary the prompt; every
        format x every frame would triple the probes for little)."""
        from .augment import FRAMED, encode_formats

        formats = self.config.prompt_formats
        plain = [item.prompt for item in dataset.items if item.group != FRAMED]
        framed = [item.prompt for item in dataset.items if item.group == FRAMED]
        sequences = (encode_formats(self.tokenizer, plain, formats)
                     + encode_formats(self.tokenizer, framed, formats, one=True))
        limit = self.manifest.max_context
        for ids in sequences:
            if len(ids) > limit:
                raise UnskillError(f"{dataset.name}: a prompt of {len(ids)} tokens exceeds the context of {limit}")
        return sequences

    def prompt_pass(self, dataset: Dataset) -> Moments:
        sequences = self.prompt_sequences(dataset)
        moments = self._new("ksd")
        reader = self.reader()
        with tqdm(total=len(sequences), desc=f"KSD {dataset.name}", unit="prompt",
                  disable=not self.config.progress) as bar:
            for start in range(0, len(sequences), CHUNK):   # memory stays O(CHUNK * L * F)
                chunk = sequences[start:start + CHUNK]
                if self.keep_layers and self.keep_positions > 1:   # per-position keys: the full graph
                    keys, means, _ = reader.window_keys(chunk, range(self.manifest.num_layers), self.keep_layers,
                                                        self.keep_positions, pool=True)
                    self.kept_means.append(means)
                    bar.update(len(chunk))
                else:
                    keys = grouped_last_keys(reader, chunk, bar=bar)
                for layer in range(self.manifest.num_layers):
                    moments.add(layer, keys[:, layer])
                if self.keep_layers:
                    self.kept.append(keys[:, self.keep_layers])
        return moments

    def reader(self):
        """What the prompt pass reads keys with: runtime/keys.KeyReader here (cluster/jobs.py: on a Ray pool)."""
        return KeyReader(self.model, self.config.batch_size, self.config.progress)

    def kept_keys(self) -> np.ndarray:
        """(probes, len(keep_layers), F): the keys the prompt pass kept, in probe order."""
        return np.concatenate(self.kept)

    def kept_mean_keys(self) -> np.ndarray | None:
        """(probes, len(keep_layers), F): their mean over each probe's last keep_positions tokens, or None."""
        return np.concatenate(self.kept_means) if self.kept_means else None

    def text_sequences(self, dataset: Dataset) -> list[list[int]]:
        # Never past the model's context: a learned position table (GPT-2) has no rows beyond it.
        limit = min(self.config.max_text_tokens, self.manifest.max_context)
        sequences = []
        for item in dataset.items:
            text = item.context + item.completion if item.completion else item.prompt
            sequences.append(self.tokenizer.encode_text(text)[:limit])
        return sequences

    def text_moments(self, batches, side: str, total: int | None = None, desc: str = "NA/SP") -> dict[str, Moments]:
        """NA (pre-activations) and SP (keys) moments of every real token of these batches of sequences."""
        na, sp = self._new(f"na_{side}"), self._new(f"sp_{side}")
        outputs = self.manifest.preact_outputs + self.manifest.key_outputs
        for real, values in self._run(batches, total, outputs, desc):
            for layer in range(self.manifest.num_layers):
                na.add(layer, values[self.manifest.preact_outputs[layer]][real])
                sp.add(layer, values[self.manifest.key_outputs[layer]][real])
        return {f"na_{side}": na, f"sp_{side}": sp}

    def text_pass(self, dataset: Dataset, side: str) -> dict[str, Moments]:
        sequences = self.text_sequences(dataset)
        total = (len(sequences) + self.config.batch_size - 1) // self.config.batch_size
        return self.text_moments(_batches(sequences, self.config.batch_size), side, total, f"NA/SP {dataset.name}")

    def passes(self, probes: Dataset, text_sides: list[tuple[Dataset, str]]) -> dict[str, Moments]:
        """The `ksd` group from the prompt pass over `probes`, and each (dataset, side)'s NA/SP groups."""
        groups = {"ksd": self.prompt_pass(probes)}
        for dataset, side in text_sides:
            groups.update(self.text_pass(dataset, side))
        return groups


def probe(model: OnnxLM, tokenizer: TextTokenizer, forget: Dataset, retain: Dataset | None = None,
          config: ProbeConfig | None = None, skill: str | None = None, text: bool = False,
          augment: str | None = None, prober: Prober | None = None, augment_items: int = AUGMENT_ITEMS) -> StatsFile:
    """KSD stats from the forget prompts; with a retain set, NA and SP stats from both sides as well.
    `text` adds the forget side's NA/SP stats without a retain set (a shard for `compose_stats`).
    `augment` (math | code) adds framed variants of the first AUGMENT_ITEMS forget prompts to the KSD probes
    (stats/augment.py). `prober` runs the passes elsewhere (cluster/jobs.py: a Ray actor pool)."""
    from .augment import augment as framed

    config = config or ProbeConfig()
    prober = prober or Prober(model, tokenizer, config)
    head = Dataset(forget.name, forget.items[:augment_items])
    probes = Dataset(forget.name, forget.items + framed(head, augment).items) if augment else forget
    sides = ([(forget, "forget")] if retain is not None or text else []) + ([(retain, "retain")] if retain else [])
    groups = prober.passes(probes, sides)
    manifest = model.manifest
    meta = {
        "skill": skill or forget.name,
        "forget": {"name": forget.name, "count": len(forget.items)},
        "augment": augment,
        "retain": {"name": retain.name, "count": len(retain.items)} if retain else None,
        "prompt_template": {"chat": bool(config.chat and tokenizer.has_chat_template),
                            "template": manifest.chat_template if config.chat else None,
                            **({"formats": list(config.formats)} if config.formats else {})},
        "max_text_tokens": config.max_text_tokens,
        "model_source": manifest.source,
    }
    return StatsFile(manifest.fingerprint, manifest.arch, manifest.key_width, manifest.num_layers, meta, groups)


def merge_stats(first: StatsFile, second: StatsFile, where: str = "merge") -> StatsFile:
    """Shards of the same model, template and datasets kind add up to the stats of their union."""
    if first.fingerprint != second.fingerprint:
        raise UnskillError(f"{where}: the shards come from different models")
    if first.meta.get("prompt_template") != second.meta.get("prompt_template"):
        raise UnskillError(f"{where}: the shards used different prompt templates")
    # a stored guard rule and its calibration groups are dropped: the merged cubes need calibrating again
    probed = [sorted(set(shard.groups) - set(CALIBRATION_GROUPS)) for shard in (first, second)]
    if probed[0] != probed[1]:
        raise UnskillError(f"{where}: the shards hold different groups ({probed[0]} vs {probed[1]})")
    meta = dict(first.meta)
    for side in ("forget", "retain"):
        a, b = first.meta.get(side), second.meta.get(side)
        if a and b:
            names = a["name"] if a["name"] == b["name"] else f"{a['name']}+{b['name']}"
            meta[side] = {"name": names, "count": a["count"] + b["count"]}
    groups = {name: first.groups[name].merge(second.groups[name]) for name in probed[0]}
    return StatsFile(first.fingerprint, first.arch, first.key_width, first.num_layers, meta, groups)


def compose_stats(forget: StatsFile, others: list[StatsFile], where: str = "compose") -> StatsFile:
    """`forget`'s KSD and forget-side groups, with a retain side made of the others' forget-side text stats.
    One text pass per language then serves as forget in its own setting and as retain in all the others."""
    if not others:
        raise UnskillError(f"{where}: compose needs at least one retain shard")
    for shard in [forget, *others]:
        missing = {"ksd", "na_forget", "sp_forget"} - set(shard.groups)
        if missing:
            raise UnskillError(f"{where}: {shard.skill!r} lacks {sorted(missing)}; probe it with --text")
        if shard.fingerprint != forget.fingerprint:
            raise UnskillError(f"{where}: {shard.skill!r} comes from a different model")
    retain = {side: others[0].groups[f"{side}_forget"] for side in ("na", "sp")}
    for shard in others[1:]:
        retain = {side: moments.merge(shard.groups[f"{side}_forget"]) for side, moments in retain.items()}
    groups = {name: forget.groups[name] for name in ("ksd", "na_forget", "sp_forget")}
    groups.update({f"{side}_retain": moments for side, moments in retain.items()})
    names = [shard.meta["forget"]["name"] for shard in others]
    meta = dict(forget.meta, retain={"name": "+".join(names),
                                     "count": sum(shard.meta["forget"]["count"] for shard in others)})
    return StatsFile(forget.fingerprint, forget.arch, forget.key_width, forget.num_layers, meta, groups)
