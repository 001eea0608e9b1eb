"""The batching engine on real exported models: rows that join and leave a running batch get the same
greedy tokens as one request at a time, the guard fires per row, and a cancelled row frees its slot."""

import queue
import threading

import pytest

from unskill.runtime import GenerationParams, load
from unskill.runtime.engine import BatchEngine

PROMPTS = ["Natalia sold clips to 48 of her friends", "Write a python function",
           "The capital of France is", "def add(a, b):", "How many apples are left if Tom eats 3"]


def greedy(n, chat=False, stop=()):
    return GenerationParams(max_new_tokens=n, chat=chat, stop=tuple(stop))


def staggered(engine, prompts, lengths, hold_tokens=0, chat=False):
    """Submits each prompt once the previous one has streamed a few events, so rows join a running
    batch at different cache lengths; returns every request's events."""
    outs = [queue.Queue() for _ in prompts]
    # on_event runs in the engine thread: a row's first event holds the engine until the next prompt is queued,
    # so the next row joins while this one still runs, however slowly the test thread is scheduled.
    submitted = [threading.Event() for _ in prompts] + [threading.Event()]
    submitted[-1].set()
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        started = threading.Event()

        def on_event(event, out=outs[i], started=started, next_queued=submitted[i + 1]):
            out.put(event)
            if not started.is_set():
                started.set()
                next_queued.wait(timeout=60)
        engine.submit(prompt, greedy(n, chat), on_event, hold_tokens)
        submitted[i].set()
        started.wait(timeout=60)
    results = []
    for out in outs:
        events = [out.get(timeout=120)]
        while events[-1].finish_reason is None:
            events.append(out.get(timeout=120))
        results.append(events)
    return results


# Not gemma3: its sliding-window layers count padding columns in the window (the tiny one's window is 8
# tokens), the same limit as Generator's left-padded batches (test_runtime.py tests llama and gpt2).
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rows_joining_and_leaving_match_one_at_a_time(tiny_export, kind):
    _, onnx_dir = tiny_export(kind)
    generator = load(onnx_dir, device="cpu")
    lengths = [14, 5, 20, 3, 9]   # rows leave at different steps; later ones join longer caches
    single = [generator.generate([p], greedy(n))[0] for p, n in zip(PROMPTS, lengths)]
    engine = BatchEngine(generator, max_batch=4).start()
    try:
        batched = staggered(engine, PROMPTS, lengths)
        assert engine.steps < sum(r.forwards for r in single) - len(PROMPTS)   # decode steps were shared
    finally:
        engine.close()
    assert ["".join(e.text for e in events) for events in batched] == [r.text for r in single]
    assert [events[-1].finish_reason for events in batched] == [r.finish_reason for r in single]
    assert [events[-1].completion_tokens for events in batched] == [len(r.token_ids) for r in single]


def test_guard_fires_per_row_and_hold_back_sends_no_partial_text(tiny_export, llama_stats):
    _, onnx_dir = tiny_export("llama")
    guarded = load(onnx_dir, stats=[llama_stats[1]], rule="paper", device="cpu")
    prompts = ["How many apples are left if Tom eats 3 of his 12 apples?", "Write a python function"]
    expected = guarded.generate(prompts, greedy(6, chat=True))
    assert [r.abstained for r in expected] == [True, False]
    engine = BatchEngine(guarded, max_batch=4).start()
    try:
        events = staggered(engine, prompts, [6, 6], hold_tokens=-1, chat=True)
    finally:
        engine.close()
    refused, answered = events
    assert [e.text for e in refused] == [guarded.abstain_message]   # one event: the refusal alone
    assert refused[-1].finish_reason == "abstain" and refused[-1].skill == "probe"
    assert len(answered) == 1 and answered[0].text == expected[1].text   # held back to the end


def test_cancelled_row_leaves_the_batch(tiny_export):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    engine = BatchEngine(generator, max_batch=1).start()
    try:
        seen = threading.Event()
        request = engine.submit(PROMPTS[0], GenerationParams(max_new_tokens=4000, chat=False, ignore_eos=True),
                                lambda event: seen.set())
        assert seen.wait(timeout=60)
        request.cancel()
        # the only slot is free again: the next request runs to the end
        events = engine.run(PROMPTS[1], greedy(5))
        assert events[-1].finish_reason in ("length", "eos") and engine.load["active"] == 0
    finally:
        engine.close()


@pytest.mark.model
def test_smollm2_batched_equals_single(smollm2_export):
    generator = load(smollm2_export, device="cpu")
    prompts = ["Write a python function to reverse a string.", "What is the capital of France?",
               [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}]]
    lengths = [24, 12, 8]
    single = [generator.generate([p], greedy(n, chat=True))[0] for p, n in zip(prompts, lengths)]
    engine = BatchEngine(generator, max_batch=4).start()
    try:
        batched = staggered(engine, prompts, lengths, chat=True)
    finally:
        engine.close()
    assert ["".join(e.text for e in events) for events in batched] == [r.text for r in single]
    assert len(engine._prefixes[True][0]) == 24   # the system turn ran once; the first two prompts reused it


def test_a_row_that_fails_ends_alone_and_the_others_finish(tiny_export):
    """A failure inside one row (here its sampling: a temperature turned NaN after the checks at submit) ends
    that row with an error event; the rows decoding beside it finish with the tokens they get alone."""
    import math

    from unskill.runtime import SamplingParams, UnskillError

    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    lengths = [12, 9]
    single = [generator.generate([p], greedy(n))[0] for p, n in zip(PROMPTS[:2], lengths)]
    engine = BatchEngine(generator, max_batch=4).start()
    try:
        with pytest.raises(UnskillError, match="seed must be"):
            engine.submit(PROMPTS[2], GenerationParams(sampling=SamplingParams(0.7, seed=-1)), print)
        outs = [queue.Queue() for _ in range(3)]
        first_seen = threading.Event()

        def on_first(event):   # holds the engine until the failing row is queued, so all three share the batch
            outs[0].put(event)
            first_seen.set()
            assert bad_queued.wait(timeout=60)
        bad_queued = threading.Event()
        engine.submit(PROMPTS[0], greedy(lengths[0]), on_first)
        assert first_seen.wait(timeout=60)
        engine.submit(PROMPTS[1], greedy(lengths[1]), outs[1].put)
        bad = GenerationParams(max_new_tokens=40, chat=False, ignore_eos=True, sampling=SamplingParams(0.7, seed=3))
        engine.submit(PROMPTS[2], bad, outs[2].put)
        bad.sampling.temperature = math.nan
        bad_queued.set()
        events = []
        for out in outs:
            got = [out.get(timeout=120)]
            while got[-1].finish_reason is None:
                got.append(out.get(timeout=120))
            events.append(got)
    finally:
        engine.close()
    assert events[2][-1].finish_reason == "error" and "generation failed" in events[2][-1].text
    assert ["".join(e.text for e in got) for got in events[:2]] == [r.text for r in single]
    assert [got[-1].finish_reason for got in events[:2]] == [r.finish_reason for r in single]
