"""The evaluation tasks: which items, the prompt the model sees, and how an answer is scored.

    SPEC           token level: top-1 accuracy and NLL of the reference completion given the prompt, for any
                   dataset SPEC with completions (gsm8k:test, mbpp:test, mmlu:test, xquad-en:test, files…)
    gen:gsm8k      8-shot chain of thought on gsm8k:test (shots: the first 8 of gsm8k:train); exact match on
                   the final number ("The answer is N", else the last number in the reply)
    gen:mbpp       mbpp:test, zero-shot with the three asserts in the prompt; pass@1 in the sandbox
    gen:mmlu       5-shot on mmlu:test (shots: the subject's dev items); the letter with the highest log-prob
    gen:xquad-LL   xquad-LL:test, zero-shot; the normalised gold answer is contained in the reply
    bypass:gsm8k   the bypass benchmark (evals/bypass.py): attacked variants of held-out items per attack
    bypass:mbpp    family and the retain sets; records each stats file's refusals (prefill at the last token)
    attack:gsm8k   adaptive attackers (evals/attack.py: Best-of-N augmentation, black-box search over frames and
    attack:mbpp    suffixes) against each stats file's default guard on --gen-limit held-out requests

With the chat template on (the default, as KSD's probes and ksd-run see prompts), the prompt is the user turn
and the scored text is the assistant's reply, so a completion's leading space is dropped.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from unskill.runtime.errors import UnskillError

from unskill.stats.datasets import Dataset, Item, load_dataset
from .sandbox import Limits, mbpp_program, run_python

GSM8K_SHOTS, MMLU_SHOTS = 8, 5
LETTERS = "ABCD"


@dataclass(frozen=True)
class TaskSpec:
    name: str                 # as given: "gsm8k:test", "gen:mbpp", …
    kind: str                 # tokens | gsm8k | mbpp | mmlu | xquad
    source: str               # dataset SPEC of the evaluated items
    metric: str
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()


def parse_task(name: str) -> TaskSpec:
    if name.startswith("bypass:"):
        from .bypass import FORGET_SKILLS
        skill = name.removeprefix("bypass:")
        if skill not in FORGET_SKILLS:
            raise UnskillError(f"{name}: unknown bypass benchmark (bypass:{', bypass:'.join(FORGET_SKILLS)})")
        return TaskSpec(name, "bypass", skill, "refused")
    if name.startswith("attack:"):
        from .bypass import FORGET_SKILLS
        skill = name.removeprefix("attack:")
        if skill not in FORGET_SKILLS:
            raise UnskillError(f"{name}: unknown attack benchmark (attack:{', attack:'.join(FORGET_SKILLS)})")
        return TaskSpec(name, "attack", skill, "attack_success")
    if not name.startswith("gen:"):
        return TaskSpec(name, "tokens", name, "top1")
    bench = name.removeprefix("gen:")
    if bench == "gsm8k":
        # The shots' chains are one paragraph: a blank line or a new question ends the answer.
        return TaskSpec(name, "gsm8k", "gsm8k:test", "exact_match", 256, ("\n\n", "Question:"))
    if bench == "mbpp":
        # Small models go on with usage examples; the code before them is what the asserts test.
        return TaskSpec(name, "mbpp", "mbpp:test", "pass@1", 384, ("\nassert", "\n# Example", "\n# Test",
                                                                  "\nif __name__", "\nprint("))
    if bench == "mmlu":
        return TaskSpec(name, "mmlu", "mmlu:test", "accuracy")
    if bench.startswith("xquad-"):
        return TaskSpec(name, "xquad", f"{bench}:test", "containment", 32, ("\n",))
    raise UnskillError(f"{name}: unknown generation task (gen:gsm8k, gen:mbpp, gen:mmlu, gen:xquad-LL)")


def few_shot_prompts(spec: TaskSpec, items: list[Item], data_dir) -> list[str]:
    """The prompt each item is asked with."""
    if spec.kind == "gsm8k":
        shots = load_dataset("gsm8k:train", data_dir, limit=GSM8K_SHOTS).items
        header = "".join(f"Question: {s.prompt}\nAnswer: {gsm8k_chain(s.completion)}\n\n" for s in shots)
        return [f"{header}Question: {item.prompt}\nAnswer:" for item in items]
    if spec.kind == "mmlu":
        dev = load_dataset("mmlu:dev", data_dir).items
        by_subject: dict[str, list[Item]] = {}
        for shot in dev:
            by_subject.setdefault(shot.group, []).append(shot)
        prompts = []
        for item in items:
            shots = by_subject.get(item.group, [])[:MMLU_SHOTS]
            subject = item.group.replace("_", " ")
            header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            prompts.append(header + "".join(f"{s.prompt}{s.completion}\n\n" for s in shots) + item.prompt)
        return prompts
    return [item.prompt for item in items]


def gsm8k_chain(answer: str) -> str:
    """A GSM8K reference answer as a chain of thought ending in 'The answer is N.'"""
    reasoning, _, final = answer.partition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip().replace("\n", " ")
    return f"{reasoning} The answer is {final.strip()}."


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def gsm8k_number(text: str) -> float | None:
    stated = re.findall(rf"answer is:?\s*({_NUMBER})", text, flags=re.IGNORECASE)
    found = stated or re.findall(_NUMBER, text)
    if not found:
        return None
    try:
        return float(found[-1 if not stated else 0].replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        return None


def score_gsm8k(reply: str, item: Item) -> bool:
    gold = gsm8k_number(item.completion.rpartition("####")[2])
    predicted = gsm8k_number(reply)
    return gold is not None and predicted is not None and abs(predicted - gold) < 1e-6


def extract_code(reply: str) -> str:
    """The first fenced code block if there is one, else the whole reply; a reply cut off by the token limit
    loses its unfinished last top-level block, so the complete functions before it still count."""
    fenced = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", reply, flags=re.DOTALL)
    code = fenced.group(1) if fenced else reply
    while True:
        try:
            compile(code, "<reply>", "exec")
            return code
        except (SyntaxError, ValueError):
            cut = max(code.rfind("\ndef "), code.rfind("\nclass "), code.rfind("\nimport "), code.rfind("\nfrom "))
            if cut <= 0:
                return code
            code = code[:cut]


def score_mbpp(reply: str, item: Item, limits: Limits) -> bool:
    if not item.tests:
        raise UnskillError("gen:mbpp: items carry no asserts (use mbpp:test from the data dir)")
    return run_python(mbpp_program(extract_code(reply), item.tests, item.setup), limits).passed


def normalise(text: str) -> str:
    """SQuAD-style: lower case, no punctuation (ASCII or Unicode), single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if c in string.punctuation or unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def score_xquad(reply: str, item: Item) -> bool:
    gold = normalise(item.completion)
    return bool(gold) and gold in normalise(reply)


def letter_ids(tokenizer, templated: bool) -> list[int]:
    """Token id of each answer letter as the model would write it next (" A" after 'Answer:' in plain text,
    "A" at the start of an assistant turn)."""
    ids = []
    for letter in LETTERS:
        pieces = tokenizer.tokenizer.encode(letter if templated else " " + letter, add_special_tokens=False).ids
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise UnskillError("gen:mmlu: the tokenizer maps two answer letters to the same first token")
    return ids


def completion_text(item: Item, templated: bool) -> str:
    return item.completion.lstrip() if templated else item.completion


def check_items(spec: TaskSpec, dataset: Dataset) -> None:
    if spec.kind in ("tokens", "gsm8k", "xquad", "mmlu") and not all(item.completion for item in dataset.items):
        raise UnskillError(f"{spec.name}: {dataset.name} has items without a reference completion")
