"""Choose KSD's alpha from data: the widest cube whose false-abstain rate on retain prompts stays under a
target, reported with how much of the forget set it still catches. The paper leaves alpha to hand-tuning.

A prompt's entry alpha is max over dimensions of |v - mu| / (k * sigma): the smallest alpha (in units of the
fitted k) whose cube contains it. Rates at any alpha follow from sorting these, with no more forward passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from unskill.runtime.errors import UnskillError
from unskill.runtime.session import OnnxLM
from unskill.runtime.statsfile import GROUP_FIELDS, LINEAR_LIMIT, Moments, StatsFile
from unskill.runtime.tokenizer import TextTokenizer

from unskill.runtime.ksd import build_cubes, layer_scores, vote  # noqa: F401  (layer_scores: older imports)

from .datasets import Dataset


@dataclass
class Calibration:
    alpha: float                 # in units of the fitted k (ksd-run --alpha-mode k)
    layer: int
    retain_abstain: float        # on the retain prompts given
    forget_abstain: float | None
    retain_items: int
    forget_items: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(model: OnnxLM, tokenizer: TextTokenizer, stats: StatsFile, retain: Dataset,
              forget: Dataset | None = None, target: float = 0.01, layer: int = -1, chat: bool = True) -> Calibration:
    _check_target(target)
    cubes = _unit_cubes({"skill": stats}, model.manifest.num_layers, layer)
    retain_alphas = _entry_alphas(model, tokenizer, cubes, retain, chat)["skill"]
    forget_alphas = _entry_alphas(model, tokenizer, cubes, forget, chat)["skill"] if forget is not None else None
    return _choose(retain_alphas, forget_alphas, target, cubes["skill"].layer)


def calibrate_skills(model: OnnxLM, tokenizer: TextTokenizer, stats: dict[str, StatsFile],
                     forget: dict[str, Dataset], retain: Dataset | None = None, target: float = 0.01,
                     layer: int = -1, chat: bool = True) -> dict[str, Calibration]:
    """Several skills in one pass: each prompt gets one prefill and its entry alpha for every cube.

    A skill's retain set is the shared `retain` plus every other skill's validation prompts (forget Spanish:
    the German, Arabic, ... prompts must stay answered), so N skills cost one pass over N forget sets instead
    of N passes over N retain sets, and each cube's retain tail is measured on more prompts.
    """
    _check_target(target)
    if set(forget) != set(stats):
        raise UnskillError(f"calibrate: every --stats NAME needs a --forget NAME=SPEC and back "
                           f"(stats {sorted(stats)}, forget {sorted(forget)})")
    cubes = _unit_cubes(stats, model.manifest.num_layers, layer)
    per_forget = {name: _entry_alphas(model, tokenizer, cubes, dataset, chat) for name, dataset in forget.items()}
    shared = _entry_alphas(model, tokenizer, cubes, retain, chat) if retain is not None else None
    results = {}
    for name in stats:
        parts = [per_forget[other][name] for other in forget if other != name]
        if shared is not None:
            parts.append(shared[name])
        results[name] = _choose(np.concatenate(parts), per_forget[name][name], target, cubes[name].layer)
    return results


def _check_target(target: float) -> None:
    if not 0 <= target < 1:
        raise UnskillError(f"--target must be in [0, 1), got {target}")


def _unit_cubes(stats: dict[str, StatsFile], num_layers: int, layer: int) -> dict:
    """Per stats name the paper's cube at alpha 1 (x k) on `layer`: its score is a key's entry alpha."""
    from unskill.runtime.keys import resolve_layers

    layer = resolve_layers([layer], num_layers)[0]
    return {name: build_cubes(s, [layer], 1.0, "k")[0] for name, s in stats.items()}


def _entry_alphas(model, tokenizer, cubes: dict, dataset: Dataset, chat: bool,
                  batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per stats name the entry alpha of every prompt of `dataset` (one prefill each, the guard's key tap)."""
    from unskill.runtime.keys import KeyReader

    layer = next(iter(cubes.values())).layer
    sequences = [tokenizer.encode_prompt(item.prompt, chat) for item in dataset.items]
    keys = KeyReader(model, batch_size).last_keys(sequences, [layer])[:, 0]
    return {name: cube.score(keys).astype(np.float64) for name, cube in cubes.items()}


def _choose(retain_alphas: np.ndarray, forget_alphas: np.ndarray | None, target: float, layer: int) -> Calibration:
    """The largest alpha that refuses at most floor(target * n) retain prompts (entry alpha <= alpha refuses)."""
    if retain_alphas.size == 0:
        raise UnskillError("calibrate: no retain prompts to calibrate on")
    retain_alphas = np.sort(retain_alphas)
    allowed = int(np.floor(target * retain_alphas.size))   # retain prompts we may refuse
    alpha = float(retain_alphas[allowed]) * (1 - 1e-6) if allowed < retain_alphas.size else float("inf")
    return Calibration(alpha, layer, float(np.mean(retain_alphas <= alpha)),
                       None if forget_alphas is None else float(np.mean(forget_alphas <= alpha)),
                       int(retain_alphas.size), None if forget_alphas is None else int(forget_alphas.size))


# ------------------------------------------------------------------------------------------ the stored rule
# `unskill calibrate` without --layer searches rules: per candidate region kind (gauss, ratio) and layer count /
# votes, each layer's threshold is set on the retain prompts (its share of the false-refusal budget), the
# layers with the best forget recall on the validation prompts are kept, and the candidate whose joint rule
# stays within the retain target with the highest forget recall wins. Only key statistics and thresholds:
# nothing is trained.

WIDEN = 1.25        # retain prompts within this factor of a threshold count against a candidate
AUGMENT_ITEMS = 50   # forget validation items that also get framed variants (x every family)
CANDIDATES = ((1, 1), (3, 1), (3, 2), (5, 2), (5, 3), (8, 3))   # (layers, votes)
# What `unskill calibrate --rules` may search, and its default: calibration picks among both on validation data
# (boxes lost on the bypass benchmark); the decode check below keeps a rule that fires on decoded tokens of
# ordinary answers (a Gemma-3 ratio rule did) out.
RULE_KINDS = ("gauss", "ratio")
DECODE_PROMPTS = 64   # retain prompts (evenly spaced over every retain set) decoded greedily by the decode check
DECODE_TOKENS = 16    # tokens each of them decodes; the guard checks the key at every one of them
# 32 prompts x 10 tokens passed a Gemma-3 ratio rule that then refused 0.10-0.15 of retain prompts within 16
# decoded tokens: the sample misses the tail of decoded keys. So
# the check also keeps a margin: thresholds stay WIDEN x below the decoded keys, and a candidate is rejected
# when WIDEN x its thresholds would already refuse more decoded prompts than the target.


def ratio_bounds(forget_gauss: np.ndarray) -> np.ndarray:
    """Per layer, the ratio rule's cap on the forget-side score: WIDEN x the farthest forget validation prompt
    (plain and framed). A key beyond it is far from the forget probes whatever the quotient says; keys at
    decoded tokens are (median 27 vs at most 4.6 for forget prompts at SmolLM2's layer 29)."""
    return WIDEN * forget_gauss.max(axis=0)


def capped(ratio: np.ndarray, forget_gauss: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Ratio scores with the cap applied: inf (never inside) where the forget-side score exceeds the bound
    (RatioRegion.score does the same; kept for scores computed without bounds)."""
    return np.where(forget_gauss <= bounds[None], ratio, np.inf)


def key_moments(keys: np.ndarray) -> Moments:
    """The stats group of these (n, L, F) keys, as `unskill stats` accumulates its `ksd` group."""
    moments = Moments.empty(GROUP_FIELDS["ksd_retain"], keys.shape[1], keys.shape[2])
    for layer in range(keys.shape[1]):
        moments.add(layer, keys[:, layer])
    return moments


def retain_ratio_scores(retain_keys: np.ndarray, stats: StatsFile, folds: int = 2, seed: int = 0,
                        bounds=None) -> np.ndarray:
    """Ratio scores of the retain prompts, each scored against retain moments fitted WITHOUT it (cross-fitting):
    in-sample a prompt pulls the retain Gaussian towards itself and its score would be optimistic, so the
    thresholds set on these scores would refuse more unseen retain prompts than the target."""
    fold = np.random.default_rng(seed).permutation(retain_keys.shape[0]) % folds
    scores = np.empty(retain_keys.shape[:2], np.float32)
    for part in range(folds):
        scores[fold == part] = layer_scores(retain_keys[fold == part], stats, "ratio",
                                            key_moments(retain_keys[fold != part]), bounds)
    return scores


def retain_threshold(scores: np.ndarray, target: float) -> float:
    """The largest threshold refusing at most floor(target * n) of these retain scores."""
    ordered = np.sort(scores)
    allowed = int(np.floor(target * ordered.size))
    return float(ordered[allowed]) * (1 - 1e-6) if allowed < ordered.size else float("inf")


def fires(scores: np.ndarray, layers: list[int], thresholds: list[float], votes: int) -> np.ndarray:
    """(n, L) layer scores -> (n,) bool: the rule on `layers` refuses the row (the guard's own vote)."""
    return vote(scores[:, layers], thresholds, votes)


class _KeyRecorder:
    """Stands in for the guard in the runtime's decode loop: refuses nothing, keeps the keys of every check
    (the same key_last outputs, the same per-step slicing the guard gets)."""

    def __init__(self, names: list[str]):
        self.output_names, self.steps = list(names), []

    def check(self, last_keys: dict[str, np.ndarray]):
        self.steps.append(np.stack([last_keys[name] for name in self.output_names], axis=1))   # (B, L, F)
        return [None] * self.steps[-1].shape[0]


def decoded_keys(model: OnnxLM, tokenizer: TextTokenizer, prompts: list, tokens: int = DECODE_TOKENS,
                 chat: bool = True, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decode of `tokens` tokens per prompt through the runtime's Generator; returns the keys the guard
    checks at the decoded tokens, (d, L, F) over every layer, and each row's prompt index (d,). Check 0 (the
    prompt's last token) is left out: the prefill path (KeyReader) already scores it. A row that ends early
    (EOS) contributes the checks it took part in only."""
    from unskill.runtime.generator import GenerationParams, Generator
    from unskill.runtime.keys import require_key_last

    names = require_key_last(model.manifest, model.directory)
    keys, owners = [], []
    for start in range(0, len(prompts), batch_size):
        recorder = _KeyRecorder(names)
        results = Generator(model, tokenizer, recorder, second_look=False).generate(
            prompts[start:start + batch_size], GenerationParams(max_new_tokens=tokens + 1, chat=chat))
        steps = np.stack(recorder.steps, axis=1)   # (B, checks, L, F)
        for row, result in enumerate(results):
            keys.append(steps[row, 1:result.forwards])
            owners.append(np.full(keys[-1].shape[0], start + row))
    return np.concatenate(keys), np.concatenate(owners)


def _decoded_in_formats(model, tokenizer, prompts: list, tokens: int, formats, batch_size: int):
    """decoded_keys with the prompts split over the chat and raw formats asked for (alternating), owners kept
    as indices into `prompts`."""
    modes = [fmt == "chat" for fmt in ("chat", "raw") if fmt in formats] or [True]
    parts, owners = [], []
    for offset, chat in enumerate(modes):
        chosen = list(range(offset, len(prompts), len(modes)))
        if not chosen:
            continue
        keys, owner = decoded_keys(model, tokenizer, [prompts[i] for i in chosen], tokens, chat, batch_size)
        parts.append(keys)
        owners.append(np.asarray(chosen)[owner])
    return np.concatenate(parts), np.concatenate(owners)


def per_prompt(scores: np.ndarray, owner: np.ndarray, prompts: int) -> np.ndarray:
    """(d, L) scores of decoded tokens -> (prompts, L): each prompt's lowest score over its decoded tokens (a
    prompt is refused at decode as soon as one token's key is inside)."""
    lowest = np.full((prompts, scores.shape[1]), np.inf, dtype=np.float64)
    np.minimum.at(lowest, owner, scores)
    return lowest


def decode_refused(scores: np.ndarray, owner: np.ndarray, prompts: int, layers, thresholds, votes) -> float:
    """Share of the decoded prompts the rule refuses at some decoded token."""
    refused = np.zeros(prompts, dtype=bool)
    np.logical_or.at(refused, owner, fires(scores, layers, thresholds, votes))
    return float(refused.mean())


def search_rule(retain: dict[str, np.ndarray], forget: np.ndarray, target: float, rules=None,
                candidates=CANDIDATES, decoded: dict | None = None, owner: np.ndarray | None = None):
    """retain: rule -> (n, L) scores of the retain prompts, forget: rule -> (m, L) scores of the forget
    prompts (rules: those to search, default every one scored). decoded: rule -> (d, L) scores of keys at
    decoded tokens of retain prompts, owner (d,) their prompt index: each layer's threshold also stays WIDEN x
    below them (the same per-layer budget, counted in prompts), and a candidate that would refuse more decoded
    prompts than the target at WIDEN x its thresholds is rejected. Returns (GuardSetting, forget recall, retain rate) of the best
    candidate within the target."""
    from unskill.runtime.statsfile import GuardSetting

    prompts = int(owner.max()) + 1 if decoded is not None and owner.size else 0
    lowest = {rule: per_prompt(scores, owner, prompts) for rule, scores in decoded.items()} if prompts else {}
    best = None
    for rule in rules or tuple(retain):
        for count, votes in candidates:
            budget = target * votes / count   # a union of `count` layers needing `votes`: share the budget
            per_layer = [retain_threshold(retain[rule][:, i], budget) for i in range(retain[rule].shape[1])]
            if prompts:   # the guard also checks every decoded token: stay WIDEN x below those keys too
                per_layer = [min(t, retain_threshold(lowest[rule][:, i], budget) / WIDEN)
                             for i, t in enumerate(per_layer)]
            recall = [(forget[rule][:, i] <= t).mean() for i, t in enumerate(per_layer)]
            layers = sorted(int(i) for i in np.argsort(recall, kind="stable")[::-1][:count])
            thresholds = [per_layer[i] for i in layers]
            if not all(np.isfinite(thresholds)) or not all(t > 0 for t in thresholds):
                continue
            retain_rate = float(fires(retain[rule], layers, thresholds, votes).mean())
            forget_rate = float(fires(forget[rule], layers, thresholds, votes).mean())
            # Forget recall saturates on validation prompts, so candidates are also ranked by how many retain
            # prompts sit just outside the regions (refused were every threshold WIDEN x larger): unseen
            # retain prompts land there first.
            near = float(fires(retain[rule], layers, [t * WIDEN for t in thresholds], votes).mean())
            merit = forget_rate - near
            if prompts and decode_refused(decoded[rule], owner, prompts, layers, [t * WIDEN for t in thresholds],
                                          votes) > target:
                continue   # the margin: unseen answers' decoded keys land just outside first
            if retain_rate <= target and (best is None or merit > best[3]):
                best = (GuardSetting(rule, layers, thresholds, votes), forget_rate, retain_rate, merit)
    if best is None:
        raise UnskillError("calibrate: no rule keeps the retain prompts under the target")
    return best[:3]


@dataclass
class RuleCalibration:
    setting: object               # GuardSetting, stored in the stats file
    retain_moments: Moments       # the retain prompts' key moments, stored as `ksd_retain` with a ratio rule
    paper: Calibration            # the paper's rule (last layer, one cube) on the --retain prompts alone
    forget_rate: float            # the stored rule on the forget validation prompts (+ their framed variants)
    retain_rate: float            # ... on every retain prompt (the --retain set, built-in chat and general)


def calibrate_rule(model: OnnxLM, tokenizer: TextTokenizer, stats: StatsFile, retain: list[Dataset],
                   forget: Dataset, target: float = 0.01, chat: bool = True, kind: str | None = None,
                   batch_size: int = 8, progress: bool = False, rules=RULE_KINDS,
                   decode_prompts: int = DECODE_PROMPTS, decode_tokens: int = DECODE_TOKENS,
                   formats=None, reader=None, forget_fit: np.ndarray | None = None,
                   fit_layers: list[int] | None = None, forget_pooled: np.ndarray | None = None) -> RuleCalibration:
    """One prefill per prompt reads every layer's key; rules and the paper's alpha are chosen from them.
    retain[0] is the user's --retain set (the paper's alpha is calibrated on it alone, as before); the
    others (built-in chat, general) join it for the stored rule. `kind` adds framed variants of the forget
    validation prompts (stats/augment.py, never the benchmark's frames). decode_prompts retain prompts (evenly
    spaced over all retain sets; 0: none) decode decode_tokens tokens greedily, and no stored rule may refuse
    more of them at a decoded token than the target (the runtime guard checks every decoded token's key).
    formats: the prompt formats every prompt is read in (stats/augment.py FORMAT_SETS; None: chat or raw as
    `chat` says), forget and retain side alike; the decode check alternates chat and raw where both are asked.
    `reader` reads the prompt keys elsewhere (KeyReader's interface; cluster/jobs.RayKeyReader for --ray).
    forget_fit (n, C, F): the forget probes' own keys at fit_layers (`unskill guard` keeps them): a linear rule
    (calibrate_linear) is then fitted too, and whichever kind catches more validation prompts within the target
    is stored. forget_pooled (n, C, F): the probes' mean keys over their last PROMPT_POSITIONS tokens at
    fit_layers: the linear rule then also reads that mean (calibrate_linear's `pooled`) and, on the budget those
    leave, every prompt position (calibrate_anywhere: a second pass over the retain prompts). The stored
    forget_refused is the last token's and the mean key's (a lower bound: the every-position read only adds)."""
    from unskill.runtime.keys import KeyReader, grouped_last_keys

    from .augment import augment, encode_formats

    _check_target(target)
    formats = tuple(formats or (("chat",) if chat else ("raw",)))
    reader = reader or KeyReader(model, batch_size, progress)

    # a linear rule that also reads the mean key of the prompt's last tokens needs the probes' means (`unskill
    # guard` keeps them) and the full graph's per-position keys (the reader's window_keys)
    positions = PROMPT_POSITIONS if forget_pooled is not None else 1
    means: dict[str, list] = {"retain": [], "forget": []}
    retain_sequences: list[list[int]] = []   # the retain prompts' token sequences, for the every-position pass

    def keys(dataset: Dataset, one: bool = False, side: str = "retain") -> np.ndarray:
        """every format (one: a single format per prompt, rotating: for framed variants)"""
        sequences = encode_formats(tokenizer, dataset.prompts, formats, one)
        if side == "retain":
            retain_sequences.extend(sequences)
        if positions == 1:
            return grouped_last_keys(reader, sequences, desc=f"calibrate {dataset.name}")
        last, mean, _ = reader.window_keys(sequences, range(model.manifest.num_layers), fit_layers, positions,
                                           desc=f"calibrate {dataset.name}", pool=True)
        means[side].append(mean)
        return last

    # retain prompts in one format each (a third chat, a third raw, a third the others): they are the bulk of
    # the prompts, and each format still gets hundreds of them
    retain_keys = [keys(dataset, one=True) for dataset in retain]
    head = Dataset(forget.name, forget.items[:AUGMENT_ITEMS])
    forget_sets = [forget] + ([augment(head, kind, seed=1)] if kind else [])
    forget_parts = [keys(dataset, one=index > 0, side="forget") for index, dataset in enumerate(forget_sets)]
    forget_keys = np.concatenate(forget_parts)
    pooled = None if positions == 1 else {"positions": positions, "forget": forget_pooled,
                                          "retain": np.concatenate(means["retain"]),
                                          "validation": np.concatenate(means["forget"])}
    last = model.manifest.num_layers - 1
    plain = forget_parts[0].shape[0]
    paper = _choose(layer_scores(retain_keys[0], stats, "box")[:, last],
                    layer_scores(forget_keys[:plain], stats, "box")[:, last], target, last)
    all_retain = np.concatenate(retain_keys)
    # scores of the searched region kinds only: the paper's box above needs its last layer alone
    retain_moments = key_moments(all_retain)
    retain_scores = {rule: layer_scores(all_retain, stats, rule) for rule in rules if rule != "ratio"}
    forget_scores = {rule: layer_scores(forget_keys, stats, rule) for rule in rules if rule != "ratio"}

    bounds = None
    if "ratio" in rules:   # the ratio rule's cap: WIDEN x the farthest forget validation prompt, per layer
        bounds = ratio_bounds(forget_scores["gauss"] if "gauss" in rules else layer_scores(forget_keys, stats, "gauss"))
        retain_scores["ratio"] = retain_ratio_scores(all_retain, stats, bounds=bounds)
        forget_scores["ratio"] = layer_scores(forget_keys, stats, "ratio", retain_moments, bounds)
    decoded, owner, picked = None, None, []
    if decode_prompts > 0 and decode_tokens > 0:
        items = [item.prompt for dataset in retain for item in dataset.items]
        picked = sorted({int(i) for i in np.linspace(0, len(items) - 1, min(decode_prompts, len(items)))})
        decode_keys, owner = _decoded_in_formats(model, tokenizer, [items[i] for i in picked], decode_tokens,
                                                 formats, batch_size)
        decoded = {rule: layer_scores(decode_keys, stats, rule, retain_moments, bounds if rule == "ratio" else None)
                   for rule in rules}
    setting, forget_rate, retain_rate = search_rule(retain_scores, forget_scores, target, decoded=decoded, owner=owner)
    if setting.rule == "ratio":
        setting.bounds = [float(bounds[i]) for i in setting.layers]
    plain_rate = float(fires(forget_scores[setting.rule][:plain], setting.layers, setting.thresholds,
                             setting.votes).mean())
    considered = {setting.name: forget_rate}   # each kind's best candidate and its validation recall
    if forget_fit is not None:
        linear = calibrate_linear(forget_fit, fit_layers, all_retain, forget_keys, plain, target,
                                  decode_keys if decoded is not None else None, owner, pooled=pooled)
        chosen = linear.forget_rate >= forget_rate
        if chosen and pooled is not None:   # the stored region, its last positions one by one, on the budget left
            from unskill.runtime.ksd import linear_regions   # (a second pass: only for the rule that is stored)

            region = replace(linear_regions("", linear.setting)[0], anywhere_positions=ANYWHERE_POSITIONS)
            earlier = lowest_earlier_scores(model, retain_sequences, region, batch_size,
                                            desc=f"calibrate the last {ANYWHERE_POSITIONS} positions", reader=reader)
            if calibrate_anywhere(linear, earlier, target) is not None:   # (None: nothing left, nothing stored)
                linear.setting.anywhere_positions = ANYWHERE_POSITIONS
        considered[linear.setting.name] = linear.forget_rate
        if chosen:
            setting, forget_rate, retain_rate, plain_rate = (linear.setting, linear.forget_rate, linear.retain_rate,
                                                             linear.plain_rate)
    setting.calibration = {"retain": [d.name for d in retain], "forget": [d.name for d in forget_sets],
                           "target": target, "retain_refused": retain_rate, "forget_refused": forget_rate,
                           "forget_plain_refused": plain_rate, "retain_items": int(all_retain.shape[0]),
                           "forget_items": int(forget_keys.shape[0]), "formats": list(formats),
                           "considered": considered}
    if decoded is not None:
        if setting.rule == "linear":   # scored at the stored layers only: its weights exist there alone
            from unskill.runtime.ksd import linear_regions
            regions = linear_regions("", setting)
            scores = np.stack([region.score(decode_keys[:, list(region.layers)]) for region in regions], axis=1)
            refused = decode_refused(scores, owner, len(picked), list(range(len(regions))), setting.thresholds,
                                     setting.votes)
        else:
            refused = decode_refused(decoded[setting.rule], owner, len(picked), setting.layers, setting.thresholds,
                                     setting.votes)
        setting.calibration.update(decode_prompts=len(picked), decode_tokens=decode_tokens, decode_refused=refused)
    return RuleCalibration(setting, retain_moments, paper, forget_rate, retain_rate)


# ------------------------------------------------------------------------------------------ the linear rule
# `unskill guard` also reads the forget probes' keys (not only their moments), so it can fit a linear
# discriminant per candidate layer (stats/discriminant.py) and set its threshold here. The retain side is the
# retain prompts' last-token keys and the keys at decoded tokens of some of them (the guard checks every decoded
# token; an answer's tokens can read more like the skill than its prompt: on SmolLM2 a fit without them put
# 5 % of retain answers past the prompts' threshold). Scores are out-of-fold (each prompt, with its decoded
# tokens, scored by a direction fitted without it); the threshold refuses at most the target of the retain
# prompts, and of the decoded prompts (at any decoded token); the window of layers with the best forget recall
# on the validation prompts (never fitted on) wins, as for the Gaussian kinds.

FOLDS = 4
WINDOWS = (1, 3, 5)   # candidate regions: this many adjacent fit layers, their discriminants averaged
# The linear rule also reads the mean key of the prompt's last PROMPT_POSITIONS tokens (its own discriminant and
# threshold); the last token keeps LAST_SHARE of the retain budget, the mean the rest. On SmolLM2 GSM8K
# (scripts/prompt_positions.py, docs/guard.md: out-of-fold thresholds, one target) raw re-worded, role-play, noise
# and code-wrapped requests went from 0.50-0.70 to 0.90-1.00 and Best-of-N requests broken within 50 samples from
# 0.25 / 0.42 to 0.17 / 0.25 (chat / raw); each earlier token at its own threshold caught the raw families only.
# A rule that also reads every prompt position (its last-token discriminant, its own threshold) gets what the last
# token and the mean key leave, most often nothing: its threshold then lies below every retain prompt they do not
# refuse. Giving it a share of its own (the last token 40 %, the mean up to 70 %) took more from those two than it
# gave on Gemma-3's coding guard (stories 0.90 -> 0.55, the frame-and-suffix search 0.92 -> 1.00 within 50
# queries; SmolLM2's: stories 0.40 -> 0.75, search 0.58 / 1.00 -> 0.33 / 0.17, chat / raw).
PROMPT_POSITIONS = 16
LAST_SHARE = 0.5
# The one-by-one read covers the prompt's last ANYWHERE_POSITIONS positions, not every one: its threshold lies below
# every retain prompt the other reads answer, and read at every position a long benign passage's lowest token put
# it where it caught nothing (SmolLM2's coding guard: -1.80; the frame-and-suffix search beat it on every request).
# A request's end stays within this many tokens of a 12-token suffix and a frame's closing words (docs/guard.md).
ANYWHERE_POSITIONS = 32
WINDOW_SLICE = 128        # prompts per slice of that read's calibration pass


def linear_threshold(scores: np.ndarray, target: float) -> float:
    """The largest threshold refusing at most floor(target * n) of these scores (score <= threshold refuses;
    additive, as linear scores have either sign)."""
    ordered = np.sort(scores)
    allowed = int(np.floor(target * ordered.size))
    return float(np.nextafter(ordered[allowed], -np.inf)) if allowed < ordered.size else float("inf")


def _folds(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(rows) % FOLDS


def _evidence(keys: np.ndarray, weight: np.ndarray, bias: float) -> np.ndarray:
    """w . v + b of one layer's keys (..., F): LinearRegion's score, negated, for one layer."""
    from unskill.runtime.ksd import LinearRegion

    return -LinearRegion("", (0,), weight[None], bias, 0.0).score(keys[..., None, :])


def out_of_fold_evidence(forget: np.ndarray, retain: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """(m,) w . v + b of the retain keys (m, F) of one layer, each from a discriminant fitted on the other folds
    of both sides (in-sample scores would set thresholds that refuse more unseen prompts); retain rows of one
    group (one prompt: its last token and its decoded tokens) share a fold."""
    from .discriminant import fit

    forget_fold, retain_fold = _folds(forget.shape[0], seed), _folds(int(groups.max()) + 1, seed + 1)[groups]
    evidence = np.empty(retain.shape[0], np.float32)
    for part in range(FOLDS):
        weight, bias = fit(forget[forget_fold != part], retain[retain_fold != part])
        evidence[retain_fold == part] = _evidence(retain[retain_fold == part], weight, bias)
    return evidence


@dataclass
class LinearCalibration:
    setting: object            # GuardSetting("linear", ...) with weights and biases
    forget_rate: float         # on the validation prompts, plain and framed
    retain_rate: float         # out-of-fold, on every retain prompt
    plain_rate: float
    retain_scores: np.ndarray | None = None    # (m,) the chosen region's out-of-fold last-token scores, retain prompts
    retain_refused: np.ndarray | None = None   # (m,) bool: retain prompts it refuses (last token or mean key)
    decoded_refused: np.ndarray | None = None  # (d,) bool: decoded prompts it refuses at a decoded token


def calibrate_linear(forget_fit: np.ndarray, fit_layers: list[int], retain: np.ndarray, validation: np.ndarray,
                     plain: int, target: float, decoded: np.ndarray | None = None, owner: np.ndarray | None = None,
                     windows=WINDOWS, pooled: dict | None = None) -> LinearCalibration:
    """forget_fit (n, C, F): the probes' keys at fit_layers (C of them); retain (m, L, F) and validation
    (v, L, F) at every layer, the first `plain` validation rows unframed; decoded (d, L, F) keys at decoded
    tokens of retain prompts with owner (d,) their prompt index (both sides of the retain fit). Each layer gets its
    discriminant; a candidate region averages those of `window` adjacent fit layers; its threshold keeps the
    out-of-fold scores of the retain prompts, and those of the decoded prompts, each within the target (on
    SmolLM2 GSM8K the decoded side did not bind once its keys were in the fit); the candidate catching
    the most validation prompts wins (ties: the wider window: averaging layers held Best-of-N noise better,
    docs/guard.md).

    pooled: {"positions": P, "forget": (n, C, F), "retain": (m, C, F), "validation": (v, C, F)}, the mean keys of
    each prompt's last P tokens at fit_layers (runtime/keys.py prompt_window_keys(pool=True)). The region then
    also reads that mean at the prompt, with its own discriminant per layer (forget probes' means against the
    retain prompts') and threshold: the last token gets LAST_SHARE of the retain budget, the mean what the last
    token left (out of fold, as the first); a prompt is refused when either is inside. The result carries the
    retain prompts' scores and decisions for a read at every prompt position (calibrate_anywhere)."""
    from unskill.runtime.statsfile import GuardSetting

    from .discriminant import fit

    prompts = int(owner.max()) + 1 if decoded is not None and owner.size else 0
    rows = retain.shape[0]
    share = LAST_SHARE if pooled else 1.0
    # the retain side: the retain prompts' last tokens and, where decoded, every decoded token of some of them
    # (the guard checks those too, and an answer's tokens can read more like the skill than its prompt did)
    groups = np.concatenate([np.arange(rows), rows + owner]) if prompts else np.arange(rows)
    fitted, oof, valid = [], [], []
    mean_fitted, mean_oof, mean_valid = [], [], []
    for column, layer in enumerate(fit_layers):
        kept = np.concatenate([retain[:, layer], decoded[:, layer]]) if prompts else retain[:, layer]
        fitted.append(fit(forget_fit[:, column], kept))
        oof.append(out_of_fold_evidence(forget_fit[:, column], kept, groups))
        valid.append(_evidence(validation[:, layer], *fitted[-1]))
        if pooled:
            mean_fitted.append(fit(pooled["forget"][:, column], pooled["retain"][:, column]))
            mean_oof.append(out_of_fold_evidence(pooled["forget"][:, column], pooled["retain"][:, column],
                                                 np.arange(rows)))
            mean_valid.append(_evidence(pooled["validation"][:, column], *mean_fitted[-1]))
    best, best_key = None, None
    for window in windows:
        for start in range(0, len(fit_layers) - window + 1):
            chosen = list(range(start, start + window))
            scores = -np.mean([oof[i] for i in chosen], axis=0)
            # one score per retain prompt, and one per decoded prompt: its lowest over the decoded tokens
            lowest = per_prompt(scores[rows:, None], owner, prompts)[:, 0] if prompts else scores[:0]
            pool = np.concatenate([scores[:rows], lowest])
            threshold = linear_threshold(pool, target * share)
            if prompts:   # and the target of the decoded prompts alone: the pool's budget could go to them all
                threshold = min(threshold, linear_threshold(lowest, target))
            if not np.isfinite(threshold):
                continue
            refused = -np.mean([valid[i] for i in chosen], axis=0) <= threshold
            retain_refused = scores[:rows] <= threshold
            mean_threshold = None
            if pooled:
                mean_scores = -np.mean([mean_oof[i] for i in chosen], axis=0)
                mean_threshold = _left_threshold(mean_scores, retain_refused, target)
            if mean_threshold is not None:
                retain_refused = retain_refused | (mean_scores <= mean_threshold)
                refused = refused | (-np.mean([mean_valid[i] for i in chosen], axis=0) <= mean_threshold)
            forget_rate = float(refused.mean())
            retain_rate = float(np.concatenate([retain_refused, lowest <= threshold]).mean())
            key = (forget_rate, window)
            if retain_rate > target or (best_key is not None and key <= best_key):
                continue
            setting = GuardSetting("linear", [fit_layers[i] for i in chosen], [float(threshold)], 1,
                                   weights=np.stack([fitted[i][0] for i in chosen]) / window,
                                   biases=np.array([fitted[i][1] for i in chosen]) / window)
            if mean_threshold is not None:
                setting.positions, setting.pooled_threshold = pooled["positions"], mean_threshold
                setting.pooled_weights = np.stack([mean_fitted[i][0] for i in chosen]) / window
                setting.pooled_biases = np.array([mean_fitted[i][1] for i in chosen]) / window
            best, best_key = LinearCalibration(setting, forget_rate, retain_rate, float(refused[:plain].mean()),
                                               scores[:rows], retain_refused, lowest <= threshold), key
    if best is None:
        raise UnskillError("calibrate: no linear rule keeps the retain prompts under the target")
    return best


def lowest_earlier_scores(model: OnnxLM, sequences: list[list[int]], region, batch_size: int = 8,
                          desc: str = "keys", reader=None) -> np.ndarray:
    """(n,) each prompt's lowest score under `region` (a LinearRegion: its last-token discriminant) over the
    positions before the last that its one-by-one read covers (its last `anywhere_positions`, read as the runtime
    reads them; every position where 0), +inf where there are none: what that read adds to the last token's.
    These keys were never fitted on (the fit reads last tokens and decoded tokens), so the full fit's weights
    score them out of sample; the last token's own score stays the out-of-fold one. reader: where the window is
    read (calibrate_rule's; a KeyReader on `model` by default)."""
    from unskill.runtime.keys import KeyReader, every_position_keys

    reader = reader or KeyReader(model, batch_size)

    def batches():
        """(rows, keys (B, P, layers, F), valid (B, P)) at the positions the read covers"""
        if not region.anywhere_positions:
            yield from every_position_keys(model, sequences, region.layers, batch_size, desc)
            return
        for start in range(0, len(sequences), WINDOW_SLICE):   # slices: (slice, positions, layers, F) float32 each
            _, keys, valid = reader.window_keys(sequences[start:start + WINDOW_SLICE], [], region.layers,
                                                region.anywhere_positions, desc)
            yield slice(start, start + len(keys)), keys, valid

    lowest = np.full(len(sequences), np.inf, np.float32)
    for rows, keys, valid in batches():
        scores = np.where(valid, region.score(keys), np.float32(np.inf))[:, :-1]
        if scores.shape[1]:
            lowest[rows] = scores.min(axis=1)
    return lowest


def calibrate_anywhere(linear: LinearCalibration, earlier: np.ndarray, target: float) -> float | None:
    """The threshold of the one-by-one read on what the last token and the mean key left of the budget:
    scores are each retain prompt's lowest over the positions it covers (earlier: lowest_earlier_scores; its last token:
    the out-of-fold score); None when nothing is left. Sets it on the setting and updates the retain rate."""
    lowest = np.minimum(earlier, linear.retain_scores)
    threshold = _left_threshold(lowest, linear.retain_refused, target)
    if threshold is None:
        return None
    refused = linear.retain_refused | (lowest <= threshold)
    linear.setting.anywhere_threshold = threshold
    linear.retain_rate = float(np.concatenate([refused, linear.decoded_refused]).mean())
    linear.retain_refused = refused
    return threshold


def _left_threshold(scores: np.ndarray, refused: np.ndarray, target: float) -> float | None:
    """The largest threshold on scores (m,) of the retain prompts that keeps those refused already (refused (m,)
    bool) or by it within the target; None when nothing is left of the budget to spend."""
    allowed = int(np.floor(target * refused.size)) - int(refused.sum())
    candidates = np.sort(np.asarray(scores, np.float32)[~refused])   # float32, as the guard compares
    if allowed < 0 or allowed >= candidates.size:
        return None
    threshold = float(np.nextafter(candidates[allowed], np.float32(-np.inf)))
    return threshold if abs(threshold) <= LINEAR_LIMIT else None
