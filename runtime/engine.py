"""Continuous batching: concurrent requests share decode steps; rows join and leave as they start and end.

A new request is prefilled alone (batch 1, its guard check and first token included); then its KV cache
joins the running batch: the batch's and the row's caches are left-padded with zero columns (attention
mask 0) to a common length and stacked on the batch axis. Position ids come from the cumulative mask
(OnnxLM.forward), so the padding changes nothing a row attends to: greedy output equals one request at a
time (tests/test_engine.py). Sliding-window layers (Gemma 3) count padding columns inside their window,
as in any left-padded batch: equality holds while a row's cache fits the window (512 on Gemma-3-270M).
A finished or cancelled row is sliced out, and the columns that are padding
in every remaining row are trimmed. The guard is checked per row at every forward, as in Generator.

The tokens every chat prompt starts with (the template's system turn: 24 of a typical 39 tokens on
SmolLM2) are run once; a prompt that starts with them is prefilled from that cache (share_prefix=True).

A request's parameters are checked at submit (GenerationParams, SamplingParams.validate); a failure inside
one row later (its prefill, its sampling) ends that row with an error event and the others go on. Only a
failed batched forward ends every row.

One thread runs the loop. onnxruntime releases the GIL while it runs, so an asyncio server on the main
thread stays responsive. Each request gets its Events through its own callback, called on that thread.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from .errors import UnskillError
from .generator import Event, GenerationParams, Generator, Prompt, TextStream, _Row
from .session import release_freed_memory

TRIM_EVERY_STEPS = 32


class EngineBusy(UnskillError):
    """The waiting queue is full; a server answers 503."""


@dataclass
class Request:
    prompt: Prompt
    params: GenerationParams
    ids: list[int]
    on_event: Callable[[Event], None]
    hold_tokens: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: the engine drops the row before its next step."""
        self.cancelled = True


@dataclass
class _Active:
    request: Request
    row: _Row
    stream: TextStream
    rng: np.random.Generator
    budget: int
    step: int = 0
    next_id: int = 0
    finished: bool = field(default=False)


class BatchEngine:
    def __init__(self, generator: Generator, max_batch: int = 16, max_queue: int = 256, share_prefix: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise UnskillError(f"max batch and max queue must be >= 1, got {max_batch} and {max_queue}")
        self.generator, self.model = generator, generator.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Active] = []
        self._past: dict[str, ort.OrtValue] = {}
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._guard_outputs = generator.guard.output_names if generator.guard else []
        self.steps = 0        # decode steps run (each shared by every active row)
        self.row_steps = 0    # rows summed over decode steps: row_steps / steps = mean batch size
        self.prefills = 0
        self._trimmed_at = 0   # decode step of the last release_freed_memory
        self.share_prefix = share_prefix
        self._prefixes: dict[bool, tuple[list[int], dict[str, ort.OrtValue]]] = {}   # chat flag -> ids, cache

    # ---- the caller's side (any thread) ----
    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="unskill-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt: Prompt, params: GenerationParams, on_event: Callable[[Event], None],
               hold_tokens: int = 0, ids: list[int] | None = None) -> Request:
        """Checks the request now (UnskillError on bad input) and queues it; events arrive via on_event.
        ids: the prompt's tokens when the caller has encoded it already."""
        self.generator.check_params(params)
        ids = ids if ids is not None else self.generator.encode([prompt], params)[0]
        request = Request(prompt, params, ids, on_event, hold_tokens)
        with self._wake:
            if self._closed:
                raise UnskillError("the engine is shut down")
            if len(self._pending) >= self.max_queue:
                raise EngineBusy(f"server busy: {len(self._pending)} requests waiting; retry later")
            self._pending.append(request)
            self._wake.notify()
        return request

    def run(self, prompt: Prompt, params: GenerationParams, hold_tokens: int = 0) -> list[Event]:
        """Blocking: every event of one request, in order (the last one has the finish reason)."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(prompt, params, events.put, hold_tokens)
        out = [events.get()]
        while out[-1].finish_reason is None:
            out.append(events.get())
        return out

    @property
    def load(self) -> dict:
        return {"active": len(self._rows), "waiting": len(self._pending), "max_batch": self.max_batch}

    @property
    def counters(self) -> dict:
        return {"steps": self.steps, "row_steps": self.row_steps, "prefills": self.prefills}

    # ---- the engine thread ----
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._rows and not self._closed:
                    self._wake.wait()
                if self._closed:
                    self._fail_all("the server is shutting down")
                    return
                joining = []
                while self._pending and len(self._rows) + len(joining) < self.max_batch:
                    joining.append(self._pending.popleft())
            try:
                self._join([row for row in map(self._prefill_alone, joining) if row is not None])
                self._drop_finished()
                if self._rows:
                    self._decode_step()
                    self._drop_finished()
            except Exception as exc:   # an onnxruntime failure must not leave clients waiting forever
                self._fail_all(_failure(exc))

    def _prefill_alone(self, request: Request) -> tuple | None:
        """_prefill, where a failure ends this request alone (the batch has not taken its row yet)."""
        try:
            return self._prefill(request)
        except Exception as exc:
            self._send(request, Event(_failure(exc), finish_reason="error"))
            return None

    def _prefill(self, request: Request) -> tuple | None:
        """The prompt alone (batch 1): guard, first token; (row, its cache, its mask) if it goes on."""
        if request.cancelled:
            return None
        params, gen = request.params, self.generator
        prefix, start = self._prefix(params.chat), self.model.empty_past(1)
        skip = len(prefix[0]) if prefix and request.ids[:len(prefix[0])] == prefix[0] else 0
        if skip and skip + max(gen.guard_positions(), 1) <= len(request.ids):   # the guard's tokens run here
            start = prefix[1]   # onnxruntime only reads its inputs: one cache serves every request
        else:
            skip = 0
        mask = np.ones((1, len(request.ids)), dtype=np.int64)
        ids = np.array([request.ids[skip:]], dtype=np.int64)
        logits, past, keys = self.model.forward(ids, mask, start, gen.prompt_guard_outputs(),
                                                tail=gen.guard_positions())
        self.prefills += 1
        budget = min(params.max_new_tokens, self.model.manifest.max_context - len(request.ids))
        active = _Active(request, _Row(request.prompt, len(request.ids)),
                         TextStream(gen, params.stop, request.hold_tokens),
                         np.random.default_rng(params.sampling.seed), budget)
        hit = gen.prompt_hits([request.prompt], gen.check_guard(keys, 1, mask), params.chat)[0]
        self._advance(active, logits[0], hit)
        return None if active.row.done else (active, past, mask)

    def _prefix(self, chat: bool):
        """(ids, KV cache) of the tokens every prompt of this kind starts with; None if too short to pay."""
        if not self.share_prefix:
            return None
        if chat not in self._prefixes:
            params = GenerationParams(chat=chat)
            first, second = (self.generator.encode([text], params)[0] for text in ("a", "Be brief"))
            length = next((i for i, (x, y) in enumerate(zip(first, second)) if x != y), min(len(first), len(second)))
            cache = None
            if length >= 4:
                ids = np.array([first[:length]], dtype=np.int64)
                _, past, _ = self.model.forward(ids, np.ones_like(ids), self.model.empty_past(1), logits=False)
                cache = (first[:length], past)
            self._prefixes[chat] = cache
        return self._prefixes[chat]

    def _decode_step(self) -> None:
        input_ids = np.array([[a.next_id] for a in self._rows], dtype=np.int64)
        self._mask = np.concatenate([self._mask, np.ones((len(self._rows), 1), dtype=np.int64)], axis=1)
        logits, self._past, keys = self.model.forward(input_ids, self._mask, self._past, self._guard_outputs)
        self.steps += 1
        self.row_steps += len(self._rows)
        hits = self.generator.check_guard(keys, len(self._rows))
        for i, active in enumerate(self._rows):
            active.step += 1
            self._advance(active, logits[i], hits[i])

    def _advance(self, active: _Active, logits: np.ndarray, hit) -> None:
        """One row's step. A failure here (sampling, decoding) is this row's: it ends with an error event and
        the other rows go on."""
        request = active.request
        try:
            active.next_id = self.generator.step_row(active.row, logits, hit, active.step, active.budget,
                                                     request.params, active.rng)
            event = active.stream.update(active.row)
        except Exception as exc:
            active.row.done = True
            active.next_id = self.model.manifest.pad_token_id
            self._send(request, Event(_failure(exc), finish_reason="error"))
            return
        if event is not None:
            self._send(request, event)

    @staticmethod
    def _send(request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:   # a consumer that broke (closed loop) must not stop the others
            request.cancel()

    def _join(self, joining: list[tuple]) -> None:
        """Stack the new rows' caches under the batch's, all left-padded to a common length (one copy of
        the batch's cache however many rows join)."""
        if not joining:
            return
        parts = ([(self._past, self._mask)] if self._rows else []) + [(past, mask) for _, past, mask in joining]
        self._rows += [active for active, _, _ in joining]
        if len(parts) == 1:
            self._past, self._mask = parts[0]
            return
        width = max(mask.shape[1] for _, mask in parts)
        self._mask = np.concatenate([_pad_left(mask, width, 1) for _, mask in parts], axis=0)
        self._past = {name: self._ort(np.concatenate([_pad_left(past[name].numpy(), width, 2) for past, _ in parts],
                                                     axis=0))
                      for name in parts[0][0]}

    def _drop_finished(self) -> None:
        keep = [i for i, a in enumerate(self._rows) if not a.row.done and not a.request.cancelled]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._past, self._mask = {}, np.zeros((0, 0), dtype=np.int64)
        else:
            mask = self._mask[keep]
            start = int(mask.any(axis=0).argmax())   # columns before it are padding in every row left
            self._mask = np.ascontiguousarray(mask[:, start:])
            self._past = {name: self._ort(value.numpy()[keep][:, :, start:]) for name, value in self._past.items()}
        # Every join and leave copies the batch's cache (NumPy arrays of tens of MB): glibc keeps the freed blocks,
        # so RSS would stay at the largest batch ever served. Hand them back when the batch empties, and when rows
        # leave at most once every TRIM_EVERY_STEPS decode steps (malloc_trim costs ~ms, a step ~10-100 ms).
        if not keep or self.steps - self._trimmed_at >= TRIM_EVERY_STEPS:
            release_freed_memory()
            self._trimmed_at = self.steps

    def _ort(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.model.device)

    def _fail_all(self, message: str) -> None:
        with self._wake:
            waiting, self._pending = list(self._pending), collections.deque()
        for request in [a.request for a in self._rows] + waiting:
            self._send(request, Event(message, finish_reason="error"))
        self._rows, self._past, self._mask = [], {}, np.zeros((0, 0), dtype=np.int64)


def _failure(exc: Exception) -> str:
    """One line for the client: what failed, never a traceback."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return f"generation failed: {lines[0][:200]}"


def _pad_left(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)
