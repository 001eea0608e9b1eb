"""The guard's second look (runtime/canonical.py): garbled spellings repaired from the tokenizer's own words; a
garbled prompt whose repaired copy is in the skill's region is refused by the Generator, the server's engine and
the in-graph guard's runtime alike, and the evals record the same decision; clean prompts get no second look."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from unskill.runtime.canonical import Lexicon, canonical_prompt, canonical_text, lexicon_of
from unskill.runtime.generator import GenerationParams, Generator

WORDS = ["write", "a", "python", "function", "to", "find", "the", "first", "repeated", "character", "in", "given",
         "string", "how", "many", "apples", "are", "left", "if", "tom", "eats", "of", "his", "dictionary", "depth"]
CLEAN = "Write a python function to find the first repeated character in a given string."
# random case, shuffled middles, "character" with two letters moved one code point, a space moved to "!"
GARBLED = "wRITe a pYTHOn fNCUTION tO FnID tHE fSRIT!rPEAteed cHSaBCtEr In a GIveN sritng."


def test_scrambled_cased_and_noised_words_are_repaired():
    lexicon = Lexicon(WORDS)
    copy, seen = canonical_text(GARBLED, lexicon)
    assert copy == CLEAN.lower() and seen.garbled() and seen.odd >= 8 and seen.unknown == 0
    assert lexicon.repair("dRoICuaiyn") == "dictionary"     # scrambled with its trailing mark, one letter noised
    assert lexicon.repair("Ageiuhxz") == "ageiuhxz"          # nothing near it: left as written
    assert canonical_text("@ function", lexicon)[0] == "a function"


def test_clean_prompts_get_no_second_look():
    lexicon = Lexicon(WORDS)
    assert canonical_prompt(CLEAN, lexicon) is None
    assert canonical_prompt("How many apples are left if McTom eats 3 of his 12 apples?", lexicon) is None
    # another language: many words neither known nor repairable, none oddly cased (no extra pass for it)
    assert canonical_prompt("Die Hauptstadt von Frankreich ist Paris, sie liegt an der Seine.", lexicon) is None
    assert canonical_prompt("Wie viele Äpfel hat Tom? Er isst drei Äpfel.", lexicon) is None
    scrambled = "Wtrie a pohytn fuointcn to fnid the fisrt rpeeated crhaetcar in a gevin srntig."   # no casing
    assert canonical_prompt(scrambled, lexicon) == CLEAN.lower()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": GARBLED}]
    copy = canonical_prompt(messages, lexicon)
    assert copy[1]["content"] == CLEAN.lower() and copy[0]["role"] == "system"


def test_the_attackers_own_samples_are_mostly_repaired():
    """Best-of-N samples drawn by the benchmark's attacker (evals/attack.py, its own seeds): every one gets a
    second look, and most of its words come back as written."""
    from unskill.evals.attack import bon_augment

    lexicon = Lexicon(WORDS)
    rng = random.Random("test:second-look")
    recovered = []
    for _ in range(200):
        sample = bon_augment(CLEAN, rng)
        copy = canonical_prompt(sample, lexicon)
        assert copy is not None, sample
        recovered.append(np.mean([a == b for a, b in zip(copy.split(), CLEAN.lower().split())]))
    assert np.mean(recovered) > 0.9


@pytest.fixture(scope="module")
def copy_guard(tiny_export, llama_stats, tmp_path_factory):
    """(export dir, stats path): a linear rule on the tiny llama's last layer that holds GARBLED's repaired copy
    and not GARBLED itself (its direction from the one key to the other, its threshold halfway)."""
    from unskill.runtime import load
    from unskill.runtime.session import left_pad
    from unskill.runtime.statsfile import GuardSetting

    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    manifest = generator.model.manifest
    copy = generator.second_look.copies([GARBLED])[0] if generator.second_look else None
    assert copy is None   # no guard, no second look
    copy = canonical_prompt(GARBLED, lexicon_of(generator.tokenizer))
    assert copy is not None
    layer = manifest.num_layers - 1
    encoded = generator.encode([copy, GARBLED], GenerationParams())
    input_ids, mask = left_pad(encoded, manifest.pad_token_id)
    name = manifest.key_last_outputs[layer]
    _, _, out = generator.model.forward(input_ids, mask, generator.model.empty_past(2), [name])
    held, garbled = out[name].astype(np.float64)
    weight = (held - garbled) / np.linalg.norm(held - garbled)
    bias = -float(weight @ (held + garbled)) / 2    # fires when -(w . k + b) <= 0: the copy's side
    setting = GuardSetting("linear", [layer], [0.0], weights=weight[None].astype(np.float32), biases=np.array([bias]))
    stats = llama_stats[0]
    return onnx_dir, replace(stats, guard=setting).save(tmp_path_factory.mktemp("second_look") / "copy.npz")


def test_generator_and_engine_refuse_a_garbled_prompt_through_its_copy(copy_guard):
    from unskill.runtime import load
    from unskill.runtime.engine import BatchEngine

    onnx_dir, path = copy_guard
    generator = load(onnx_dir, [path], device="cpu")
    params = GenerationParams(max_new_tokens=1)   # the prompt's check only
    first_look_only = Generator(generator.model, generator.tokenizer, generator.guard, second_look=False)
    assert not first_look_only.generate([GARBLED], params)[0].abstained
    results = generator.generate([GARBLED, CLEAN, "Tom eats apples."], params)
    assert results[0].abstained and results[0].abstained_at == 0 and results[0].rule.endswith("repaired spelling")
    assert not results[2].abstained   # not garbled: no second look, and its own keys are answered
    engine = BatchEngine(generator).start()
    try:
        assert engine.run(GARBLED, params)[-1].abstained
        assert not engine.run("Tom eats apples.", params)[-1].abstained
    finally:
        engine.close()


def test_evals_record_the_runtimes_second_look(copy_guard):
    from unskill.runtime import load
    from unskill.runtime.canonical import SecondLook

    onnx_dir, path = copy_guard
    generator = load(onnx_dir, [path], device="cpu")
    record = SecondLook(generator.model, generator.tokenizer, generator.guard).refused([GARBLED, CLEAN], chat=True)
    assert record == {"looked": [True, False], "refused": [True, False]}


def test_the_in_graph_guard_gets_the_second_look_too(copy_guard, tmp_path):
    from unskill.exporter.deploy import guard_edit
    from unskill.runtime import load
    from unskill.runtime.graph_guard import GraphGuard

    onnx_dir, path = copy_guard
    guard_edit(onnx_dir, [path], tmp_path / "guarded")
    generator = load(tmp_path / "guarded", device="cpu")
    assert isinstance(generator.guard, GraphGuard)
    params = GenerationParams(max_new_tokens=1)   # the prompt's check only
    assert generator.generate([GARBLED], params)[0].abstained
    first_look_only = Generator(generator.model, generator.tokenizer, generator.guard, second_look=False)
    assert not first_look_only.generate([GARBLED], params)[0].abstained


def test_the_server_refuses_a_garbled_prompt_through_its_copy(copy_guard):
    """`unskill serve` on loopback, driven by the openai client: the garbled request gets content_filter."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from unskill.runtime import load
    from unskill.runtime.engine import BatchEngine
    from unskill.runtime.server import ServeLimits, build_app, serve_in_thread

    onnx_dir, path = copy_guard
    engine = BatchEngine(load(onnx_dir, [path], device="cpu"), max_batch=2)
    server, port = serve_in_thread(build_app(engine, "tiny", "key", ServeLimits(max_tokens=8, context=128)))
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key", max_retries=0, timeout=60)
        refused = api.chat.completions.create(model="tiny", max_tokens=1,
                                              messages=[{"role": "user", "content": GARBLED}])
        assert refused.choices[0].finish_reason == "content_filter"
        answered = api.chat.completions.create(model="tiny", max_tokens=1,
                                               messages=[{"role": "user", "content": "Tom eats apples."}])
        assert answered.choices[0].finish_reason != "content_filter"
    finally:
        server.should_exit = True
