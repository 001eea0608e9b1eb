"""Make the exported tokenizer.json behave like the original model's tokenizer.

transformers 4.57 builds GGUF tokenizers with a BOS-adding post-processor and a SentencePiece decoder
even for byte-level BPE (SmolLM2). We fix both so `tokenizers` alone encodes and decodes correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, processors

from unskill.runtime.errors import UnskillError


def fix_tokenizer(tokenizer: Tokenizer, add_bos: bool) -> Tokenizer:
    spec = json.loads(tokenizer.to_str())
    byte_level = (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
    if byte_level:
        tokenizer.decoder = decoders.ByteLevel()
    if not add_bos:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False) if byte_level else None
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str, where: str) -> int:
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise UnskillError(f"{where}: token {token!r} is not in the vocabulary")
    return idx


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> Path:
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    return path
