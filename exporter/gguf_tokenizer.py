"""Build Gemma's tokenizer straight from a GGUF file, the way transformers 5 does.

transformers 4.57 reads a `tokenizer.ggml.model == "llama"` GGUF without merges as a Unigram model,
which tokenizes Gemma 3 text differently from the real model. transformers 5 builds a SentencePiece-style
BPE instead, but it cannot sit beside optimum-onnx (<4.58), so this module rebuilds that BPE with
`gguf` and `tokenizers` alone. Ids match transformers 5.x's `GemmaTokenizer` for the same file.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# llama.cpp token types (gguf.TokenType): CONTROL are special tokens, USER_DEFINED are added but not special.
CONTROL, USER_DEFINED = 3, 4


def read_gguf_tokenizer(path: str | Path) -> dict:
    """The `tokenizer.ggml.*` metadata as plain Python values, keys without the prefix.

    Decodes fields from `parts`/`data` by hand rather than `ReaderField.contents()`, which older
    `gguf` releases (the project allows >=0.10) do not have.
    """
    from gguf import GGUFReader, GGUFValueType

    prefix = "tokenizer.ggml."
    meta = {}
    for name, field in GGUFReader(str(path)).fields.items():
        if not name.startswith(prefix):
            continue
        kind = field.types[-1]
        values = [field.parts[i] for i in field.data]
        if kind == GGUFValueType.STRING:
            values = [bytes(v).decode("utf-8") for v in values]
        else:
            values = [v.tolist()[0] for v in values]
        meta[name[len(prefix):]] = values if field.types[0] == GGUFValueType.ARRAY else values[0]
    return meta


def respell_spaces(tokens: list[str]) -> list[str]:
    """Gemma GGUFs store runs of spaces ("  ") with real spaces, but the normalizer turns text spaces into
    '▁', so those tokens could never match; spell them as '▁' runs (transformers 5 does the same)."""
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]


def derive_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by the vocabulary: every split of a token into two vocabulary pieces.

    Gemma GGUFs carry no merges, and their scores do not follow merge order, so merges are ranked by the
    position of the merged token in the file (earlier is stronger), then by the longer left piece first.
    This is `transformers.tokenization_utils_base.generate_merges` with positions as scores, as in
    transformers 5's `gemma_tokenizer` GGUF builder.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [
        (vocab[token], -cut, token[:cut], token[cut:])
        for token in vocab
        for cut in range(1, len(token))
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def gemma_tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to `AutoTokenizer.from_pretrained(dir, gguf_file=...)` under
    transformers 5 for a Gemma 3 GGUF (its recipe for all Gemma 1-3 files): byte-fallback BPE over the whole text with spaces as '▁',
    CONTROL tokens special, USER_DEFINED tokens (newline/tab/space runs, HTML tags) added whole,
    and <bos> prepended when the file says `add_bos_token` (<eos> appended for `add_eos_token`)."""
    meta = read_gguf_tokenizer(path)
    raw = meta["tokens"]
    tokens = respell_spaces(raw)
    merges = meta.get("merges")
    merges = [tuple(m.split(" ")) for m in merges] if merges else derive_merges(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = raw[meta["unknown_token_id"]] if "unknown_token_id" in meta else "<unk>"

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                              dropout=None))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    # A no-op after the normalizer (no ' ' is left), kept so the saved JSON equals transformers 5's.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])

    types = meta.get("token_type") or []
    # Without these, '<start_of_turn>' or '\n\n' would be cut into pieces instead of staying one id.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(raw, types) if kind == CONTROL])
    # Only tokens spelled as in the vocabulary: the respelled space runs are reached through merges instead.
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(raw, types) if kind == USER_DEFINED and t in vocab])

    # Same template transformers 5 writes (update_post_processor), so pair type ids match as well.
    # A file without the flag gets <bos>, as llama.cpp and transformers do for SentencePiece vocabularies.
    bos = raw[meta["bos_token_id"]] if meta.get("add_bos_token", True) and "bos_token_id" in meta else None
    eos = raw[meta["eos_token_id"]] if meta.get("add_eos_token", False) and "eos_token_id" in meta else None
    single = " ".join(filter(None, [bos and f"{bos}:0", "$A:0", eos and f"{eos}:0"]))
    pair = " ".join(filter(None, [single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1"]))
    specials = [(token, tokenizer.token_to_id(token)) for token in (bos, eos) if token]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tokenizer
