"""Prompt text -> token ids the way the model was trained to see it (chat template), and back."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import UnskillError
from .manifest import Manifest


def _compile_template(template: str):
    """Chat templates are Jinja, run sandboxed the way transformers runs them."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class TextTokenizer:
    def __init__(self, directory: str | Path, manifest: Manifest):
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise UnskillError(f"{path}: missing tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.manifest = manifest
        self._template = _compile_template(manifest.chat_template) if manifest.chat_template else None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.manifest.chat_template)

    def render(self, prompt: str, chat: bool = True) -> str:
        """The exact text the model reads; chat is ignored for models without a template."""
        return self.render_turns((("user", prompt),), chat)

    def render_turns(self, turns, chat: bool = True) -> str:
        """A conversation of (role, text) turns ending with the user's; without a template, the texts
        joined by blank lines."""
        if not chat or not self.has_chat_template:
            return "\n\n".join(text for _, text in turns)
        ids = self.manifest
        bos = self.tokenizer.id_to_token(ids.bos_token_id) if ids.bos_token_id is not None else ""
        eos = self.tokenizer.id_to_token(ids.eos_token_ids[0])
        messages = [{"role": role, "content": text} for role, text in turns]
        return self._template.render(messages=messages, add_generation_prompt=True, bos_token=bos or "",
                                     eos_token=eos or "")

    def encode_turns(self, turns, chat: bool = True) -> list[int]:
        """Token ids of a conversation, as `encode_prompt` encodes a single user turn."""
        if not turns or not turns[-1][1].strip():
            raise UnskillError("empty prompt")
        templated = chat and self.has_chat_template
        return self.tokenizer.encode(self.render_turns(turns, chat), add_special_tokens=not templated).ids

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        # A chat template writes its own special tokens (BOS included), so the post-processor must not add more.
        return self.encode_turns((("user", prompt),), chat)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
