"""The decode loop: batched prompts, left padding, KV cache, sampling, stop conditions, KSD guard.

Streaming API in the spirit of onnxruntime-genai's Generator:
    gen = Generator(model, tokenizer, guard)
    for piece in gen.stream("What is 2+3?"): print(piece, end="")
    results = gen.generate(["prompt a", "prompt b"], GenerationParams(max_new_tokens=64))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UnskillError
from .ksd import Hit, KSDGuard
from .sampling import SamplingParams, sample
from .session import OnnxLM, left_pad
from .tokenizer import TextTokenizer

ABSTAIN_MESSAGE = "Your query is not valid."


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    chat: bool = True
    ignore_eos: bool = False            # mask EOS so exactly max_new_tokens come out (benchmarks)


@dataclass
class Result:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str = "length"       # eos | length | stop | abstain | context
    abstained: bool = False
    skill: str | None = None
    layer: int | None = None
    abstained_at: int | None = None     # 0 = at the prompt, n = after n generated tokens
    forwards: int = 0                   # forward calls this row took part in (= guard checks it got)
    rule: str | None = None             # the KSD rule that fired ("paper" or the stored calibrated rule)


class _Row:
    """Per-prompt decode state."""

    def __init__(self, prompt: str):
        self.prompt, self.ids, self.done, self.result, self.forwards = prompt, [], False, None, 0


class Generator:
    def __init__(self, model: OnnxLM, tokenizer: TextTokenizer, guard: KSDGuard | None = None,
                 abstain_message: str = ABSTAIN_MESSAGE):
        self.model, self.tokenizer, self.guard, self.abstain_message = model, tokenizer, guard, abstain_message
        self.eos = set(model.manifest.eos_token_ids)

    def generate(self, prompts: list[str], params: GenerationParams | None = None) -> list[Result]:
        rows = None
        for rows in self._steps(prompts, params or GenerationParams()):
            pass
        return [self._result(row) for row in rows]

    def stream(self, prompt: str, params: GenerationParams | None = None) -> Iterator[str]:
        """Yields text pieces as they are decoded; an abstention yields the abstain message alone."""
        shown = ""
        for (row,) in self._steps([prompt], params or GenerationParams()):
            result = self._result(row)
            if result.abstained:
                yield result.text
                return
            text = result.text
            if text.endswith("\ufffd") and not row.done:   # an incomplete UTF-8 sequence: wait for more
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text

    def encode(self, prompts: list[str], params: GenerationParams) -> list[list[int]]:
        limit = self.model.manifest.max_context
        encoded = []
        for prompt in prompts:
            ids = self.tokenizer.encode_prompt(prompt, params.chat)
            if len(ids) >= limit:
                raise UnskillError(f"prompt of {len(ids)} tokens does not fit the context of {limit}: {prompt[:40]!r}…")
            encoded.append(ids)
        return encoded

    def _steps(self, prompts: list[str], params: GenerationParams) -> Iterator[list[_Row]]:
        """Runs the batch to the end, yielding the row states after the prompt and after each token."""
        if not prompts:
            raise UnskillError("no prompts")
        if params.max_new_tokens < 1:
            raise UnskillError(f"max new tokens must be >= 1, got {params.max_new_tokens}")
        params.sampling.validate()
        encoded = self.encode(prompts, params)
        rows = [_Row(p) for p in prompts]
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
            logits, past, keys = self.model.forward(input_ids, mask, past, guard_outputs)
            last = {n: k if k.ndim == 2 else k[:, -1, :] for n, k in keys.items()}   # key_last.* are 2-D
            hits = self.guard.check(last) if self.guard else [None] * len(rows)
            next_ids = np.full(len(rows), pad, dtype=np.int64)
            for i, row in enumerate(rows):
                if row.done:
                    continue
                row.forwards += 1
                if hits[i] is not None:
                    self._abstain(row, hits[i], step)
                    continue
                next_ids[i] = self._advance(row, logits[i], params, rng)
                if not row.done and step + 1 == budget:
                    self._finish(row, "length" if budget == params.max_new_tokens else "context")
            yield rows
            if all(row.done for row in rows):
                return
            input_ids = next_ids[:, None]
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)

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
        result.forwards = row.forwards
        return result
