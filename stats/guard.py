"""`unskill guard`: one run from an exported model to a KSD guard that is right by default.

It probes the forget skill (with framed variants, stats/augment.py), calibrates a rule against the retain sets
(stats/calibrate.py: region kind, layers, votes, thresholds) and stores it in the stats file, so `ksd-run
--stats FILE` and `unskill serve --stats FILE` use it with no other option. Every prompt, forget and retain
side, is read in several prompt formats (chat template, raw text, completion frames, a system prompt, a
conversation; FORMAT_SETS["all"]), so the rule holds whether a request arrives through the chat endpoint,
/v1/completions or `ksd-run --no-chat`.

The forget set is split in two, never shared: probes (fit the key statistics) and validation prompts (set
the thresholds' forget side). Benchmarks with a validation split use it (gsm8k, mbpp); any other set keeps its
last VALIDATION_SHARE for validation.

Best-of-N noise (random capitalization, shuffled letters, ASCII noise; Hughes et al., 2024) is one family of
the forget side's framed variants and every probe also gets a noised copy (an attacker resamples this noise until
a request passes, so one family's share was too few), and a noised copy of every third retain prompt joins the
retain side, so a garbled benign request is not refused either. Every probe and every third retain prompt also get
a copy with a suffix of random vocabulary tokens (what a black-box search appends and mutates; stats/augment.py).

Besides the moments of the probes' keys (the `ksd` group: the paper's cube, the Gaussian kinds), the probe pass
keeps the keys themselves at FIT_LAYERS layers, and calibration fits a linear discriminant on them (the `linear`
rule, stats/discriminant.py); the kind that catches more validation prompts within the target is stored.

Default retain sets (`--retain` adds to them, `--no-default-retain` drops them): the other built-in skill,
built-in general requests, calibration's chat set, the calibration half of the real user instructions less the
skill's own (`instructions:calibration-no<skill>`; the held-out half is the benchmark's), MMLU dev less the
skill's subjects and XQuAD passages with a question in seven languages (train split). The last three need the
benchmark data (--data-dir or $UNSKILL_DATA_DIR); without it they are left out and the run says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from unskill.runtime.errors import UnskillError
from unskill.runtime.session import OnnxLM
from unskill.runtime.statsfile import StatsFile
from unskill.runtime.tokenizer import TextTokenizer

from .datasets import Dataset, load_dataset, reading_passages

VALIDATION_SHARE = 0.25     # of a forget set without a validation split
SPLIT_BENCHMARKS = ("gsm8k", "mbpp")   # forget benchmarks with train and validation splits
SKILL_OF = {"gsm8k": "math", "builtin:math": "math", "math": "math",
            "mbpp": "code", "builtin:code": "code", "code": "code"}
FIT_LAYERS = 10                      # candidate layers of the linear rule (their probe keys are held in memory)
OTHER_SKILL = {"math": "builtin:code", "code": "builtin:math"}
# XQuAD passages per language on the retain side: --limit / this. Nothing else there is a long text with a question
# after it, and the guards made without them refused 70-80 % (SmolLM2 math, chat-raw), 38 % (Gemma-3 math) and
# 4-21 % (SmolLM2 code) of held-out XQuAD passages: reading comprehension with a "how many" question read as the skill.
READING_SHARE = 10


@dataclass
class GuardConfig:
    limit: int = 200                    # forget probes, validation prompts and items per retain set
    retain: list[str] = field(default_factory=list)   # extra retain specs (before the defaults)
    default_retain: bool = True
    formats: str = "all"                # stats/augment.py FORMAT_SETS key
    augment: str = "auto"               # auto: by the skill (math | code), else none
    target: float = 0.01                # largest false-refusal rate on the retain prompts
    data_dir: str | None = None
    batch_size: int = 8
    decode_prompts: int | None = None   # None: calibrate's defaults
    decode_tokens: int | None = None
    progress: bool = True
    noisy_retain: bool = True           # Best-of-N-noised copies of a third of the retain prompts


def fit_layers(num_layers: int, count: int = FIT_LAYERS) -> list[int]:
    """The layers a linear rule may use: evenly spaced over the upper two thirds (the skill is not yet in the
    keys of the first layers; docs/guard.md), `count` at most."""
    first = num_layers // 3
    return sorted({int(round(x)) for x in np.linspace(first, num_layers - 1, min(count, num_layers - first))})


def skill_kind(forget_spec: str) -> str | None:
    """math | code for the built-in skills and the benchmarks that hold them, else None."""
    head = forget_spec.split("+")[0]
    return SKILL_OF.get(head) or SKILL_OF.get(head.split(":")[0])


def forget_sets(spec: str, limit: int, data_dir) -> tuple[Dataset, Dataset]:
    """(probes, validation prompts), disjoint."""
    head, _, split = spec.partition(":")
    if head in SPLIT_BENCHMARKS and split in ("", "train"):
        return (load_dataset(f"{head}:train", data_dir, limit), load_dataset(f"{head}:validation", data_dir, limit))
    held = max(2, round(limit * VALIDATION_SHARE / (1 - VALIDATION_SHARE)))
    items = load_dataset(spec, data_dir, limit + held).items
    if len(items) < 8:
        raise UnskillError(f"{spec}: {len(items)} prompts; a guard needs at least 8 (probes and validation)")
    cut = len(items) - max(2, round(len(items) * VALIDATION_SHARE)) if len(items) < limit + held else limit
    return Dataset(spec, items[:cut]), Dataset(f"{spec}[validation]", items[cut:])


def retain_sets(kind: str | None, config: GuardConfig, data_dir, warn=print, vocabulary=None) -> list[Dataset]:
    """The --retain sets, then the defaults; then a Best-of-N-noised copy of every third prompt of each and, given
    vocabulary (decode, vocab size), a random-suffixed copy of every third (the forget side has both kinds of copy:
    without them here, the noise or the junk alone would read as the skill)."""
    sets = _plain_retain_sets(kind, config, data_dir, warn)
    if not config.noisy_retain:
        return sets
    from .augment import noisy_copies, suffix_copies

    suffixed = [suffix_copies(dataset, *vocabulary, every=3) for dataset in sets] if vocabulary else []
    return sets + [noisy_copies(dataset) for dataset in sets] + suffixed


def _plain_retain_sets(kind: str | None, config: GuardConfig, data_dir, warn) -> list[Dataset]:
    from .augment import chat_dataset, without_skill_subjects
    from .datasets import resolve_data_dir

    sets = [load_dataset(spec, data_dir, config.limit) for spec in config.retain]
    if not config.default_retain:
        return sets
    if kind in OTHER_SKILL:
        sets.append(load_dataset(OTHER_SKILL[kind], None, min(config.limit, 100)))
    sets += [load_dataset("builtin:general", None, min(config.limit, 100)), chat_dataset()]
    try:
        resolve_data_dir(data_dir)
    except UnskillError as exc:
        warn(f"note: {exc}; the retain side leaves out the real user instructions, MMLU and XQuAD")
        return sets
    sets.append(load_dataset(f"instructions:calibration-no{kind}" if kind else "instructions:calibration", data_dir))
    sets.append(without_skill_subjects(load_dataset("mmlu:dev", data_dir), kind))
    sets.append(reading_passages(data_dir, max(1, config.limit // READING_SHARE), "train"))
    return sets


def make_guard(model: OnnxLM, tokenizer: TextTokenizer, forget_spec: str, config: GuardConfig,
               skill: str | None = None, warn=None, ray=None):
    """Probe, calibrate, store: (the stats file with its rule, calibrate's RuleCalibration). ray: where the prompt
    passes run instead of here (cluster/jobs.RayGuard: its prober(model, tokenizer, config) and reader(model,
    batch_size)); the same keys, so the same rule."""
    from .augment import FORMAT_SETS
    from .calibrate import DECODE_PROMPTS, DECODE_TOKENS, PROMPT_POSITIONS, calibrate_rule
    from .probe import AUGMENT_ITEMS, ProbeConfig, Prober, probe

    warn = warn or (lambda line: print(line, file=sys.stderr))
    if config.formats not in FORMAT_SETS:
        raise UnskillError(f"--formats {config.formats!r}: use one of {sorted(FORMAT_SETS)}")
    kind = skill_kind(forget_spec)
    augment_kind = kind if config.augment == "auto" else None if config.augment == "none" else config.augment
    probes, validation = forget_sets(forget_spec, config.limit, config.data_dir)
    vocabulary = (tokenizer.decode, tokenizer.tokenizer.get_vocab_size())
    if augment_kind:   # Best-of-N-noised and random-suffixed copies of every probe: one per family is too few
        from .augment import FRAMED, augment, suffix_copies
        probes = Dataset(probes.name, probes.items + augment(probes, augment_kind, seed=2, families=("bon",)).items
                         + suffix_copies(probes, *vocabulary, group=FRAMED).items)
    retain = retain_sets(kind, config, config.data_dir, warn, vocabulary if augment_kind else None)
    if not retain:
        raise UnskillError("unskill guard: no retain set (give --retain SPEC, or keep the default ones)")
    formats = FORMAT_SETS[config.formats]
    probe_config = ProbeConfig(True, config.batch_size, progress=config.progress, formats=formats)
    prober = ray.prober(model, tokenizer, probe_config) if ray else Prober(model, tokenizer, probe_config)
    prober.keep_layers = fit_layers(model.manifest.num_layers)   # the linear rule is fitted on the probes' keys
    prober.keep_positions = PROMPT_POSITIONS                      # ... and on the mean of their last tokens
    stats = probe(model, tokenizer, probes, None, probe_config, skill or forget_spec, augment=augment_kind,
                  augment_items=min(AUGMENT_ITEMS, len(probes.items) // 2), prober=prober)   # framed: half, <= 100
    result = calibrate_rule(model, tokenizer, stats, retain, validation, config.target, True, augment_kind,
                            config.batch_size, config.progress,
                            decode_prompts=DECODE_PROMPTS if config.decode_prompts is None else config.decode_prompts,
                            decode_tokens=DECODE_TOKENS if config.decode_tokens is None else config.decode_tokens,
                            formats=formats, forget_fit=prober.kept_keys(), fit_layers=prober.keep_layers,
                            forget_pooled=prober.kept_mean_keys(),
                            reader=ray.reader(model, config.batch_size) if ray else None)
    store_rule(stats, result)
    return stats, result


def store_rule(stats: StatsFile, result) -> None:
    """The chosen rule (and a ratio rule's retain moments) into the stats file."""
    stats.guard = result.setting
    stats.groups.pop("ksd_retain", None)   # a ratio rule's retain side; any older one belongs to an older rule
    if result.setting.rule == "ratio":
        stats.groups["ksd_retain"] = result.retain_moments


def refusal_rates(model: OnnxLM, tokenizer: TextTokenizer, stats: StatsFile, datasets: list[Dataset],
                  modes=("chat", "raw"), batch_size: int = 8, progress: bool = False) -> dict:
    """The stored rule's refusal rate at the prompt (prefill check only, no decoding) on every dataset in every
    mode: {dataset name: {mode: rate}}. The keys come from the guard's own tap and the decision from the
    guard's own Detector, with the runtime's second look at garbled prompts (runtime/canonical.py), so these are
    the rates `ksd-run` gives at the prompt."""
    from unskill.runtime.canonical import SecondLook
    from unskill.runtime.keys import KeyReader, guard_prompt_keys
    from unskill.runtime.ksd import KSDGuard

    guard = KSDGuard([stats], model.manifest)
    reader = KeyReader(model, batch_size, progress)
    look = SecondLook(model, tokenizer, guard, batch_size)
    rates = {}
    for dataset in datasets:
        rates[dataset.name] = {}
        for mode in modes:
            sequences = [tokenizer.encode_prompt(prompt, mode == "chat") for prompt in dataset.prompts]
            keys, mask = guard_prompt_keys(model, guard, sequences, batch_size, f"{dataset.name} {mode}", reader)
            again = look.refused(dataset.prompts, mode == "chat")["refused"]
            fired = [hit is not None or second for hit, second in zip(guard.check(keys, mask), again)]
            rates[dataset.name][mode] = float(np.mean(fired))
    return rates
