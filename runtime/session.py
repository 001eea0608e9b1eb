"""An exported model as an onnxruntime session: one forward call, KV cache kept as OrtValues."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import UnskillError
from .manifest import Manifest, load_manifest

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
LOGITS_TO_KEEP = "logits_to_keep"   # optional input of exports since issue 18: LM head on the last k rows
PREFILL_CHUNK = 128   # prompt tokens per forward when only the last position is wanted (benchmarks/memory.py)
EVERY_POSITION = -1   # forward's `tail` for per-position outputs at every input position (a guard read at all of them)


def left_pad(sequences: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) for a batch, padded on the left so every row's last token is at -1."""
    width = max(map(len, sequences))
    ids = np.array([[pad] * (width - len(s)) + s for s in sequences], dtype=np.int64)
    mask = np.array([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=np.int64)
    return ids, mask


def release_freed_memory() -> None:
    """Hand the C heap's freed blocks back to the system (glibc's malloc_trim; a no-op elsewhere). Each
    chunk of a long prompt frees its transient tensors, but glibc keeps them: measured on SmolLM2 with a
    6,000-token prompt, past and present apart, 1,526 MB peak without, 1,415 MB with a trim after each chunk
    (with the shared KV buffer as well: 992 MB; benchmarks/README.md)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def pick_providers(device: str = "auto") -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UnskillError("--device cuda: onnxruntime has no CUDA provider (pip install the `gpu` extra)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class KVBuffer(dict):
    """OnnxLM.kv_buffer's result: past tensor name -> its preallocated buffer (an OrtValue), and the IO
    binding of the runs that write into it (kept for the next step of the same generation)."""
    binding: ort.IOBinding | None = None
    fetched: tuple[str, ...] | None = None   # the outputs besides present.* that binding fetches


class OnnxLM:
    """Loads DIR/model.onnx + unskill.json; `forward` runs one step and returns what the caller asked for."""

    def __init__(self, directory: str | Path, device: str = "auto", threads: int | None = None,
                 graph: str = "model", options: ort.SessionOptions | None = None, path: str | Path | None = None):
        """graph="probe" loads the keys-only graph (manifest.probe_file): no logits, faster prompt passes.
        `options` replaces the default session options (benchmarks/levers.py); `path` another graph file
        of the same model (an offline-optimized copy)."""
        self.directory = Path(directory)
        self.manifest: Manifest = load_manifest(self.directory)
        self.device_request, self.threads = device, threads
        if graph == "probe" and not self.manifest.probe_file:
            raise UnskillError(f"{self.directory}: no probe graph; add one with `unskill edit probe-graph`")
        path = Path(path) if path else self.directory / (
            self.manifest.probe_file if graph == "probe" else self.manifest.model_file)
        if not path.is_file():
            raise UnskillError(f"{path}: missing ONNX model")
        if options is None:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Errors only: onnxruntime warns at every load that the logits_to_keep default "appears in graph
            # inputs" -- which is the point (an input optimum and genai may leave out).
            options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=pick_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise UnskillError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        # An input with a default value is an "overridable initializer" to onnxruntime, not listed as input.
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.has_logits_to_keep = LOGITS_TO_KEEP in overridable or LOGITS_TO_KEEP in self.input_names
        self.output_names = {o.name for o in self.session.get_outputs()}
        wanted = self.manifest.key_last_outputs if graph == "probe" else self.manifest.key_outputs
        if self.manifest.target == "deploy":   # a serving folder: key.* and preact.* are gone by design
            wanted = self.manifest.key_last_outputs or []
        missing = [n for n in wanted if n not in self.output_names]
        if missing:
            raise UnskillError(f"{path}: graph lacks key outputs {missing[:3]}; re-export with `unskill export`")
        self.past_names = [n for n in self.input_names if n.startswith(PAST_PREFIX)]
        past_input = next(i for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX))
        self.kv_heads, self.head_dim = past_input.shape[1], past_input.shape[3]
        logits = [o.shape[-1] for o in self.session.get_outputs() if o.name == "logits"]
        self.vocab_size = (logits[0] if isinstance(logits[0], int) else 1 << 18) if logits else None
        self._check_token_ids(path)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._kept = self._kept_by_output(self.manifest)
        # Prompt passes hand the arena's growth back after the run: a long prompt's transient buffers would
        # otherwise stay reserved (and the arena grows chunk by chunk as the KV cache does). Decode steps
        # (one token) keep the arena: their buffers are reused every step.
        self.prompt_run_options = None
        if options.enable_cpu_mem_arena:   # (without an arena there is nothing to shrink, and onnxruntime refuses)
            self.prompt_run_options = ort.RunOptions()
            self.prompt_run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                         "cpu:0" if self.device == "cpu" else "cpu:0;gpu:0")
        self._key_only: OnnxLM | None = None

    def _check_token_ids(self, path: Path) -> None:
        """pad/eos/bos ids the embedding can look up (a bad pad id fails in onnxruntime's Gather otherwise)."""
        if not (self.vocab_size and self.vocab_size != 1 << 18):
            return
        m = self.manifest
        named = [("pad_token_id", m.pad_token_id), ("bos_token_id", m.bos_token_id)] + [
            ("eos_token_ids", i) for i in m.eos_token_ids]
        bad = [(name, i) for name, i in named if i is not None and i >= self.vocab_size]
        if bad:
            raise UnskillError(f"{self.directory / 'unskill.json'}: {bad[0][0]} {bad[0][1]} is outside the "
                               f"vocabulary of {self.vocab_size}")

    def key_only(self) -> "OnnxLM":
        """The same model on its keys-only probe graph where the export has one, else self."""
        if not self.manifest.probe_file or "logits" not in self.output_names:
            return self
        if self._key_only is None:
            self._key_only = OnnxLM(self.directory, self.device_request, self.threads, graph="probe")
        return self._key_only

    @staticmethod
    def _kept_by_output(manifest: Manifest) -> dict[str, np.ndarray]:
        if manifest.kept_neurons is None:
            return {}
        kept = [np.asarray(k, dtype=np.int64) for k in manifest.kept_neurons]
        outputs = (manifest.key_outputs, manifest.preact_outputs, manifest.key_last_outputs or [])
        return {name: kept[layer] for names in outputs for layer, name in enumerate(names)
                if len(kept[layer]) < manifest.key_width}

    def _full_width(self, name: str, value: np.ndarray) -> np.ndarray:
        """A pruned layer's output with zeros put back where the removed neurons were."""
        kept = self._kept.get(name)
        if kept is None:
            return value
        if value.shape[-1] != len(kept):   # a manifest edited apart from its graph
            raise UnskillError(f"{self.directory}: {name} has {value.shape[-1]} neurons but unskill.json's "
                               f"kept_neurons lists {len(kept)}; re-export or restore the manifest")
        full = np.zeros(value.shape[:-1] + (self.manifest.key_width,), dtype=value.dtype)
        full[..., kept] = value
        return full

    def empty_past(self, batch: int) -> dict[str, ort.OrtValue]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {name: ort.OrtValue.ortvalue_from_numpy(empty, self.device) for name in self.past_names}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, ort.OrtValue],
                extra_outputs: list[str] = (), all_logits: bool = False, logits: bool = True, reserve: int = 0,
                tail: int = 0) -> tuple[np.ndarray | None, dict[str, ort.OrtValue], dict[str, np.ndarray]]:
        """(logits of the last position [B, V], of all [B, S, V], or None when not wanted; next past;
        extra outputs as NumPy).

        When nothing per position is wanted (last-position logits, key_last.* outputs), a long input runs in
        chunks of PREFILL_CHUNK tokens continuing the KV cache, so attention scores and the full-sequence
        key outputs never exist for the whole prompt at once: peak memory then grows with the prompt only
        through the KV cache.

        reserve: positions to keep free after this input (the tokens a decode loop will add). On a
        GroupQueryAttention graph the returned past is then one buffer per layer with that room, which the
        following steps write into in place (past = present, IO binding) instead of copying the cache into a
        new present every step; pass it back as `past` as usual. Its length is the buffer's, not the
        cache's: the attention mask says how much of it is filled.

        tail: per-position outputs (key.*) are wanted at the last `tail` positions only (a guard rule over the
        prompt's last tokens): the input may then run in chunks too, the last one keeping those positions; the
        per-position outputs then cover the last chunk (at least `tail` positions, or the whole input).
        tail=EVERY_POSITION: per-position outputs at every input position; the input still runs in chunks, each
        chunk's per-position outputs kept and joined (keys, not attention scores, grow with the prompt). An
        in-graph guard that reads every position runs the prompt in one pass: its verdict is over the positions
        of one forward."""
        absent = [name for name in extra_outputs if name not in self.output_names]
        if absent:
            raise UnskillError(f"{self.directory}: the graph has no outputs {absent[:3]} (a deploy folder keeps "
                               "logits, present.* and key_last.* only; probe the full export)")
        width = input_ids.shape[1]
        done = attention_mask.shape[1] - width   # tokens already in the cache
        every = tail == EVERY_POSITION
        per_position = all_logits or (not 0 < tail <= PREFILL_CHUNK and not every
                                      and any(not self._is_last_only(n) for n in extra_outputs)) or (
            self.guard_every_position and any(name.startswith("guard.") for name in extra_outputs))
        # Without query_seqlens (the deploy target's GroupQueryAttention) onnxruntime refuses several rows
        # continuing a past with several new tokens each: such a batch is prefilled in one pass.
        one_pass = input_ids.shape[0] > 1 and not self.manifest.gqa_query_seqlens
        if per_position or width <= PREFILL_CHUNK or one_pass:
            buffered = reserve > 0 or self._is_buffer(past, done)
            shared = self.kv_buffer(past, done, attention_mask.shape[1] + reserve) if buffered else None
            return self._forward(input_ids, attention_mask, shared or past, extra_outputs, all_logits, logits,
                                 shared=shared is not None)
        shared = self.kv_buffer(past, done, attention_mask.shape[1] + reserve)
        starts = list(range(0, width, PREFILL_CHUNK))
        keep = max(tail, self.guard_positions if any(name.startswith("guard.") for name in extra_outputs) else 1)
        starts[-1] = min(starts[-1], width - keep)   # the last chunk holds every prompt position a guard reads
        joined: dict[str, list[np.ndarray]] = {}
        for start, end in zip(starts, [*starts[1:], width]):
            last_chunk = end == width
            out_logits, past, extras = self._forward(
                input_ids[:, start:end], attention_mask[:, :done + end], shared or past,
                extra_outputs if last_chunk or every else (), False, logits and last_chunk, shared=shared is not None)
            if every:
                for name, value in extras.items():
                    joined.setdefault(name, []).append(value)
            release_freed_memory()
        if every:   # per-position outputs of every chunk, in order; last-position ones from the last chunk
            extras = {name: np.concatenate(parts, axis=1) if not self._is_last_only(name) else parts[-1]
                      for name, parts in joined.items()}
        return out_logits, shared or past, extras

    def kv_buffer(self, past: dict[str, ort.OrtValue], done: int, total: int) -> dict[str, ort.OrtValue] | None:
        """One buffer per past tensor holding the whole prompt (`total` positions, the first `done` copied from
        `past`), for GroupQueryAttention graphs: each chunk writes its keys and values into it in place
        (past_present_share_buffer), so the cache is never held twice nor re-allocated chunk by chunk. When
        the last chunk is done the buffer is full, i.e. an ordinary past of `total` positions. None where the
        graph cannot share (optimum's Concat attention) or a device past would need a copy."""
        if self._is_buffer(past, done):
            if past[self.past_names[0]].shape()[2] >= total:
                return past   # a buffer from an earlier call with room left (forward's `reserve`), any device
            if self.device != "cpu":
                raise UnskillError(f"{total - done} new tokens exceed the KV buffer's room on {self.device}; "
                                   "reserve more in the prompt pass")
        if self.manifest.attention != "gqa" or (self.device != "cpu" and done):
            return None
        buffers = KVBuffer()
        for name in self.past_names:
            # onnxruntime-owned memory, not an OrtValue over a NumPy array: `.numpy()` of the latter is a view
            # that outlives the array (callers keep past.numpy() after dropping the OrtValue: read after free).
            shape = [past[name].shape()[0], self.kv_heads, total, self.head_dim]
            buffers[name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0)
            if done:   # (CPU only, above) the cache so far, then room for the prompt
                start = np.zeros(shape, dtype=np.float32)
                start[:, :, :done] = past[name].numpy()[:, :, :done]
                buffers[name].update_inplace(start)
        return buffers

    def _is_buffer(self, past: dict[str, ort.OrtValue], done: int) -> bool:
        """Whether `past` is a kv_buffer with room (longer than the `done` positions in it), not a cache."""
        return self.manifest.attention == "gqa" and past[self.past_names[0]].shape()[2] > done

    @property
    def guard_positions(self) -> int:
        """The most prompt positions a rule of the graph's guard reads (unskill.json guard.skills[].positions;
        statsfile.MAX_POSITIONS <= PREFILL_CHUNK, so the chunk before the last keeps tokens)."""
        return max([int(s.get("positions", 1)) for s in (self.manifest.guard or {}).get("skills", [])], default=1)

    @property
    def guard_every_position(self) -> bool:
        """Whether a rule of the graph's guard reads every prompt position (unskill.json guard.skills[].anywhere)."""
        return any(s.get("anywhere") for s in (self.manifest.guard or {}).get("skills", []))

    def _is_last_only(self, name: str) -> bool:
        return name in (self.manifest.key_last_outputs or []) or name.startswith("guard.")

    def _forward(self, input_ids, attention_mask, past, extra_outputs, all_logits, logits, shared=False):
        """One run. shared: `past` is a preallocated buffer (kv_buffer) bound as both past and present."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if "position_ids" in self.input_names:
            positions = np.cumsum(attention_mask, axis=1) - 1
            feeds["position_ids"] = np.maximum(positions, 0)[:, -input_ids.shape[1]:].astype(np.int64)
        if self.has_logits_to_keep:   # onnxruntime runs the LM head even when logits are not fetched
            feeds[LOGITS_TO_KEEP] = np.array([0 if logits and all_logits else 1], dtype=np.int64)
        ort_feeds = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feeds.items()}
        ort_feeds.update(past)   # the previous step's present tensors, passed on without a copy to NumPy
        present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        head = ["logits"] if logits else []
        options = self.prompt_run_options if input_ids.shape[1] > 1 else None
        if shared:
            values = self._run_in_place(ort_feeds, head, present_names, extra_outputs, options, past)
        else:
            values = self.session.run_with_ort_values([*head, *present_names, *extra_outputs], ort_feeds, options)
        out_logits = None
        if logits:
            out_logits = values[0].numpy() if all_logits else values[0].numpy()[:, -1, :]
        rest = values[len(head):]
        next_past = past if shared else dict(zip(self.past_names, rest[:len(present_names)]))   # shared: the same
        extras = {n: self._full_width(n, v.numpy()) for n, v in zip(extra_outputs, rest[len(present_names):])}
        return out_logits, next_past, extras

    def _run_in_place(self, feeds, head, present_names, extra_outputs, options, past=None) -> list[ort.OrtValue]:
        """run with IO binding: each present.* output is bound to its past buffer, so GroupQueryAttention
        writes the new keys and values into it (onnxruntime-genai's past_present_share_buffer)."""
        binding = self._binding_for(feeds, present_names, (*head, *extra_outputs), past)
        for name, value in feeds.items():   # rebinding a name replaces what it was bound to
            if not name.startswith(PAST_PREFIX):
                binding.bind_ortvalue_input(name, value)
        for name in (*head, *extra_outputs):   # a fresh output each run: callers keep views of the last one
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding, options)
        fetched = binding.get_outputs()[len(present_names):]   # in binding order: present.* first
        return [*fetched[:len(head)], *(feeds[PAST_PREFIX + n[len(PRESENT_PREFIX):]] for n in present_names),
                *fetched[len(head):]]

    def _binding_for(self, feeds, present_names, fetched: tuple[str, ...], past) -> ort.IOBinding:
        """The IO binding of the previous run on the same KVBuffer fetching the same outputs (the prompt and
        decode steps of one generation), else a new one with past and present bound to the buffer. Binding
        the 2 x layers past/present tensors anew every step cost 1-3 % of a SmolLM2 step (0.1-0.5 ms of
        13-16 ms; benchmarks/placement.py --profile). The binding lives on the buffer, so it goes
        with it (it holds the KV cache's OrtValues)."""
        if isinstance(past, KVBuffer) and past.binding is not None and past.fetched == fetched:
            return past.binding
        binding = self.session.io_binding()
        for name in self.past_names:
            binding.bind_ortvalue_input(name, feeds[name])
        for name in present_names:
            binding.bind_ortvalue_output(name, feeds[PAST_PREFIX + name[len(PRESENT_PREFIX):]])
        if isinstance(past, KVBuffer):
            past.binding, past.fetched = binding, fetched
        return binding
