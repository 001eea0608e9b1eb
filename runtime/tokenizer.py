"""Prompt text -> token ids the way the model was trained to see it (chat template), and back."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

from tokenizers import Tokenizer

from .errors import UnskillError
from .manifest import Manifest


ROLES = ("system", "user", "assistant")


# A chat template comes with the model (unskill.json) and runs on every request: it must end fast and small
# whatever it holds. Jinja's sandbox stops attribute escapes, not work: these limits stop the rest.
RENDER_SECONDS = 2.0            # wall time of one rendering (checked at every template line and loop step)
RENDER_CHARS = 1 << 20          # characters one rendering may write
TEMPLATE_NUMBER = 1 << 20       # the largest number a template may pass to a call, *, ** or % (sizes, counts)
TEMPLATE_ITERATIONS = 100_000   # range() steps in one rendering, all loops together


class TemplateLimit(Exception):
    """A chat template ran past a limit."""


def _sandbox():
    """jinja2's ImmutableSandboxedEnvironment with limits on sizes and loop steps (Jinja's own MAX_RANGE
    allows 100,000 per range(), so two nested ones run 10^10 steps)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > TEMPLATE_NUMBER

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
            numbers = [v for v in (left, right) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if operator == "*" and sizes and numbers and max(sizes) * abs(numbers[0]) > TEMPLATE_NUMBER:
                raise TemplateLimit(f"a repetition of over {TEMPLATE_NUMBER} items")
            if (operator == "**" and any(abs(v) > 64 for v in numbers[1:])) or any(map(too_big, numbers)):
                raise TemplateLimit(f"a number over {TEMPLATE_NUMBER}")
            if operator == "%" and isinstance(left, str) and re.search(r"%[-+ #0]*\d{5,}", left):
                raise TemplateLimit("a format width over 9,999")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):   # noqa: N805 (jinja's own signature)
            if any(map(too_big, [*args, *kwargs.values()])):
                raise TemplateLimit(f"a number over {TEMPLATE_NUMBER} passed to a call")
            return super().call(__context, __obj, *args, **kwargs)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters = {name: _checked_filter(function, too_big) for name, function in env.filters.items()}
    return env


def _checked_filter(function, too_big):
    """A Jinja filter that refuses huge numbers (center(300000000), indent(...)) before it allocates."""
    import functools

    @functools.wraps(function)
    def checked(*args, **kwargs):
        if any(map(too_big, [*args, *kwargs.values()])):
            raise TemplateLimit(f"a number over {TEMPLATE_NUMBER} passed to a filter")
        return function(*args, **kwargs)
    return checked


class _Budget:
    """The running rendering's clock and loop-step count (per thread: the server renders on several)."""
    local = threading.local()

    @classmethod
    def step(cls, count: int = 1) -> None:
        state = getattr(cls.local, "state", None)
        if state is None:
            return
        state[1] += count
        if state[1] > TEMPLATE_ITERATIONS:
            raise TemplateLimit(f"over {TEMPLATE_ITERATIONS} loop steps")
        if time.monotonic() > state[0]:
            raise TemplateLimit(f"over {RENDER_SECONDS:g} s")


def _counted_range(*args):
    from jinja2.sandbox import safe_range

    for value in safe_range(*args):
        _Budget.step()
        yield value


def _trace_template(frame, event, arg):
    """sys.settrace hook while a template renders: checks the clock at every line of Jinja's compiled code
    (a loop over anything, a recursive macro) and leaves other code untraced."""
    if frame.f_code.co_filename != "<template>":
        return None

    def on_line(frame, event, arg):
        _Budget.step(0)
        return on_line
    return on_line


def render_limited(template, **context) -> str:
    """The template's text, or UnskillError in one line: any error inside it, a limit passed, or nothing written."""
    _Budget.local.state = [time.monotonic() + RENDER_SECONDS, 0]
    previous = sys.gettrace()
    sys.settrace(_trace_template)
    parts, size = [], 0
    try:
        for part in template.generate(**context):
            size += len(part)
            if size > RENDER_CHARS:
                raise TemplateLimit(f"over {RENDER_CHARS} characters")
            parts.append(part)
    except TemplateLimit as exc:
        raise UnskillError(f"the model's chat template ran past a limit: {exc}") from None
    except RecursionError:
        raise UnskillError("the model's chat template recursed too deeply") from None
    except (Exception, MemoryError) as exc:   # the template is the model's code: anything it raises is its failure
        message = str(exc).splitlines()[0][:160] if str(exc).strip() else ""
        raise UnskillError(f"the model's chat template failed on this prompt ({type(exc).__name__}: {message})") from None
    finally:
        sys.settrace(previous)
        _Budget.local.state = None
    text = "".join(parts)
    if not text.strip():
        raise UnskillError("the model's chat template rendered nothing for this prompt")
    return text


def _compile_template(template: str, where: str):
    """Chat templates are Jinja, run in jinja2's sandbox (as transformers runs them) with limits on time,
    loop steps and output size (render_limited)."""
    from jinja2.exceptions import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    env = _sandbox()
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _counted_range
    try:
        return env.from_string(template)
    except (TemplateError, RecursionError, MemoryError) as exc:
        raise UnskillError(f"{where}: the chat template is not valid Jinja ({str(exc).splitlines()[0][:160]})") from None


def check_messages(messages) -> list[dict]:
    """A chat as a list of {"role", "content"} with known roles and string content, else one clear error."""
    if not isinstance(messages, list) or not messages:
        raise UnskillError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UnskillError(f"message {number}: needs a role, one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UnskillError(f"message {number}: content must be a string")
    if messages[-1]["role"] != "user":
        raise UnskillError("the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # argv bytes that are not UTF-8 arrive as lone surrogates
        raise UnskillError(f"prompt is not valid UTF-8 text: {text[:40]!r}") from None
    return text


def messages_of(turns) -> list[dict]:
    """A conversation given as (role, text) pairs -> chat messages."""
    return [{"role": role, "content": text} for role, text in turns]


class TextTokenizer:
    def __init__(self, directory: str | Path, manifest: Manifest):
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise UnskillError(f"{path}: missing tokenizer")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:   # tokenizers raises a bare Exception for a truncated or foreign file
            raise UnskillError(f"{path}: not a valid tokenizer ({str(exc).splitlines()[0][:120]})") from None
        self.manifest = manifest
        where = Path(directory) / "unskill.json"
        self._template = _compile_template(manifest.chat_template, where) if manifest.chat_template else None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.manifest.chat_template)

    def render(self, prompt, chat: bool = True) -> str:
        """The exact text the model reads. prompt: a string (one user turn) or a list of chat messages;
        chat is ignored for models without a template (messages are then joined by blank lines)."""
        messages = check_messages(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
        if not chat or not self.has_chat_template:
            return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
        ids = self.manifest
        bos = self.tokenizer.id_to_token(ids.bos_token_id) if ids.bos_token_id is not None else ""
        eos = self.tokenizer.id_to_token(ids.eos_token_ids[0])
        return render_limited(self._template, messages=messages, add_generation_prompt=True, bos_token=bos or "",
                              eos_token=eos or "")

    def encode_prompt(self, prompt, chat: bool = True) -> list[int]:
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in check_messages(prompt)]
        for text in texts:
            check_text(text)
        if not "".join(texts).strip():
            raise UnskillError("empty prompt")
        templated = chat and self.has_chat_template
        # A chat template writes its own special tokens (BOS included), so the post-processor must not add more.
        return self.tokenizer.encode(self.render(prompt, chat), add_special_tokens=not templated).ids

    def render_turns(self, turns, chat: bool = True) -> str:
        """`render` of a conversation given as (role, text) pairs."""
        return self.render(messages_of(turns), chat)

    def encode_turns(self, turns, chat: bool = True) -> list[int]:
        """`encode_prompt` of a conversation given as (role, text) pairs."""
        return self.encode_prompt(messages_of(turns), chat)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
