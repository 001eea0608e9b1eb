"""Dataset SPEC parsing: built-in probe sets, benchmark splits from the data dir, user files, and errors."""

from __future__ import annotations

import ast
import json
import operator
import os
import re
from pathlib import Path

import pytest

from unskill.runtime.errors import UnskillError
from unskill.stats import builtin_probes
from unskill.stats.datasets import ARITHMETIC_WORDINGS, BENCHMARKS, BUILTINS, Dataset, Item, load_dataset, resolve_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The real benchmark files: $UNSKILL_DATA_DIR, else the shared checkout beside the repo."""
    path = Path(os.environ.get("UNSKILL_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (path / "gsm8k").is_dir():
        pytest.skip(f"no benchmark data at {path}")
    return path


def _raises(match_parts: list[str], *args, **kwargs) -> str:
    with pytest.raises(UnskillError) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in match_parts:
        assert part in message, (part, message)
    return message


# --------------------------------------------------------------------------- builtin probes

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_EQUATION = re.compile(r"([\d .+\-*/()]+)=\s*\$?(\d+(?:\.\d+)?)")


def _arith(node: ast.AST) -> float:
    """Evaluate + - * / over number literals only, so a worked step can be checked without eval()."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")


@pytest.mark.parametrize("kind, make", [("math", builtin_probes.math_items), ("code", builtin_probes.code_items),
                                        ("general", builtin_probes.general_items)])
def test_builtin_sets_are_sized_distinct_and_deterministic(kind, make):
    items = make()
    assert len(items) == 300
    assert len({item.prompt for item in items}) == 300
    assert make() == items
    assert make(40) == items[:40]
    assert all(isinstance(item, Item) and item.prompt.strip() for item in items)
    for spec in (f"builtin:{kind}", kind):
        ds = load_dataset(spec)
        assert isinstance(ds, Dataset) and ds.name == f"builtin:{kind}"
        assert ds.items == items and ds.prompts == [item.prompt for item in items]
    assert load_dataset(f"builtin:{kind}", limit=25).items == items[:25]
    assert len(load_dataset(f"builtin:{kind}", limit=450)) == 450


def test_builtin_template_variety():
    assert len(builtin_probes._MATH_TEMPLATES) >= 15
    assert len(builtin_probes._CODE_TASKS) >= 15
    assert len(builtin_probes._GENERAL_TEMPLATES) >= 15
    assert len({item.prompt.split("\n")[0] for item in builtin_probes.code_items()}) >= 30


def test_math_answers_are_correct():
    for item in builtin_probes.math_items():
        *steps, last = item.completion.split("\n")
        answer = re.fullmatch(r"#### (\d+)", last)
        assert answer, item.completion
        equations = _EQUATION.findall("\n".join(steps))
        assert equations, item.completion
        for lhs, rhs in equations:
            assert re.search(r"[+\-*/]", lhs), (lhs, item.completion)
            assert _arith(ast.parse(lhs.strip(), mode="eval")) == float(rhs), (lhs, rhs, item.completion)
        assert int(answer.group(1)) == float(equations[-1][1]) > 0


def test_code_completions_compile_and_match_their_tests():
    for item in builtin_probes.code_items():
        text, header, *tests = item.prompt.split("\n")
        assert text.startswith("Write a") and header == "Your code should pass these tests:" and len(tests) == 3
        tree = ast.parse(item.completion)
        compile(item.completion, "<builtin:code>", "exec")
        name = tree.body[0].name
        for test in tests:
            compile(test, "<builtin:code test>", "exec")
            assert test.startswith(f"assert {name}(")


def test_general_prompts_are_not_math_or_code():
    for item in builtin_probes.general_items():
        assert "####" not in item.prompt and "def " not in item.prompt and "python" not in item.prompt.lower()
        assert "####" not in item.completion


def test_builtin_errors(monkeypatch):
    _raises(["builtin:poetry", "unknown builtin", "math"], "builtin:poetry")
    monkeypatch.setattr(builtin_probes, "_GENERAL_TEMPLATES", [("Hi {0}", "", [("a",), ("b",)])])
    with pytest.raises(UnskillError, match="builtin:general: cannot make 3 distinct prompts"):
        builtin_probes.general_items(3)


def test_public_constants():
    assert BUILTINS == ("math", "code", "general")
    assert {"gsm8k", "mbpp", "mmlu", "xquad-en", "xquad-zh"} <= set(BENCHMARKS)


# --------------------------------------------------------------------------- real benchmarks

@pytest.mark.parametrize("spec, name, size", [
    ("gsm8k", "gsm8k:train", 6973), ("gsm8k:validation", "gsm8k:validation", 500),
    ("gsm8k:test", "gsm8k:test", 1319), ("mbpp", "mbpp:train", 374), ("mbpp:test", "mbpp:test", 500),
    ("mbpp:validation", "mbpp:validation", 90), ("mbpp:prompt", "mbpp:prompt", 10), ("mmlu", "mmlu:dev", 285),
    ("mmlu:train", "mmlu:dev", 285), ("mmlu:test", "mmlu:test", 14042), ("xquad-en", "xquad-en:train", 632),
    ("xquad-en:test", "xquad-en:test", 558), ("xquad-zh:test", "xquad-zh:test", 558),
])
def test_benchmark_split_sizes(data_dir, spec, name, size):
    ds = load_dataset(spec, data_dir=str(data_dir))
    assert (ds.name, len(ds)) == (name, size)


def test_gsm8k_validation_is_carved_from_train(data_dir):
    train = load_dataset("gsm8k:train", data_dir=data_dir).items
    val = load_dataset("gsm8k:validation", data_dir=data_dir).items
    with open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert train + val == [Item(r["question"], r["answer"]) for r in rows]
    assert re.search(r"#### -?[\d,.]+$", val[-1].completion)
    assert load_dataset("gsm8k:test", data_dir=data_dir, limit=5).items == \
        load_dataset("gsm8k:test", data_dir=data_dir).items[:5]


def test_gsm8k_arithmetic_asks_each_solutions_first_calculation(data_dir):
    """gsm8k:SPLIT-arithmetic: the bare calculation of each solution, its result as the completion."""
    asked = load_dataset("gsm8k:test-arithmetic", data_dir=data_dir)
    assert (asked.name, len(asked)) == ("gsm8k:test-arithmetic", 930)
    assert asked.items[0] == Item("What is 16 - 3 - 4?", "9")   # Janet's ducks: <<16-3-4=9>>
    assert len(set(asked.prompts)) == len(asked)
    right = 0
    for item in asked.items:
        before, after = next(w.split("{e}") for w in ARITHMETIC_WORDINGS
                             if item.prompt.startswith(w.split("{e}")[0]) and item.prompt.endswith(w.split("{e}")[1]))
        expression = item.prompt[len(before):len(item.prompt) - len(after)]
        try:
            right += abs(_arith(ast.parse(expression, mode="eval")) - float(item.completion)) < 1e-6
        except (ValueError, SyntaxError):
            pass   # a few annotations hold percent signs or a rounded result
    assert right >= 0.9 * len(asked), right


def test_mbpp_prompt_format(data_dir):
    first = load_dataset("mbpp:test", data_dir=data_dir).items[0]
    assert first.prompt == ("Write a python function to remove first and last occurrence of a given character from "
                            "the string.\nYour code should pass these tests:\n"
                            'assert remove_Occ("hello","l") == "heo"\n'
                            'assert remove_Occ("abcda","a") == "bcd"\n'
                            'assert remove_Occ("PHP","P") == "H"')
    assert first.completion.startswith("def remove_Occ(s,ch):")
    assert all("\r" not in item.completion for item in load_dataset("mbpp", data_dir=data_dir).items)


def test_mmlu_prompt_format(data_dir):
    first = load_dataset("mmlu:dev", data_dir=data_dir).items[0]
    assert first == Item("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:",
                         " B", group="abstract_algebra")
    assert {item.completion for item in load_dataset("mmlu:test", data_dir=data_dir).items} == {" A", " B", " C", " D"}


def _contexts(items: list[Item]) -> set[str]:
    return {item.prompt.split("\n\nQuestion: ")[0] for item in items}


def test_xquad_splits_by_article(data_dir):
    for lang in ("en", "de", "ar", "hi", "vi", "es", "zh"):
        train = load_dataset(f"xquad-{lang}", data_dir=data_dir).items
        test = load_dataset(f"xquad-{lang}:test", data_dir=data_dir).items
        assert len(train) + len(test) == 1190
        assert not _contexts(train) & _contexts(test)
        assert all(item.prompt.endswith("\nAnswer:") and item.completion.startswith(" ") for item in train)
    assert load_dataset("xquad-en", data_dir=data_dir).items[0].completion == " 308"


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("UNSKILL_DATA_DIR", str(data_dir))
    assert resolve_data_dir(None) == data_dir
    assert len(load_dataset("mbpp:prompt")) == 10


# --------------------------------------------------------------------------- benchmark errors (no real data needed)

def test_data_dir_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("UNSKILL_DATA_DIR", raising=False)
    with pytest.raises(UnskillError, match="UNSKILL_DATA_DIR"):
        resolve_data_dir(None)
    _raises(["gsm8k:test", "UNSKILL_DATA_DIR"], "gsm8k:test")
    _raises(["nowhere", "not a directory"], "gsm8k", data_dir=str(tmp_path / "nowhere"))
    monkeypatch.setenv("UNSKILL_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path


def test_unknown_benchmark_split_and_missing_files(tmp_path):
    _raises(["gsm8k:dev", "unknown split 'dev'", "validation"], "gsm8k:dev", data_dir=tmp_path)
    _raises(["xquad-en:validation", "unknown split"], "xquad-en:validation", data_dir=tmp_path)
    _raises(["xquad-fr", "unknown xquad language", "de"], "xquad-fr:test", data_dir=tmp_path)
    _raises([str(tmp_path / "gsm8k" / "train.jsonl"), "no such file"], "gsm8k", data_dir=tmp_path)
    _raises([str(tmp_path / "mbpp" / "mbpp.jsonl"), "no such file"], "mbpp:test", data_dir=tmp_path)
    _raises([str(tmp_path / "mmlu" / "test"), "no such directory"], "mmlu:test", data_dir=tmp_path)
    _raises([str(tmp_path / "xquad" / "xquad.de.json"), "no such file"], "xquad-de", data_dir=tmp_path)


def test_small_fake_benchmarks(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(503)]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert load_dataset("gsm8k", data_dir=tmp_path).prompts == ["q0", "q1", "q2"]
    assert load_dataset("gsm8k:validation", data_dir=tmp_path).prompts[0] == "q3"
    rows = [{"question": "q", "answer": a} for a in ("x <<7=7>> y <<2+3=5>> z <<4*4=16>>", "<<2 + 3=5>>", "#### 1",
                                                    "<<10/4=2.5>>")]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert load_dataset("gsm8k:test-arithmetic", data_dir=tmp_path).items == [
        Item(ARITHMETIC_WORDINGS[0].format(e="2 + 3"), "5"), Item(ARITHMETIC_WORDINGS[1].format(e="10 / 4"), "2.5")]

    (tmp_path / "mbpp").mkdir()
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps({"task_id": 11, "text": "t", "code": "c"}) + "\n")
    _raises(["mbpp.jsonl", "line 1", "test_list"], "mbpp:test", data_dir=tmp_path)

    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("q,a,b,c,d,B\nq2,a,b,c,E\n")
    _raises(["x_dev.csv", "line 2", "6 columns"], "mmlu", data_dir=tmp_path)
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("q,a,b,c,d,Z\n")
    _raises(["x_dev.csv", "line 1", "'Z'"], "mmlu", data_dir=tmp_path)

    (tmp_path / "xquad").mkdir()
    (tmp_path / "xquad" / "xquad.vi.json").write_text(json.dumps({"data": [{"title": "no paragraphs"}] * 2}))
    _raises(["xquad.vi.json", "SQuAD"], "xquad-vi:test", data_dir=tmp_path)
    (tmp_path / "xquad" / "xquad.hi.json").write_text('{"data": [\n}')
    _raises(["xquad.hi.json", "bad JSON at line 2"], "xquad-hi", data_dir=tmp_path)


# --------------------------------------------------------------------------- user files

def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jsonl_fields(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "answer": 42}, {"prompt": "  "}, {"prompt": "p3"}]
    path = _write(tmp_path, "a.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n")
    ds = load_dataset(path)
    assert ds.name == f"file:{path}"
    assert ds.items == [Item("p1", "c1"), Item("p2", "42"), Item("p3", "")]
    assert load_dataset(path, limit=2).items == ds.items[:2]
    path = _write(tmp_path, "q.jsonl", json.dumps({"question": "q", "text": "t", "answer": "a"}) + "\n")
    assert load_dataset(path).items == [Item("q", "a")]
    assert load_dataset(f"{path}:text").items == [Item("t", "a")]
    path = _write(tmp_path, "t.jsonl", json.dumps({"text": "only text", "id": 3}) + "\n")
    assert load_dataset(path).prompts == ["only text"]


def test_json_shapes(tmp_path):
    assert load_dataset(_write(tmp_path, "s.json", '["a", "b"]')).prompts == ["a", "b"]
    objs = _write(tmp_path, "o.json", json.dumps([{"question": "x", "completion": "y"}, "z"]))
    assert load_dataset(objs).items == [Item("x", "y"), Item("z")]
    assert load_dataset(_write(tmp_path, "d.json", json.dumps({"data": [{"prompt": "p"}]}))).prompts == ["p"]
    items = _write(tmp_path, "i.json", json.dumps({"meta": 1, "items": [{"q": "p", "answer": "a"}]}))
    assert load_dataset(f"{items}:q").items == [Item("p", "a")]


def test_csv_and_text(tmp_path):
    path = _write(tmp_path, "c.csv", 'prompt,answer,other\n"hi, there",yes,1\n,,\nsecond,,2\n')
    assert load_dataset(path).items == [Item("hi, there", "yes"), Item("second", "")]
    assert load_dataset(f"{path}:other").items == [Item("1", "yes"), Item("2", "")]
    path = _write(tmp_path, "c2.csv", "question,completion\nq?,c\n")
    assert load_dataset(path).items == [Item("q?", "c")]
    path = _write(tmp_path, "p.txt", "first prompt\n\n  second prompt  \r\n")
    assert load_dataset(path).prompts == ["first prompt", "second prompt"]
    assert load_dataset(_write(tmp_path, "notes.md", "# one\ntwo\n")).prompts == ["# one", "two"]


def test_path_with_colon_is_read_whole(tmp_path):
    path = _write(tmp_path, "odd:name.txt", "x\n")
    assert load_dataset(path).prompts == ["x"]
    jsonl = _write(tmp_path, "odd:name.jsonl", json.dumps({"q": "y"}) + "\n")
    assert load_dataset(f"{jsonl}:q").prompts == ["y"]


def test_file_errors(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    _raises([missing, "no such file"], missing)
    _raises([missing, "no such file"], f"{missing}:question")
    _raises(["nosuchthing", "no such file", "gsm8k", "math"], "nosuchthing")

    bad = _write(tmp_path, "bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n')
    _raises(["bad.jsonl", "bad JSON at line 2"], bad)
    bad_json = _write(tmp_path, "bad.json", '[\n{"prompt": "x"},\n]')
    _raises(["bad.json", "bad JSON at line 3"], bad_json)

    fields = _write(tmp_path, "fields.jsonl", json.dumps({"prompt": "a", "label": 1}) + "\n")
    _raises(["fields.jsonl", "line 1", "'question'", "prompt, label"], f"{fields}:question")
    nodefault = _write(tmp_path, "nodefault.jsonl", json.dumps({"input": "a", "label": 1}) + "\n")
    _raises(["nodefault.jsonl", "input, label"], nodefault)
    later = _write(tmp_path, "later.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')
    _raises(["later.jsonl", "line 2", "'prompt'", "text"], later)
    csv_path = _write(tmp_path, "cols.csv", "input,label\na,1\n")
    _raises(["cols.csv", "input, label"], csv_path)
    _raises(["cols.csv", "'nope'", "input, label"], f"{csv_path}:nope")

    for name, text in [("empty.txt", "\n \n"), ("blank.jsonl", '{"prompt": " "}\n'), ("header.csv", "prompt\n"),
                       ("empty.json", "[]"), ("nothing.csv", "")]:
        _raises([name, "no prompts"], _write(tmp_path, name, text))

    _raises(["num.jsonl", "line 1", "'prompt'", "not a string"],
            _write(tmp_path, "num.jsonl", '{"prompt": 5}\n'))
    _raises(["listans.json", "item 0", "'answer'", "not a string"],
            _write(tmp_path, "listans.json", '[{"prompt": "p", "answer": ["a"]}]'))
    _raises(["row.jsonl", "line 1", "a list"], _write(tmp_path, "row.jsonl", '["a", "b"]\n'))
    _raises(["numbers.json", "item 0", "a number"], _write(tmp_path, "numbers.json", "[1, 2]"))
    _raises(["obj.json", "'data'", "keys: rows"], _write(tmp_path, "obj.json", '{"rows": []}'))
    _raises(["scalar.json", "expected a list"], _write(tmp_path, "scalar.json", '"x"'))
    strings = _write(tmp_path, "strs.json", '["a"]')
    _raises(["strs.json", "item 0", "FIELD 'q'"], f"{strings}:q")
    lines = _write(tmp_path, "lines.txt", "a")
    _raises(["lines.txt", "FIELD 'prompt'"], f"{lines}:prompt")
    _raises(["empty_field.jsonl", "empty FIELD"], f"{tmp_path / 'empty_field.jsonl'}:")

    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"caf\xe9\n")
    _raises(["latin1.txt", "not UTF-8"], str(binary))
    (tmp_path / "folder.jsonl").mkdir()
    _raises(["folder.jsonl", "directory"], str(tmp_path / "folder.jsonl"))


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(tmp_path, limit):
    path = _write(tmp_path, "ok.txt", "a\n")
    _raises(["ok.txt", "limit"], path, limit=limit)
    _raises(["builtin:math", "limit"], "builtin:math", limit=limit)


def test_slices_joins_and_seeded_samples(data_dir):
    from unskill.stats.datasets import sample

    train = load_dataset("xquad-en:train", data_dir)
    sliced = load_dataset("xquad-en:train[100:103]", data_dir)
    assert sliced.items == train.items[100:103] and sliced.name == "xquad-en:train[100:103]"
    joined = load_dataset("xquad-en:train[0:2]+xquad-de:train[:1]", data_dir)
    assert joined.items == train.items[:2] + load_dataset("xquad-de:train", data_dir, limit=1).items
    assert len(load_dataset("xquad-en:train+xquad-de:train", data_dir, limit=2)) == 4
    mmlu = load_dataset("mmlu:test", data_dir)
    picked = sample(mmlu, 20, seed=0)
    assert picked.items == sample(mmlu, 20, seed=0).items != sample(mmlu, 20, seed=1).items
    assert set(sample(mmlu, 10, seed=0).items) < set(picked.items)   # a smaller run reuses a bigger one's cache
    assert len({item.group for item in picked.items}) > 5   # not one subject, as the first 20 would be
    mbpp = load_dataset("mbpp:test", data_dir, limit=1).items[0]
    assert len(mbpp.tests) == 3 and "\r" not in mbpp.completion
    _raises(["nope", "no such file"], "nope[1:2]", data_dir)


def test_instructions_split_by_app_and_labelled(data_dir):
    """Calibration and held-out parts share no app, together give all 252 requests, and a request's label is what
    it asks for, not its app's: Wolfram alpha's equation is math but its request for poems is not, a Google Sheets
    formula is code, naming Excel functions is neither."""
    import json

    from unskill.stats.datasets import instruction_app_label, instruction_label

    records = [json.loads(line) for line in (data_dir / "instructions" / "user_oriented_instructions.jsonl").open()]
    app_of = {}
    for rec in records:
        given = rec["instances"][0]["input"].strip()
        app_of[rec["instruction"].strip() + (f"\n\n{given}" if given else "")] = rec["motivation_app"]
    calibration, heldout = load_dataset("instructions:calibration", data_dir), load_dataset("instructions:heldout", data_dir)
    assert len(calibration) + len(heldout) == len(load_dataset("instructions", data_dir)) == 252
    assert not {app_of[i.prompt] for i in calibration.items} & {app_of[i.prompt] for i in heldout.items}
    assert min(len(calibration), len(heldout)) >= 90
    for part in (calibration, heldout):
        assert {i.group for i in part.items} == {"math", "code", "other"}   # each label on both sides
    assert (instruction_app_label("Leetcode"), instruction_app_label("Wolfram alpha"),
            instruction_app_label("Grammarly")) == ("code", "math", "other")
    def label_of(head):
        return next(instruction_label(rec["id"]) for rec in records if rec["instruction"].startswith(head))

    assert label_of("Solve this equation.") == "math"
    assert label_of("I bought two shirts from the store") == "other"   # app: MS Excel; a table, nothing to compute
    assert label_of("Look for poems that mention the given object or") == "other"      # app: (Wolfram alpha)?
    assert label_of("Translate the natural language description int") == "code"        # app: Google Sheets
    assert label_of("Please write the Excel function name associat") == "other"       # app: MS Excel
    assert label_of("You are given a sentence in first-order logic.") == "other"      # app: StackOverflow
    assert instruction_label("user_oriented_task_9999") == instruction_label("no id") == "other"
    no_code = load_dataset("instructions:heldout-nocode", data_dir)
    assert len(no_code) == len(heldout) - len(load_dataset("instructions:heldout-code", data_dir))
    assert all(i.group != "code" for i in no_code.items)
    with pytest.raises(UnskillError, match="unknown split 'train' for instructions"):
        load_dataset("instructions:train", data_dir)
