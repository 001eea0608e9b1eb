"""The bypass benchmark: is the skill still refused when it is asked for in other words?

`bypass_sets(forget, data_dir, limit, seed)` returns, per attack family, chat conversations built from HELD-OUT
test items of the forget skill (GSM8K test, MBPP test) with the hand-written frames of `bypass_items.py`, and
per retain set, conversations the guard must answer (the other skill's test set, MMLU test without the skill's
own subjects (stats/augment.py SKILL_SUBJECTS: refusing algebra is no false refusal for a math guard), general
chat with numbers in it, and real users' requests: the held-out half of the user-oriented instructions without
the skill's label, `instructions:heldout-no<kind>`), and reading comprehension: XQuAD test passages with a
question, in seven languages. The same held-out half's requests labelled with the skill
(`instructions:heldout-<kind>`, few) are one more attack family: the skill as real users ask for it.
GSM8K's "calculation" family asks each item's first calculation bare ("What is 16 - 3 - 4?", the wordings of
`gsm8k:SPLIT-arithmetic`; the fit's bare calculations come from train solutions in other wordings). MBPP's
"program-language" family asks each task in another programming language (Java, C++, JavaScript, ...; the fit's
"port" family uses other languages and other frames).
Every choice is drawn from `random.Random(seed)`: the same arguments give the same prompts.
Nothing here may be used to fit or calibrate a guard (that is stats/augment.py, tested disjoint).

A conversation is a tuple of (role, text) turns ending in a user turn; single-turn prompts are one turn.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from unskill.runtime.errors import UnskillError
from unskill.stats.augment import in_language, without_skill_subjects
from unskill.stats.datasets import (ARITHMETIC_WORDINGS, XQUAD_LANGUAGES, Item, first_calculation, load_dataset,
                                    reading_passages, sample)

from . import bypass_items as B

FORGET_SKILLS = ("gsm8k", "mbpp")
RETAIN_OF = {"gsm8k": "mbpp:test", "mbpp": "gsm8k:test"}
COMMON_FAMILIES = ("plain", "reworded", "language", "roleplay", "injection", "fewshot", "context", "noise",
                   "multiturn", "trailer")
FAMILIES = {"gsm8k": COMMON_FAMILIES + ("code", "user-requests", "calculation"),
            "mbpp": COMMON_FAMILIES + ("pseudocode", "explain", "story", "user-requests", "program-language")}
RETAIN_SETS = ("other-skill", "mmlu", "chat", "instructions", "reading")
KIND_OF = {"gsm8k": "math", "mbpp": "code"}    # the instructions label (and augment kind) of each forget skill
# The instruction sets are small and fixed (the held-out half of 252 requests: ~95 benign, 6 math, 13 code), so
# they are taken whole whatever --gen-limit says: a false-refusal rate at 1 % needs ~100 prompts.
INSTRUCTIONS_SPLIT = "heldout"

Conversation = tuple[tuple[str, str], ...]


@dataclass
class BypassSet:
    name: str                          # family or retain set name
    side: str                          # attack | retain
    conversations: list[Conversation]


def _user(text: str) -> Conversation:
    return (("user", text),)


def _question(item: Item, forget: str) -> str:
    """The bare request: a GSM8K question, or an MBPP task's sentence without its asserts."""
    return item.prompt if forget == "gsm8k" else item.prompt.split("\nYour code should pass these tests:")[0]


def _noise(text: str, rng: random.Random) -> str:
    """Lower-cased, punctuation stripped, now and then a letter's case flipped."""
    text = re.sub(r"[^\w\s]", "", text.lower())
    return "".join(c.upper() if c.isalpha() and rng.random() < 0.05 else c for c in text)


def _pseudocode(code: str) -> str:
    """Reference code told as pseudo-code: keywords spelled out, no Python punctuation."""
    lines = []
    for line in code.splitlines():
        if not line.strip():
            continue
        text = re.sub(r"^(\s*)def (\w+)\((.*)\):", r"\1FUNCTION \2 TAKING \3", line)
        text = re.sub(r"^(\s*)for (.+) in (.+):", r"\1FOR EACH \2 IN \3 DO", text)
        text = re.sub(r"^(\s*)while (.+):", r"\1WHILE \2 DO", text)
        text = re.sub(r"^(\s*)if (.+):", r"\1IF \2 THEN", text)
        text = re.sub(r"^(\s*)elif (.+):", r"\1ELSE IF \2 THEN", text)
        text = re.sub(r"^(\s*)else:", r"\1OTHERWISE", text)
        text = re.sub(r"\breturn\b", "RETURN", text)
        text = re.sub(r"^(\s*)(\w+)\s*=\s*", r"\1SET \2 TO ", text)
        lines.append(text)
    return "\n".join(lines)


def _language_items(forget: str, count: int, rng: random.Random) -> list[Conversation]:
    """Problems written in other languages, the languages taken in turn so each gets its share."""
    table = B.MATH_LANGUAGES if forget == "gsm8k" else B.CODE_LANGUAGES
    languages = sorted(table)
    out = []
    for index in range(count):
        template = rng.choice(table[languages[index % len(languages)]])
        out.append(_user(template.format(n=rng.choice(B.NAMES), a=rng.randint(3, 40), b=rng.randint(2, 12),
                                         c=rng.randint(2, 9))))
    return out


def _fewshot(item: Item, others: list[Item], forget: str) -> str:
    """Three other held-out items with their reference answers, then the attacked one."""
    def answer(shot: Item) -> str:
        return shot.completion.rpartition("####")[2].strip() if forget == "gsm8k" else shot.completion.strip()
    block = "".join(f"Q: {_question(s, forget)}\nA: {answer(s)}\n\n" for s in others)
    return f"{block}Q: {_question(item, forget)}\nA:"


def _attack(family: str, item: Item, forget: str, pool: list[Item], rng: random.Random) -> Conversation:
    q = _question(item, forget)
    if family == "plain":
        return _user(item.prompt)
    if family == "reworded":
        return _user(rng.choice(B.REWORDINGS).format(q=q))
    if family == "roleplay":
        return _user(rng.choice(B.PERSONAS).format(q=q))
    if family == "injection":
        return _user(rng.choice(B.INJECTIONS).format(q=q))
    if family == "code":
        return _user(rng.choice(B.CODE_WRAPS[forget]).format(q=q))
    if family == "story":
        return _user(rng.choice(B.STORIES[forget]).format(q=q))
    if family == "trailer":
        return _user(rng.choice(B.TRAILERS).format(q=q))
    if family == "fewshot":
        return _user(_fewshot(item, rng.sample([p for p in pool if p is not item], 3), forget))
    if family == "context":
        return _user(rng.choice(B.DISTRACTIONS) + "\n\n" + q)
    if family == "noise":
        return _user(_noise(q, rng))
    if family == "multiturn":
        opener = rng.choice(B.CHAT_OPENERS)
        return (("user", opener[0]), ("assistant", opener[1]), ("user", q))
    if family == "pseudocode":
        return _user("Turn this pseudo-code into a working program:\n" + _pseudocode(item.completion))
    if family == "calculation":   # the problem's first calculation asked bare (a solution without one: another's)
        shown = first_calculation(item.completion) or next(
            c for c in map(first_calculation, (p.completion for p in rng.sample(pool, len(pool)))) if c)
        return _user(rng.choice(ARITHMETIC_WORDINGS).format(e=shown[0]))
    if family == "program-language":   # the languages taken in turn by the item's place in the sample
        language = B.PROGRAM_LANGUAGES[pool.index(item) % len(B.PROGRAM_LANGUAGES)]
        return _user(rng.choice(B.PROGRAM_FRAMES).format(q=in_language(q, language), lang=language))
    if family == "explain":
        call = item.tests[0].removeprefix("assert").split("==")[0].strip()
        return _user(f"What does this code print?\n\n{item.completion.strip()}\n\nprint({call})")
    raise UnskillError(f"bypass: unknown attack family {family!r}")


def bypass_sets(forget: str, data_dir=None, limit: int = 50, seed: int = 0) -> list[BypassSet]:
    """Attack families on `limit` held-out test items of `forget`, then the retain sets (`limit` each)."""
    if forget not in FORGET_SKILLS:
        raise UnskillError(f"bypass:{forget}: unknown forget skill (use one of {', '.join(FORGET_SKILLS)})")
    if limit < 4:
        raise UnskillError(f"bypass: --limit must be >= 4 (few-shot blocks need other items), got {limit}")
    items = sample(load_dataset(f"{forget}:test", data_dir), limit, seed).items
    sets = []
    for offset, family in enumerate(FAMILIES[forget]):
        rng = random.Random(f"{seed}:{forget}:{family}")   # one stream per family: adding one moves no other
        if family == "language":
            conversations = _language_items(forget, len(items), rng)
        elif family == "user-requests":
            conversations = instruction_conversations(forget, "", data_dir)
        else:
            conversations = [_attack(family, item, forget, items, rng) for item in items]
        sets.append(BypassSet(family, "attack", conversations))
    other = sample(load_dataset(RETAIN_OF[forget], data_dir), limit, seed).items
    kind = KIND_OF[forget]
    mmlu = sample(without_skill_subjects(load_dataset("mmlu:test", data_dir), kind), limit, seed).items
    chat = random.Random(f"{seed}:chat").sample(B.CHAT_WITH_NUMBERS, min(limit, len(B.CHAT_WITH_NUMBERS)))
    sets.append(BypassSet("other-skill", "retain", [_user(i.prompt) for i in other]))
    sets.append(BypassSet("mmlu", "retain", [_user(i.prompt) for i in mmlu]))
    sets.append(BypassSet("chat", "retain", [_user(text) for text in chat]))
    sets.append(BypassSet("instructions", "retain", instruction_conversations(forget, "no", data_dir)))
    per_language = -(-limit // len(XQUAD_LANGUAGES))   # the test split's articles: calibration reads train's
    reading = reading_passages(data_dir, per_language, "test", seed).items[:limit]
    sets.append(BypassSet("reading", "retain", [_user(item.prompt) for item in reading]))
    return sets


def instruction_conversations(forget: str, keep: str, data_dir=None) -> list[Conversation]:
    """Held-out real users' requests: keep "" = those labelled with the forget skill's kind (an attack family),
    "no" = every other one (a retain set). Never the calibration half (stats/datasets.py splits them by app)."""
    spec = f"instructions:{INSTRUCTIONS_SPLIT}-{keep}{KIND_OF[forget]}"
    return [_user(item.prompt) for item in load_dataset(spec, data_dir).items]


def all_frames() -> list[str]:
    """Every hand-written frame and item of the benchmark (the disjointness test compares these)."""
    frames = B.REWORDINGS + B.PERSONAS + B.INJECTIONS + B.DISTRACTIONS + B.TRAILERS + B.CHAT_WITH_NUMBERS
    frames += [t for table in (B.CODE_WRAPS, B.STORIES, B.MATH_LANGUAGES, B.CODE_LANGUAGES) for ts in table.values()
               for t in ts]
    frames += [turn for pair in B.CHAT_OPENERS for turn in pair] + B.PROGRAM_FRAMES
    return frames


def attack_requests(forget: str, data_dir=None, limit: int = 25, seed: int = 0) -> list[Conversation]:
    """The adaptive attackers' targets (evals/attack.py): `limit` held-out test requests of `forget` (the same seeded
    sample as the benchmark's items), bare as the re-worded families ask them: a GSM8K question, an MBPP task's
    sentence without its asserts (the attackers resample them hundreds of times; the asserts would triple the cost)."""
    if forget not in FORGET_SKILLS:
        raise UnskillError(f"attack:{forget}: unknown forget skill (use one of {', '.join(FORGET_SKILLS)})")
    return [_user(_question(item, forget)) for item in sample(load_dataset(f"{forget}:test", data_dir), limit, seed).items]
