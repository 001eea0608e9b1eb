"""Prompt text -> token ids the way the model was trained to see it (chat template), and back."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import UnskillError
from .manifest import Manifest


ROLES = ("system", "user", "assistant")


def _compile_template(template: str, where: str):
    """Chat templates are Jinja, run sandboxed the way transformers runs them."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise UnskillError(f"{where}: the chat template is not valid Jinja ({exc})") from None


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
        from jinja2.exceptions import TemplateError

        ids = self.manifest
        bos = self.tokenizer.id_to_token(ids.bos_token_id) if ids.bos_token_id is not None else ""
        eos = self.tokenizer.id_to_token(ids.eos_token_ids[0])
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=bos or "",
                                         eos_token=eos or "")
        except (TemplateError, TypeError, ValueError) as exc:
            raise UnskillError(f"the model's chat template failed on this prompt ({exc})") from None

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
        return self.render([{"role": role, "content": text} for role, text in turns], chat)

    def encode_turns(self, turns, chat: bool = True) -> list[int]:
        """`encode_prompt` of a conversation given as (role, text) pairs."""
        return self.encode_prompt([{"role": role, "content": text} for role, text in turns], chat)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
