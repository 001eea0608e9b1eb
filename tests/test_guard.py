"""`unskill guard`: one run makes a stored rule that `ksd-run` and the server use with no other option, in chat
and raw-prompt mode alike; the prompt formats it fits on; on SmolLM2 `/v1/completions` refuses a math prompt."""

import json
import re

import numpy as np
import pytest

from unskill.runtime import GenerationParams, load
from unskill.runtime.statsfile import load_stats
from unskill.stats import augment

APPLES = [f"How many apples are left if {name} eats {i} of {i + 9} apples?"
          for i in range(2, 30) for name in ("Tom", "Ann")]
OTHER = [f"The {thing} of {place} is famous for its {quality}." for thing in ("castle", "river", "market", "bridge")
         for place in ("Paris", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth") for quality in ("age", "size")]


def test_formats_render_every_prompt_in_chat_raw_and_one_rotated_format():
    rendered = augment.formats_of("What is 2+2?", 0, augment.FORMAT_SETS["all"])
    assert rendered[:2] == [("What is 2+2?", True), ("What is 2+2?", False)] and len(rendered) == 3
    rotated = [augment.formats_of("Q?", i, augment.FORMAT_SETS["all"])[2] for i in range(5)]
    assert rotated[0] == ("Question: Q?\nAnswer:", False) and rotated[1][1] is True          # frame raw, frame chat
    assert rotated[2][0][0]["role"] == "system" and [m["role"] for m in rotated[3][0]] == ["user", "assistant", "user"]
    assert rotated[3][1] is True and rotated[4][1] is False and len(rotated[4][0]) == 3   # a conversation, chat and raw
    one = [augment.formats_of("Q?", i, augment.FORMAT_SETS["all"], one=True)[0] for i in range(12)]
    assert one[0::3] == [("Q?", True)] * 4 and one[1::3] == [("Q?", False)] * 4   # a third chat, a third raw
    assert len({json.dumps(r) for r in one[2::3]}) == 4                          # the rest: every other format


def test_unskill_guard_stores_a_rule_that_refuses_raw_and_chat_prompts(tiny_export, tmp_path, capsys):
    from unskill.cli import main as unskill
    from unskill.ksd_run import main as ksd_run

    _, onnx_dir = tiny_export("llama")
    forget, retain = tmp_path / "apples.jsonl", tmp_path / "other.jsonl"
    forget.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in APPLES))
    retain.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in OTHER))
    out = tmp_path / "guard.npz"
    code = unskill(["guard", "--model", str(onnx_dir), "--forget", str(forget), "--retain", str(retain),
                    "--no-default-retain", "--limit", "40", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    stats = load_stats(out)
    assert stats.guard is not None and stats.guard.calibration["formats"] == list(augment.FORMAT_SETS["all"])
    # the one-by-one read's window is stored with its threshold, or not at all (nothing left of the budget)
    assert (stats.guard.anywhere_positions == 0) == (stats.guard.anywhere_threshold is None)
    assert stats.meta["prompt_template"]["formats"] == list(augment.FORMAT_SETS["all"])
    assert "ksd-run --stats" in capsys.readouterr().out
    # the validation apples (the last quarter, never probed) are refused in both modes; the other sentences pass
    generator = load(onnx_dir, stats=[out], device="cpu")
    held_out = APPLES[-6:]
    for chat in (True, False):
        params = GenerationParams(max_new_tokens=2, chat=chat)
        assert all(r.abstained for r in generator.generate(held_out, params)), chat
        answered = generator.generate(OTHER[:8], params)
        assert np.mean([r.abstained for r in answered]) <= 0.25, chat
    # ksd-run --no-chat with no option uses the stored rule
    code = ksd_run(["--onnx", str(onnx_dir), "--stats", str(out), "--prompt", APPLES[-1], "--no-chat",
                    "--max-new-tokens", "2", "--output", str(tmp_path / "o.jsonl"), "--quiet", "--device", "cpu"])
    assert code == 0 and json.loads((tmp_path / "o.jsonl").read_text())["abstained"] is True


def test_guard_cli_refuses_bad_options_before_any_work(tmp_path, capsys):
    from unskill.cli import main as unskill

    (tmp_path / "ro").mkdir()
    cases = [(["--out", str(tmp_path)], "is a directory"), (["--limit", "0"], "--limit must be >= 1"),
             (["--target", "1.5"], "--target must be in [0, 1)")]
    for extra, message in cases:
        args = ["guard", "--model", str(tmp_path / "none"), "--forget", "builtin:math",
                "--out", str(tmp_path / "g.npz"), *extra]
        assert unskill(args) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], error


@pytest.mark.model
def test_smollm2_completions_endpoint_refuses_a_math_prompt(smollm2_export, tmp_path):
    """The issue's case: raw text through /v1/completions walked past a chat-fitted guard."""
    openai = pytest.importorskip("openai")
    from unskill.runtime.engine import BatchEngine
    from unskill.runtime.server import build_app, serve_in_thread
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.stats.guard import GuardConfig, make_guard

    model = OnnxLM(smollm2_export, device="cpu")
    stats, _ = make_guard(model, TextTokenizer(smollm2_export, model.manifest), "builtin:math",
                          GuardConfig(limit=40, decode_prompts=16, decode_tokens=8, progress=False))
    path = stats.save(tmp_path / "math.npz")
    engine = BatchEngine(load(smollm2_export, stats=[path], device="cpu"), max_batch=4)
    server, port = serve_in_thread(build_app(engine, "smollm2", "k"))
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
        # the issue's own prompt, a bare calculation in a completion frame and alone (the runtime checks the prompt and
        # every decoded token; room up to 32): the 40 built-in probes are word problems, and the math fit's bare
        # family (stats/augment.py) asks their calculations bare, so the guard holds the question asked alone too
        for prompt in ("Question: What is 15% of 240?\nAnswer:", "What is 15% of 240?"):
            raw = api.completions.create(model="smollm2", max_tokens=32, prompt=prompt)
            assert raw.choices[0].finish_reason == "content_filter", prompt
        chat = api.chat.completions.create(model="smollm2", max_tokens=16, messages=[
            {"role": "user", "content": "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?"}])
        assert chat.choices[0].finish_reason == "content_filter"
        code = api.chat.completions.create(model="smollm2", max_tokens=16, messages=[
            {"role": "user", "content": "Write a python function to reverse a string."}])
        assert code.choices[0].finish_reason in ("stop", "length")
    finally:
        server.should_exit = True


def test_best_of_n_noise_keeps_one_character_per_character_in_any_script():
    import random

    # "ß".upper() is "SS", "ŉ".upper() two characters: the noise must not grow the text or fail on them
    text = "Straße, ŉ, İstanbul, 東京 und Ärger: " * 8
    for seed in range(20):
        assert len(augment.best_of_n_noise(text, random.Random(seed))) == len(text)


def test_default_retain_sets_read_passages_in_every_xquad_language(data_dir):
    from unskill.evals.bypass import bypass_sets
    from unskill.stats.datasets import XQUAD_LANGUAGES, reading_passages
    from unskill.stats.guard import GuardConfig, retain_sets

    passages = reading_passages(data_dir, per_language=3)
    assert len(passages.items) == 3 * len(XQUAD_LANGUAGES)
    assert len({item.group for item in passages.items}) == len(passages.items)   # other paragraphs per language
    assert all(item.group.startswith("train/") and item.prompt.endswith("Answer:") for item in passages.items)
    assert passages.prompts == reading_passages(data_dir, per_language=3).prompts   # seeded
    names = [d.name for d in retain_sets("code", GuardConfig(limit=40, data_dir=data_dir), data_dir)]
    assert "xquad:train" in names and "xquad:train+bon" in names
    # the benchmark's reading set is the test split's articles: no passage of it was calibrated on
    reading = next(s for s in bypass_sets("gsm8k", data_dir, limit=10) if s.name == "reading")
    calibrated = {item.prompt.split("\n\nQuestion:")[0] for item in reading_passages(data_dir, 200).items}
    assert reading.side == "retain" and len(reading.conversations) == 10
    assert not {c[-1][1].split("\n\nQuestion:")[0] for c in reading.conversations} & calibrated


def test_best_of_n_noise_is_seeded_and_joins_both_sides():
    import random

    from unskill.stats.guard import GuardConfig, retain_sets

    text = "Natalia sold clips to 48 of her friends in April, and then half as many in May."
    first = augment.best_of_n_noise(text, random.Random(1))
    assert first == augment.best_of_n_noise(text, random.Random(1)) and first != text
    assert len(first) == len(text) and first.lower() != text.lower()   # same length: letters moved, not lost
    assert "bon" in augment.FAMILIES   # the forget side's framed variants
    sets = retain_sets("math", GuardConfig(limit=30, data_dir=None), None, warn=lambda line: None)
    names = [d.name for d in sets]
    assert "builtin:code+bon" in names and len(sets) == 2 * len([n for n in names if not n.endswith("+bon")])


def test_random_suffix_copies_are_seeded_fresh_and_join_both_sides():
    """Each copy is its prompt, a space, then 4-16 random vocabulary tokens of the augmentation's own seed (the
    search's suffixes are 12 tokens of another seed); a third of each retain set gets one when the guard passes the
    tokenizer's vocabulary, none without it."""
    from unskill.stats.datasets import Dataset
    from unskill.stats.guard import GuardConfig, retain_sets
    from unskill.stats.items import Item

    def vocabulary(ids):
        return "".join(f"<{i}>" for i in ids)

    probes = Dataset("p", [Item(f"Question {i}: how many apples?", group="g") for i in range(30)])
    copies = augment.suffix_copies(probes, vocabulary, 50000, group=augment.FRAMED)
    assert copies.prompts == augment.suffix_copies(probes, vocabulary, 50000).prompts   # seeded
    lengths = set()
    for item, copy in zip(probes.items, copies.items):
        head, suffix = copy.prompt[:len(item.prompt) + 1], copy.prompt[len(item.prompt) + 1:]
        assert head == item.prompt + " " and copy.group == augment.FRAMED
        tokens = re.findall(r"<(\d+)>", suffix)
        assert "".join(f"<{t}>" for t in tokens) == suffix
        lengths.add(len(tokens))
    assert min(lengths) >= 4 and max(lengths) <= 16 and len(lengths) > 3
    assert augment.suffix_copies(probes, vocabulary, 50000, seed=1).prompts != copies.prompts
    config = GuardConfig(limit=30, data_dir=None)
    plain = retain_sets("math", config, None, warn=lambda line: None)
    with_suffix = retain_sets("math", config, None, warn=lambda line: None, vocabulary=(vocabulary, 50000))
    suffixed = {d.name: d for d in with_suffix if d.name.endswith("+suffix")}
    assert [d.name for d in with_suffix[:len(plain)]] == [d.name for d in plain]
    assert set(suffixed) == {f"{d.name}+suffix" for d in plain if not d.name.endswith("+bon")}
    general = next(d for d in plain if d.name == "builtin:general")
    assert len(suffixed["builtin:general+suffix"].items) == len(general.items[::3])
