"""Turn a dataset SPEC string into prompts (plus reference completions where known).

The statistics need two kinds of text: prompts (KSD probes the last prompt token) and
prompt+completion (Neuron Adjust / Selective Pruning look at activations over the whole
answer). Every source -- built-in templates, a benchmark in the data dir, or a user file --
ends up as the same `Dataset` of `Item`s, in a fixed order, so runs are reproducible.

SPEC forms:
  builtin:math | builtin:code | builtin:general  (or bare math, code, general)
  BENCH[:SPLIT]  for BENCH in BENCHMARKS, read from the data dir (default split: train; dev for mmlu)
  PATH[:FIELD]   a .jsonl, .json, .csv or plain-text file
  SPEC[A:B]      items A..B-1 of SPEC (Python slice bounds), e.g. xquad-en:train[100:150]
  SPEC+SPEC+...  the items of each in turn (`limit` applies to each part), e.g. xquad-es:train+xquad-de:train

Benchmark splits:
  gsm8k    train, validation, test. validation is the LAST 500 items of train.jsonl and `train`
           excludes them, so a model tuned on `train` can be checked on `validation` without
           touching the official test set. SPLIT-arithmetic (e.g. `gsm8k:test-arithmetic`): the arithmetic
           inside the split's solutions, asked bare ("What is 16 - 3 - 4?"): the first calculator
           annotation (`<<16-3-4=9>>`) with an operator of each solution, duplicates dropped, in
           ARITHMETIC_WORDINGS by turn; completion = the annotation's result.
  mbpp     prompt (task_id 1-10), test (11-510), validation (511-600), train (601-974), the HF
           convention. The source file's code uses CRLF (and a few bare CR) line ends; they are
           normalised to LF so tokenizers do not see stray '\\r' tokens.
  mmlu     dev (alias train), test; all subjects, in sorted file-name order.
  xquad-LL train (first half of the articles), test (second half); splitting by article keeps
           the same context paragraph from landing in both splits.
  instructions  calibration, heldout, all: the 252 user-oriented instructions (Self-Instruct), prompt =
           instruction + the first instance's input. Split BY APP (within each app label, apps in sha256 order
           go alternately to heldout and calibration), so near-identical requests of one app never sit on both
           sides. Each item's `group` is what the request asks for (INSTRUCTION_SKILL_IDS): "math", "code" or
           "other"; an app does not settle it (Wolfram alpha's list holds a request for poems, StackOverflow's
           one for reading first-order logic, Google Sheets' one for a formula). A suffix keeps one label or
           drops one: `instructions:heldout-nocode` (everything a coding guard must answer),
           `instructions:calibration-nomath`, `instructions:all-code`.

Files (the text after the last ':' is FIELD only when the whole SPEC is not an existing file):
  .jsonl   one JSON object (or string) per line; FIELD defaults to the first of prompt/question/text
           present in the first object, and every later object must have it.
  .json    a list of objects or strings, or an object holding that list under "data" or "items".
  .csv     a header row; FIELD names the column (same defaults as JSON).
  other    plain text, one prompt per non-empty line; no FIELD.
  A "completion" (else "answer") field/column, when present, becomes the completion. Blank prompts
  are skipped rather than fed to the statistics as empty strings.

Built-in sets have BUILTIN_SIZE items; a larger `limit` generates more (same prefix).
A builtin or benchmark name wins over a same-named file; write ./gsm8k to read such a file.
Every failure is an `UnskillError` whose one-line message starts with the file (or spec) at fault.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from unskill.runtime.errors import UnskillError

from .items import Dataset, Item

__all__ = ["Item", "Dataset", "load_dataset", "sample", "reading_passages", "resolve_data_dir", "BENCHMARKS",
           "BUILTINS"]

BUILTINS = ("math", "code", "general")
XQUAD_LANGUAGES = ("en", "es", "de", "ar", "hi", "vi", "zh")
BENCHMARKS = ("gsm8k", "mbpp", "mmlu", "instructions") + tuple(f"xquad-{lang}" for lang in XQUAD_LANGUAGES)

BUILTIN_SIZE = 300
GSM8K_VALIDATION_SIZE = 500
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
_GSM8K_SPLITS = ("train", "validation", "test")
_SPLITS = {"gsm8k": _GSM8K_SPLITS + tuple(f"{split}-arithmetic" for split in _GSM8K_SPLITS),
           "mbpp": tuple(MBPP_SPLITS), "mmlu": ("dev", "test"),
           "xquad": ("train", "test"),
           "instructions": tuple(f"{split}{suffix}" for split in ("calibration", "heldout", "all")
                                 for suffix in ("", "-math", "-code", "-other", "-nomath", "-nocode"))}
# The apps of the forget skills (SOURCES.md). They only place the split (calibration | held out, by app within
# each app label): the two halves are what they were when the labels were the apps'.
INSTRUCTION_SKILL_APPS = {
    "code": ("Leetcode", "GeeksforGeeks", "StackOverflow", "w3schools", "Github"),
    "math": ("Wolfram alpha", "(Wolfram alpha)?", "Sudoku", "MS Excel"),
}
# The label of a request is what it asks for, read request by request (ids of user_oriented_instructions.jsonl,
# "user_oriented_task_N"); every request not listed here is "other" and must be answered by either guard.
# math: compute an amount, solve an equation, prove or check a statement about numbers, find a sequence's formula.
#   (Not: a table of prices with nothing to compute, Sudoku, scheduling, salary estimates, aphorisms and poems,
#   though the apps of the math list hold some of them.)
# code: write, fix, translate, explain or predict program code in a programming, query or shell language (Python,
#   Java, R, SQL, bash, git commands, regular expressions, spreadsheet formulas, a CI workflow), set a programming
#   problem, or hand such code over to be read. (Not: markup and typesetting such as HTML, Markdown, LaTeX, CSS
#   colours and ABC notation; naming spreadsheet functions; searching for posts; interview topics or advice;
#   first-order logic.)
INSTRUCTION_SKILL_IDS = {
    "math": (15, 114, 140, 141, 142, 143, 144, 149),
    "code": (12, 13, 14, 23, 27, 77, 78, 89, 90, 92, 93, 96, 190, 195, 205, 210, 227, 231, 243),
}
_SPLIT_ALIASES = {"mmlu": {"train": "dev"}}

_PROMPT_FIELDS = ("prompt", "question", "text")
_COMPLETION_FIELDS = ("completion", "answer")
_JSON_LIST_KEYS = ("data", "items")
_MMLU_CHOICES = "ABCD"
_SLICE = re.compile(r"(?P<base>.+)\[(?P<lo>-?\d*):(?P<hi>-?\d*)\]")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The benchmark root: the explicit argument, else $UNSKILL_DATA_DIR; no silent default location."""
    raw = data_dir if data_dir not in (None, "") else os.environ.get("UNSKILL_DATA_DIR") or None
    if raw is None:
        raise UnskillError("no data dir: pass --data-dir or set UNSKILL_DATA_DIR")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise UnskillError(f"{path}: data dir is not a directory")
    return path


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> Dataset:
    """Read SPEC (see the module docstring); `limit` keeps the first N items after splitting."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UnskillError(f"{spec}: limit must be an integer >= 1 (got {limit!r})")
    if not Path(spec).exists():
        if "+" in spec:
            parts = [load_dataset(part, data_dir, limit) for part in spec.split("+")]
            return Dataset("+".join(p.name for p in parts), [item for p in parts for item in p.items])
        sliced = _SLICE.fullmatch(spec)
        if sliced:
            base = load_dataset(sliced["base"], data_dir)
            lo, hi = (int(x) if x else None for x in (sliced["lo"], sliced["hi"]))
            return _finish(f"{base.name}[{sliced['lo']}:{sliced['hi']}]", spec, base.items[lo:hi], limit)
    head, _, rest = spec.partition(":")
    if head == "builtin" or spec in BUILTINS:
        return _load_builtin(spec, rest if head == "builtin" else spec, limit)
    if head in BENCHMARKS or (head.startswith("xquad-") and not Path(spec).exists()):
        return _load_benchmark(spec, head, rest, data_dir, limit)
    return _load_file(spec, limit)


def sample(dataset: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of `size` items, kept in dataset order (MMLU's first N would be one subject).
    A grouped dataset (XQuAD) gives whole groups in random order, the last one cut to reach `size`: the
    questions of one paragraph then share one prefill of its context in the harness."""
    if size is None or size >= len(dataset.items):
        return dataset
    rng = np.random.default_rng(seed)
    if not dataset.grouped:
        chosen = np.sort(rng.permutation(len(dataset.items))[:size])
    else:
        members: dict[str, list[int]] = {}
        for index, item in enumerate(dataset.items):
            members.setdefault(item.group, []).append(index)
        groups = list(members.values())
        picked = [index for g in rng.permutation(len(groups)) for index in groups[g]][:size]
        chosen = np.sort(picked)
    return Dataset(dataset.name, [dataset.items[i] for i in chosen], dataset.grouped)


def _finish(name: str, where: Any, items: list[Item], limit: int | None) -> Dataset:
    if not items:
        raise UnskillError(f"{where}: no prompts")
    return Dataset(name, items[:limit] if limit else items)


# --------------------------------------------------------------------------- builtin

def _load_builtin(spec: str, kind: str, limit: int | None) -> Dataset:
    from unskill.stats import builtin_probes

    if kind not in BUILTINS:
        raise UnskillError(f"{spec}: unknown builtin {kind!r} (builtins: {', '.join(BUILTINS)})")
    make = {"math": builtin_probes.math_items, "code": builtin_probes.code_items,
            "general": builtin_probes.general_items}[kind]
    return _finish(f"builtin:{kind}", spec, make(limit or BUILTIN_SIZE), limit)


# --------------------------------------------------------------------------- benchmarks

def _load_benchmark(spec: str, bench: str, split: str, data_dir, limit: int | None) -> Dataset:
    if bench not in BENCHMARKS:
        lang = bench.removeprefix("xquad-")
        raise UnskillError(f"{spec}: unknown xquad language {lang!r} (languages: {', '.join(XQUAD_LANGUAGES)})")
    family = "xquad" if bench.startswith("xquad-") else bench
    split = split or {"mmlu": "dev", "instructions": "all"}.get(family, "train")
    split = _SPLIT_ALIASES.get(family, {}).get(split, split)
    if split not in _SPLITS[family]:
        raise UnskillError(f"{spec}: unknown split {split!r} for {bench} (splits: {', '.join(_SPLITS[family])})")
    try:
        root = resolve_data_dir(data_dir)
    except UnskillError as exc:
        raise UnskillError(f"{spec}: {exc}") from None
    if family == "xquad":
        where, items = _xquad(root, bench.removeprefix("xquad-"), split)
    else:
        where, items = {"gsm8k": _gsm8k, "mbpp": _mbpp, "mmlu": _mmlu, "instructions": _instructions}[family](root, split)
    dataset = _finish(f"{bench}:{split}", where, items, limit)
    dataset.grouped = family == "xquad"
    return dataset


# How a bare calculation is asked (gsm8k:SPLIT-arithmetic): a user who wants the sum, not the story around it.
ARITHMETIC_WORDINGS = ("What is {e}?", "Compute {e}.", "Calculate {e}", "{e} = ?", "Quick question: what's {e}?")
_ANNOTATION = re.compile(r"<<([^<>=]*[-+*/][^<>=]*)=([^<>]*)>>")


def _gsm8k(root: Path, split: str) -> tuple[Path, list[Item]]:
    if split.endswith("-arithmetic"):
        path, items = _gsm8k(root, split.removesuffix("-arithmetic"))
        return path, _bare_arithmetic(items)
    path = root / "gsm8k" / ("test.jsonl" if split == "test" else "train.jsonl")
    items = [Item(_field(path, loc, rec, "question"), _field(path, loc, rec, "answer"))
             for loc, rec in _objects(path, _jsonl_records(path))]
    if split == "validation":
        items = items[-GSM8K_VALIDATION_SIZE:]
    elif split == "train":
        items = items[:-GSM8K_VALIDATION_SIZE]
    return path, items


def first_calculation(solution: str | None) -> tuple[str, str] | None:
    """(expression, result) of a GSM8K solution's first calculator annotation with an operator (`<<16-3-4=9>>`
    -> ("16 - 3 - 4", "9")), the expression spaced as people type it; None when it shows none. The benchmark's
    bare calculations (SPLIT-arithmetic) and the guard fit's (stats/augment.py "bare") both come from here."""
    found = _ANNOTATION.search(solution or "")
    if not found:
        return None
    return re.sub(r"\s*([-+*/])\s*", r" \1 ", found[1]).strip(), found[2].strip()


def _bare_arithmetic(items: list[Item]) -> list[Item]:
    """Each solution's first calculation, asked in a wording (duplicates dropped)."""
    asked, seen = [], set()
    for item in items:
        found = first_calculation(item.completion)
        if not found or found[0] in seen:
            continue
        expression, result = found
        seen.add(expression)
        wording = ARITHMETIC_WORDINGS[len(asked) % len(ARITHMETIC_WORDINGS)]
        asked.append(Item(wording.format(e=expression), result))
    return asked


def _mbpp(root: Path, split: str) -> tuple[Path, list[Item]]:
    path = root / "mbpp" / "mbpp.jsonl"
    lo, hi = MBPP_SPLITS[split]
    items = []
    for loc, rec in _objects(path, _jsonl_records(path)):
        task_id = rec.get("task_id")
        if not isinstance(task_id, int):
            raise UnskillError(f"{path}: {loc}: 'task_id' is missing or not an integer")
        if not lo <= task_id <= hi:
            continue
        tests = rec.get("test_list")
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise UnskillError(f"{path}: {loc}: 'test_list' is missing or not a list of strings")
        prompt = _field(path, loc, rec, "text") + "\nYour code should pass these tests:\n" + "\n".join(tests)
        setup = rec.get("test_setup_code") or ""
        items.append(Item(prompt, _lf(_field(path, loc, rec, "code")), tests=tuple(tests), setup=_lf(setup)))
    return path, items


def instruction_app_label(app: str) -> str:
    """The skill an app's list stands for: it places the split, not the label (instruction_label)."""
    return next((skill for skill, apps in INSTRUCTION_SKILL_APPS.items() if app in apps), "other")


def instruction_label(record_id: str) -> str:
    """What the request "user_oriented_task_N" asks for: "math", "code" or "other" (INSTRUCTION_SKILL_IDS)."""
    tail = record_id.rpartition("_")[2]
    number = int(tail) if tail.isdigit() else -1
    return next((skill for skill, ids in INSTRUCTION_SKILL_IDS.items() if number in ids), "other")


def _instructions(root: Path, split: str) -> tuple[Path, list[Item]]:
    path = root / "instructions" / "user_oriented_instructions.jsonl"
    part, _, keep = split.partition("-")
    records = []
    for loc, rec in _objects(path, _jsonl_records(path)):
        instances = rec.get("instances")
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise UnskillError(f"{path}: {loc}: 'instances' is missing or not a list of objects")
        app = _field(path, loc, rec, "motivation_app")
        text = _field(path, loc, rec, "instruction").strip()
        given = str(instances[0].get("input") or "").strip()
        prompt = f"{text}\n\n{given}" if given else text
        label = instruction_label(str(rec.get("id") or ""))
        records.append((app, Item(prompt, str(instances[0].get("output") or ""), group=label)))
    held = set()
    for label in ("math", "code", "other"):
        apps = sorted({app for app, item in records if instruction_app_label(app) == label},
                      key=lambda name: hashlib.sha256(name.encode()).hexdigest())
        held.update(apps[0::2])
    items = [item for app, item in records if part == "all" or (app in held) == (part == "heldout")]
    if keep.startswith("no"):
        return path, [item for item in items if item.group != keep[2:]]
    return path, [item for item in items if not keep or item.group == keep]


def reading_passages(data_dir, per_language: int, split: str = "train", seed: int = 0) -> Dataset:
    """XQuAD passages with one of their questions, per_language in each language, from one split (train: the
    guard's retain side; test: the bypass benchmark's): long benign text in seven languages that ends in a
    question. XQuAD is one set of paragraphs translated, so each language gets other paragraphs (one seeded order
    sliced per language), and a paragraph's other questions, which would repeat its context, are left out."""
    order: list[str] | None = None
    items = []
    for index, language in enumerate(XQUAD_LANGUAGES):
        first: dict[str, Item] = {}
        for item in load_dataset(f"xquad-{language}:{split}", data_dir).items:
            first.setdefault(item.group, item)
        if order is None:
            groups = sorted(first)
            order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
        items += [first[group] for group in order[index * per_language:(index + 1) * per_language] if group in first]
    return Dataset(f"xquad:{split}", items)


def _lf(code: str) -> str:
    return code.replace("\r\n", "\n").replace("\r", "\n")


def _mmlu(root: Path, split: str) -> tuple[Path, list[Item]]:
    folder = root / "mmlu" / split
    if not folder.is_dir():
        raise UnskillError(f"{folder}: no such directory")
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise UnskillError(f"{folder}: no *_{split}.csv files")
    items = []
    for path in files:
        reader = csv.reader(io.StringIO(_read_text(path)))
        for row in _csv_rows(path, reader):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise UnskillError(f"{path}: line {reader.line_num}: expected 6 columns "
                                   f"(question, A, B, C, D, answer), got {len(row)}")
            question, *choices, answer = row
            if answer.strip() not in _MMLU_CHOICES:
                raise UnskillError(f"{path}: line {reader.line_num}: answer {answer!r} is not one of A, B, C, D")
            options = "".join(f"\n{letter}. {text}" for letter, text in zip(_MMLU_CHOICES, choices))
            subject = path.name.removesuffix(f"_{split}.csv")
            items.append(Item(f"{question}{options}\nAnswer:", " " + answer.strip(), group=subject))
    return folder, items


def _xquad(root: Path, lang: str, split: str) -> tuple[Path, list[Item]]:
    path = root / "xquad" / f"xquad.{lang}.json"
    doc = _parse_json(path)
    try:
        articles = doc["data"]
        half = len(articles) // 2
        items = []
        for a, article in enumerate(articles[:half] if split == "train" else articles[half:]):
            for p, para in enumerate(article["paragraphs"]):
                for qa in para["qas"]:
                    answer = qa["answers"][0]["text"] if qa["answers"] else ""
                    items.append(Item(f"{para['context']}\n\nQuestion: {qa['question']}\nAnswer:", " " + answer,
                                      group=f"{split}/{a}/{p}"))
    except (KeyError, TypeError, IndexError) as exc:
        raise UnskillError(f"{path}: not SQuAD-format JSON ({type(exc).__name__}: {exc})") from None
    return path, items


# --------------------------------------------------------------------------- user files

def _load_file(spec: str, limit: int | None) -> Dataset:
    path, field = Path(spec), None
    if ":" in spec and not path.exists():
        raw_path, _, field = spec.rpartition(":")
        path = Path(raw_path)
        if not field:
            raise UnskillError(f"{spec}: empty FIELD after ':'")
    if not path.exists():
        hint = ""
        if os.sep not in str(path) and "/" not in str(path) and not path.suffix:
            hint = (f" (and not a builtin: {', '.join(BUILTINS)}; nor a benchmark: {', '.join(BENCHMARKS)})")
        raise UnskillError(f"{path}: no such file{hint}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items = _items(path, _jsonl_records(path), field)
    elif suffix == ".json":
        items = _items(path, _json_records(path), field)
    elif suffix == ".csv":
        items = _csv_items(path, field)
    else:
        if field is not None:
            raise UnskillError(f"{path}: FIELD {field!r} given, but a text file holds one prompt per line "
                               "(use .jsonl, .json or .csv for named fields)")
        items = [Item(line.strip()) for line in _read_text(path).split("\n") if line.strip()]
    return _finish(f"file:{spec}", path, items, limit)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UnskillError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UnskillError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise UnskillError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UnskillError(f"{path}: cannot read ({exc.strerror})") from None


def _parse_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UnskillError(f"{path}: bad JSON at line {exc.lineno}: {exc.msg}") from None


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UnskillError(f"{path}: bad JSON at line {number}: {exc.msg}") from None
    return records


def _json_records(path: Path) -> list[tuple[str, Any]]:
    doc = _parse_json(path)
    if isinstance(doc, dict):
        key = next((k for k in _JSON_LIST_KEYS if isinstance(doc.get(k), list)), None)
        if key is None:
            raise UnskillError(f"{path}: expected a list, or an object with a list under 'data' or 'items' "
                               f"(keys: {', '.join(map(str, doc)) or 'none'})")
        doc = doc[key]
    if not isinstance(doc, list):
        raise UnskillError(f"{path}: expected a list of objects or strings, got {_kind(doc)}")
    return [(f"item {i}", rec) for i, rec in enumerate(doc)]


def _objects(path: Path, records: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, dict]]:
    for loc, rec in records:
        if not isinstance(rec, dict):
            raise UnskillError(f"{path}: {loc}: expected a JSON object, got {_kind(rec)}")
        yield loc, rec


def _items(path: Path, records: list[tuple[str, Any]], field: str | None) -> list[Item]:
    """Strings are prompts; objects give FIELD (or the first of prompt/question/text, fixed by the first object)."""
    items, chosen = [], field
    for loc, rec in records:
        if isinstance(rec, str):
            if field is not None:
                raise UnskillError(f"{path}: {loc} is a plain string, so FIELD {field!r} does not apply")
            if rec.strip():
                items.append(Item(rec))
            continue
        if not isinstance(rec, dict):
            raise UnskillError(f"{path}: {loc}: expected an object or a string, got {_kind(rec)}")
        chosen = chosen or _default_field(path, loc, rec)
        prompt = _field(path, loc, rec, chosen)
        if prompt.strip():
            items.append(Item(prompt, _completion(path, loc, rec, chosen)))
    return items


def _csv_items(path: Path, field: str | None) -> list[Item]:
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    try:
        header = [name for name in (reader.fieldnames or []) if name is not None]
    except csv.Error as exc:
        raise UnskillError(f"{path}: bad CSV at line {reader.line_num}: {exc}") from None
    if header:
        field = field or _default_field(path, "header", dict.fromkeys(header))
        if field not in header:
            raise UnskillError(f"{path}: no column {field!r} (columns: {', '.join(header)})")
    items = []
    for row in _csv_rows(path, reader):
        prompt = row.get(field) or ""
        if prompt.strip():
            items.append(Item(prompt, _completion(path, f"line {reader.line_num}", row, field)))
    return items


def _csv_rows(path: Path, reader) -> Iterable:
    try:
        yield from reader
    except csv.Error as exc:
        raise UnskillError(f"{path}: bad CSV at line {reader.line_num}: {exc}") from None


def _default_field(path: Path, loc: str, rec: dict) -> str:
    found = next((name for name in _PROMPT_FIELDS if name in rec), None)
    if found is None:
        raise UnskillError(f"{path}: {loc}: no 'prompt', 'question' or 'text' field "
                           f"(fields: {', '.join(map(str, rec)) or 'none'}); name one as {path}:FIELD")
    return found


def _field(path: Path, loc: str, rec: dict, field: str) -> str:
    if field not in rec:
        raise UnskillError(f"{path}: {loc}: no field {field!r} (fields: {', '.join(map(str, rec)) or 'none'})")
    value = rec[field]
    if not isinstance(value, str):
        raise UnskillError(f"{path}: {loc}: field {field!r} is {_kind(value)}, not a string")
    return value


def _completion(path: Path, loc: str, rec: dict, prompt_field: str) -> str:
    """Numbers are accepted as answers (e.g. {"answer": 42}); anything else non-string is a mistake."""
    name = next((n for n in _COMPLETION_FIELDS if n in rec and n != prompt_field), None)
    value = rec.get(name) if name else None
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UnskillError(f"{path}: {loc}: field {name!r} is {_kind(value)}, not a string")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
