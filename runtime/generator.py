"""The decode loop: batched prompts, left padding, KV cache, sampling, stop conditions, KSD guard.

Streaming API in the spirit of onnxruntime-genai's Generator:
    gen = Generator(model, tokenizer, guard)
    for event in gen.stream("What is 2+3?"): print(event.text, end="")
    results = gen.generate(["prompt a", "prompt b"], GenerationParams(max_new_tokens=64))
A prompt is a string (one user turn) or a chat: a list of {"role": ..., "content": ...} messages
(system, user, assistant turns), rendered with the model's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Union

import numpy as np

from .canonical import SecondLook
from .errors import UnskillError
from .ksd import Hit, KSDGuard
from .sampling import SamplingParams, sample
from .session import EVERY_POSITION, OnnxLM, left_pad
from .tokenizer import TextTokenizer

ABSTAIN_MESSAGE = "Your query is not valid."
Prompt = Union[str, list]   # text, or chat messages [{"role": "system"|"user"|"assistant", "content": str}]


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    chat: bool = True
    ignore_eos: bool = False            # mask EOS so exactly max_new_tokens come out (benchmarks)


@dataclass
class Result:
    prompt: Prompt
    text: str
    token_ids: list[int]
    finish_reason: str = "length"       # eos | length | stop | abstain | context
    abstained: bool = False
    skill: str | None = None
    layer: int | None = None
    abstained_at: int | None = None     # 0 = at the prompt, n = after n generated tokens
    forwards: int = 0                   # forward calls this row took part in (= guard checks it got)
    prompt_tokens: int = 0
    rule: str | None = None             # the KSD rule that fired ("paper" or the stored calibrated rule)


@dataclass
class Event:
    """One step of a stream: the text added since the last event; the last event has finish_reason set."""
    text: str
    finish_reason: str | None = None    # None while running; then as Result.finish_reason
    abstained: bool = False
    skill: str | None = None
    layer: int | None = None
    rule: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Row:
    """Per-prompt decode state."""

    def __init__(self, prompt: Prompt, prompt_tokens: int = 0):
        self.prompt, self.ids, self.done, self.result, self.forwards = prompt, [], False, None, 0
        self.prompt_tokens = prompt_tokens


class TextStream:
    """Turns a row's growing token list into text deltas (Events).

    hold_tokens: send nothing until that many generated tokens have passed the guard (-1: until the end),
    so a refusal within them never leaves partial text with the client; the refusal then arrives as the
    abstain message alone. Text that could still become a stop string, or an incomplete UTF-8 sequence,
    waits for the next token."""

    def __init__(self, generator: "Generator", stop: tuple[str, ...] = (), hold_tokens: int = 0):
        self.generator, self.hold_tokens, self.shown = generator, hold_tokens, ""
        self.stop_margin = max((len(s) for s in stop), default=1) - 1

    def update(self, row: _Row) -> Event | None:
        result = self.generator._result(row)
        counts = dict(prompt_tokens=row.prompt_tokens, completion_tokens=len(row.ids))
        if row.done:
            text = result.text
            if result.abstained:   # the whole answer is replaced; what was already sent cannot be taken back
                text = result.text if not self.shown else ""
                counts["completion_tokens"] = 0
            delta = text[len(self.shown):] if text.startswith(self.shown) else ""
            self.shown += delta
            return Event(delta, result.finish_reason, result.abstained, result.skill, result.layer, rule=result.rule,
                         **counts)
        # The guard has passed token n once the forward that fed it was checked: n = len(ids) - 1.
        if self.hold_tokens < 0 or len(row.ids) - 1 < self.hold_tokens:
            return None
        text = result.text
        if text.endswith("\ufffd"):   # an incomplete UTF-8 sequence: wait for more
            return None
        text = text[:len(text) - self.stop_margin]
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return None
        delta, self.shown = text[len(self.shown):], text
        return Event(delta, **counts)


SECOND_LOOK_BATCH = 8   # garbled prompts' repaired copies checked per forward


class Generator:
    def __init__(self, model: OnnxLM, tokenizer: TextTokenizer, guard: KSDGuard | None = None,
                 abstain_message: str = ABSTAIN_MESSAGE, second_look: bool = True):
        self.model, self.tokenizer, self.guard, self.abstain_message = model, tokenizer, guard, abstain_message
        self.eos = set(model.manifest.eos_token_ids)
        # a garbled prompt is also checked in its repaired spelling (runtime/canonical.py)
        self.second_look = SecondLook(model, tokenizer, guard) if guard and second_look else None

    def generate(self, prompts: list[Prompt], params: GenerationParams | None = None) -> list[Result]:
        rows = None
        for rows in self._steps(prompts, params or GenerationParams()):
            pass
        return [self._result(row) for row in rows]

    def stream(self, prompt: Prompt, params: GenerationParams | None = None, hold_tokens: int = 0
               ) -> Iterator[Event]:
        """Yields Events as tokens are decoded; the last one carries the finish reason (and abstention).
        An abstention yields the abstain message alone unless text beyond hold_tokens was already sent."""
        params = params or GenerationParams()
        text_stream = TextStream(self, params.stop, hold_tokens)
        for (row,) in self._steps([prompt], params):
            event = text_stream.update(row)
            if event is not None:
                yield event

    def encode(self, prompts: list[Prompt], params: GenerationParams) -> list[list[int]]:
        limit = self.model.manifest.max_context
        encoded = []
        for prompt in prompts:
            ids = self.tokenizer.encode_prompt(prompt, params.chat)
            if len(ids) >= limit:
                raise UnskillError(f"prompt of {len(ids)} tokens does not fit the context of {limit}: "
                                   f"{str(prompt)[:40]!r}…")
            encoded.append(ids)
        return encoded

    def check_params(self, params: GenerationParams) -> None:
        if not 1 <= params.max_new_tokens:
            raise UnskillError(f"max new tokens must be >= 1, got {params.max_new_tokens}")
        params.sampling.validate(self.model.vocab_size)

    def _steps(self, prompts: list[Prompt], params: GenerationParams) -> Iterator[list[_Row]]:
        """Runs the batch to the end, yielding the row states after the prompt and after each token."""
        if not prompts:
            raise UnskillError("no prompts")
        self.check_params(params)
        encoded = self.encode(prompts, params)
        rows = [_Row(p, len(ids)) for p, ids in zip(prompts, encoded)]
        rng = np.random.default_rng(params.sampling.seed)
        pad = self.model.manifest.pad_token_id
        input_ids, mask = left_pad(encoded, pad)
        width = input_ids.shape[1]
        past = self.model.empty_past(len(rows))
        guard_outputs = self.guard.output_names if self.guard else []
        budget = min(params.max_new_tokens, self.model.manifest.max_context - width)
        # One forward per token; none after the last one (as in HF generate and the reference code, whose
        # guard sees the last position of every forward call), so a batch ends once every row is done.
        for step in range(budget):
            # The prompt pass reserves room for the tokens to come: decode steps then write their keys and
            # values into the cache in place (GroupQueryAttention graphs; runtime/session.py).
            logits, past, keys = self.model.forward(input_ids, mask, past,
                                                    self.prompt_guard_outputs() if step == 0 else guard_outputs,
                                                    reserve=budget - 1 if step == 0 else 0,
                                                    tail=self.guard_positions() if step == 0 else 0)
            hits = self.check_guard(keys, len(rows), mask)
            if step == 0:
                hits = self.prompt_hits(prompts, hits, params.chat)
            next_ids = np.full(len(rows), pad, dtype=np.int64)
            for i, row in enumerate(rows):
                if not row.done:
                    next_ids[i] = self.step_row(row, logits[i], hits[i], step, budget, params, rng)
            yield rows
            if all(row.done for row in rows):
                return
            input_ids = next_ids[:, None]
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)

    def prompt_guard_outputs(self) -> list[str]:
        """What the prompt's forward fetches for the guard: a rule over the prompt's last tokens reads their keys
        (key.*, per position) there."""
        return getattr(self.guard, "prompt_output_names", None) or (self.guard.output_names if self.guard else [])

    def guard_positions(self) -> int:
        """The prompt positions the guard reads per position (0: the last token only; EVERY_POSITION: all)."""
        if getattr(self.guard, "every_position", False):
            return EVERY_POSITION
        positions = getattr(self.guard, "positions", 1)
        return positions if positions > 1 else 0

    def prompt_hits(self, prompts: list[Prompt], hits: list[Hit | None], chat: bool) -> list[Hit | None]:
        """The prompt's verdicts with the second look's added (runtime/canonical.py): a row the first look answers
        is refused when the repaired spelling of its garbled prompt is. The copy runs the prompt's own forward
        and check (the same outputs, the same positions), with no cache kept."""
        if self.second_look is None:
            return hits
        open_rows = [i for i, hit in enumerate(hits) if hit is None]
        copies = self.second_look.copies([prompts[i] for i in open_rows])
        looked = [(row, copy) for row, copy in zip(open_rows, copies) if copy is not None]
        hits, keep = list(hits), self.model.manifest.max_context - 1
        for start in range(0, len(looked), SECOND_LOOK_BATCH):
            chunk = looked[start:start + SECOND_LOOK_BATCH]
            # a repaired copy is rarely longer than the garbled prompt; its last tokens are what the guard reads
            encoded = [self.tokenizer.encode_prompt(copy, chat)[-keep:] for _, copy in chunk]
            input_ids, mask = left_pad(encoded, self.model.manifest.pad_token_id)
            _, _, keys = self.model.forward(input_ids, mask, self.model.empty_past(len(chunk)),
                                            self.prompt_guard_outputs(), logits=False, tail=self.guard_positions())
            for (row, _), hit in zip(chunk, self.check_guard(keys, len(chunk), mask)):
                hits[row] = hit and replace(hit, rule=f"{hit.rule}, on the prompt's repaired spelling")
        return hits

    def check_guard(self, keys: dict[str, np.ndarray], batch: int, mask: np.ndarray | None = None) -> list[Hit | None]:
        """The guard's verdict per row on the keys of the last position (key_last.* are already 2-D); at the prompt
        a multi-position rule's per-position keys (B, S, F), with the attention mask saying which positions are the
        row's."""
        if not self.guard:
            return [None] * batch
        if self.guard_positions():   # a rule over several prompt positions (or all of them) reads them with the mask
            return self.guard.check(keys, mask)
        return self.guard.check({n: k if k.ndim <= 2 else k[:, -1, :] for n, k in keys.items()})

    def step_row(self, row: _Row, logits: np.ndarray, hit: Hit | None, step: int, budget: int,
                 params: GenerationParams, rng) -> int:
        """One forward's outcome for one row: abstain on a guard hit, else the next token (pad when done)."""
        row.forwards += 1
        if hit is not None:
            self._abstain(row, hit, step)
            return self.model.manifest.pad_token_id
        token = self._advance(row, logits, params, rng)
        if not row.done and step + 1 == budget:
            self._finish(row, "length" if budget == params.max_new_tokens else "context")
        return token

    def _advance(self, row: _Row, logits: np.ndarray, params: GenerationParams, rng) -> int:
        if params.ignore_eos:
            logits = logits.copy()
            logits[list(self.eos)] = -np.inf
        token = sample(logits, params.sampling, rng)
        if token in self.eos:
            self._finish(row, "eos")
            return token
        row.ids.append(token)
        if params.stop:
            text = self.tokenizer.decode(row.ids)
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                self._finish(row, "stop", text[:cut])
        return token

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        row.done = True
        row.result = Result(row.prompt, self.tokenizer.decode(row.ids) if text is None else text, row.ids, reason)

    def _abstain(self, row: _Row, hit: Hit, step: int) -> None:
        row.done = True
        row.result = Result(row.prompt, self.abstain_message, [], "abstain", True, hit.skill, hit.layer, step,
                            rule=hit.rule)

    def _result(self, row: _Row) -> Result:
        result = row.result or Result(row.prompt, self.tokenizer.decode(row.ids), row.ids, "running")
        result.forwards, result.prompt_tokens = row.forwards, row.prompt_tokens
        return result
