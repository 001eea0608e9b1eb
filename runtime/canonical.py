"""The guard's second look: a garbled prompt is also checked in a repaired (canonical) spelling.

Why: the Best-of-N attacker (Hughes et al., 2024; evals/attack.py) resamples random capitalization, shuffled
middle letters and one-code-point character noise of the same request until the key at the prompt leaves the
skill's region. A capable model still reads the garbled request; a 135M model's keys do not. Fitting on such
noise (stats/augment.py "bon") narrows the gap, but the region cannot hold every sample: on SmolLM2's coding guard
67 % of requests got through within 50 samples. Undoing the three perturbations in text is cheap and does not
depend on the attacker's seeds: a word that is not in the model's own vocabulary is mapped back to the vocabulary
word with the same first and last letter and the same middle letters (scrambling), or one character one code point
away (noise); odd casing is lower-cased; a "!" between two letters reads as the space it came from (a space moved
one up). The guard then checks both spellings and refuses if either is in the skill's region
(`second_look`).

A prompt whose words are all spelled and cased as usual gets no second look (no extra forward): only prompts
that read as garbled pay one more keys-only prefill. The dictionary is the tokenizer's own whole-word tokens
(the ones with a leading-space marker, ASCII letters only), in id order (BPE merges come in frequency order, so
an ambiguous repair picks the commoner word). What it does not undo: other obfuscations (leetspeak, homoglyphs
outside NFKC, translation); an attacker who knows this layer moves to those. The in-graph guard (exporter/
guard_graph.py) sees tokens only: this layer lives in the Python runtime (Generator, the server's engine) and in
the evals that measure it.
"""

from __future__ import annotations

import re
import unicodedata
import weakref
from dataclasses import astuple, dataclass

SPACE_MARKERS = ("Ġ", "▁")          # byte-level BPE (GPT-2, Llama-3, SmolLM2) and SentencePiece (Gemma)
_CHUNK = re.compile(r"(\s+)")
_SPLIT = re.compile(r"^([^A-Za-z]*)(.*?)([^A-Za-z]*)$", re.S)   # leading marks, the word's core, trailing marks
_RUNS = re.compile(r"([A-Za-z]+)")
DISGUISED = {"@": "a", "`": "a"}      # a lone "a" moved one down by noise
MAX_WORD = 20        # longer letter runs are left as written (no repair search)
MAX_REPAIRS = 512    # distinct words repaired per text, from its end (bounded time on any prompt)
MAX_UNKNOWN = 12     # % of words neither known nor repairable above which a text reads as another language


class Lexicon:
    """The words a tokenizer knows whole, for repairing garbled spellings."""

    def __init__(self, words: list[str]):
        self.words = set(words)
        # three keys, strictest first: scrambling keeps the first and last letter; a word with a mark after it
        # ("dictionary.") was scrambled with the mark as its last character, one after a mark with it as its first
        self.indexes: tuple[dict, ...] = ({}, {}, {})
        for word in words:   # commonest first: the first word of a key wins
            for index, key in zip(self.indexes, keys_of(word)):
                index.setdefault(key, word)

    @classmethod
    def from_vocab(cls, vocab: dict[str, int]) -> "Lexicon":
        words, seen = [], set()
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            word = token[1:].lower() if token[:1] in SPACE_MARKERS else ""
            if len(word) >= 2 and word.isascii() and word.isalpha() and word not in seen:
                seen.add(word)
                words.append(word)
        return cls(words)

    def repair(self, word: str) -> str:
        """The vocabulary word `word` (ASCII letters) most likely came from, lower-cased; itself if none.
        Tried in turn: as written, then with one and (6 to 12 letters) two letters moved back one code point
        (noise), each also unscrambled by the strict key; then the looser keys (as written and one letter
        moved). Longer runs are no word a scrambler could have started from: left as written."""
        low = word.lower()
        if low in self.words or not 3 <= len(low) <= MAX_WORD:
            return low
        strict, first_kept, letters = self.indexes
        for moves in (0, 1, 2) if 6 <= len(low) <= 12 else (0, 1):
            for candidate in moved(low, moves):
                found = candidate if candidate in self.words else strict.get(keys_of(candidate)[0])
                if found:
                    return found
        for moves in (0, 1):
            for candidate in moved(low, moves):
                keys = keys_of(candidate)
                found = first_kept.get(keys[1]) or letters.get(keys[2])
                if found:
                    return found
        return low


def keys_of(word: str) -> tuple:
    """(first + sorted middle + last, first + sorted rest, sorted letters): what scrambling keeps."""
    return ((word[0], "".join(sorted(word[1:-1])), word[-1]) if len(word) > 3 else (word,),
            (word[0], "".join(sorted(word[1:]))), "".join(sorted(word)))


def moved(word: str, moves: int):
    """Spellings of `word` with `moves` letters each moved one code point (noise undone), letters only."""
    if moves == 0:
        yield word
        return
    for i in range(len(word)):
        for shifted in (chr(ord(word[i]) - 1), chr(ord(word[i]) + 1)):
            if "a" <= shifted <= "z":
                once = word[:i] + shifted + word[i + 1:]
                if moves == 1:
                    yield once
                else:
                    for j in range(i + 1, len(word)):
                        for again in (chr(ord(once[j]) - 1), chr(ord(once[j]) + 1)):
                            if "a" <= again <= "z":
                                yield once[:j] + again + once[j + 1:]


def odd_case(word: str) -> bool:
    """Cased other than lower, Title or UPPER (random capitalization: "wRiTe")."""
    return len(word) > 1 and word not in (word.lower(), word.upper(), word[0].upper() + word[1:].lower())


@dataclass
class Spelling:
    """What a text's words look like: ASCII words of three or more letters; of those, oddly cased ones, ones
    repaired to a vocabulary word and ones neither known nor repairable."""
    words: int = 0
    odd: int = 0
    repaired: int = 0
    unknown: int = 0

    def add(self, other: "Spelling") -> "Spelling":
        return Spelling(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def garbled(self) -> bool:
        """Random capitalization (one word in ten or more oddly cased), or scrambled and noised English (one word in
        ten or more repaired while almost every word is known or repairable: German or Spanish prose leaves a
        third of its words unknown, garbled English 3 %); two words at least, so a name alone costs nothing."""
        if self.odd >= 2 and self.odd * 10 >= self.words:
            return True
        english = self.unknown * 100 <= self.words * MAX_UNKNOWN
        return self.repaired >= 2 and self.repaired * 10 >= self.words and english


def canonical_text(text: str, lexicon: Lexicon, budget: int = MAX_REPAIRS) -> tuple[str, Spelling]:
    """(the repaired spelling of text, lower-cased; what its words look like). Words are repaired from the end
    (where the guard reads), `budget` distinct ones at most, so a long prompt of made-up words costs bounded time;
    the rest are lower-cased as written. A chunk with non-ASCII letters (another script, accents) is left as
    written: the noise moves ASCII characters only."""
    chunks = _CHUNK.split(unicodedata.normalize("NFKC", text))
    repaired: dict[str, str] = {}
    seen = Spelling()
    for at in range(len(chunks) - 1, -1, -1):
        chunk = chunks[at]
        if not chunk or chunk.isspace() or not chunk.isascii():
            continue
        lead, core, trail = _SPLIT.match(DISGUISED.get(chunk, chunk)).groups()
        core = re.sub(r"(?<=[A-Za-z])!(?=[A-Za-z])", " ", core)   # a space moved one up
        pieces = _RUNS.split(core)
        for i, piece in enumerate(pieces):
            if piece.isalpha():
                low = piece.lower()
                if low not in repaired and len(repaired) < budget:
                    repaired[low] = lexicon.repair(piece)
                fixed = repaired.get(low, low)
                if len(low) >= 3:
                    seen.words += 1
                    seen.odd += odd_case(piece)
                    seen.repaired += fixed != low
                    seen.unknown += fixed == low and low not in lexicon.words
                pieces[i] = fixed
        chunks[at] = lead + "".join(pieces) + trail
    return "".join(chunks).lower(), seen


def canonical_prompt(prompt, lexicon: Lexicon):
    """The repaired copy of a prompt (a string, or chat messages: every turn's content), or None when it does not
    read as garbled."""
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    fixed = [canonical_text(text, lexicon) for text in texts]
    seen = Spelling()
    for _, spelling in fixed:
        seen = seen.add(spelling)
    if not seen.garbled():
        return None
    if isinstance(prompt, str):
        return fixed[0][0]
    return [dict(message, content=text) for message, (text, _) in zip(prompt, fixed)]


_LEXICONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def lexicon_of(tokenizer) -> Lexicon:
    """The Lexicon of a TextTokenizer, built once per tokenizer: every second look of a Generator, the server and
    the evals reads the same one (a large vocabulary takes a while to sort and index)."""
    if tokenizer not in _LEXICONS:
        _LEXICONS[tokenizer] = Lexicon.from_vocab(tokenizer.tokenizer.get_vocab())
    return _LEXICONS[tokenizer]


class SecondLook:
    """Which prompts get a second look, and their repaired copies. Generator.prompt_hits runs the copies through
    the prompt's own forward and check; `keys` reads what a NumPy guard (runtime/ksd.py KSDGuard) sees at them,
    for the evals that score the runtime's decision."""

    def __init__(self, model, tokenizer, guard=None, batch_size: int = 8):
        self.model, self.tokenizer, self.guard, self.batch_size = model, tokenizer, guard, batch_size

    def copies(self, prompts) -> list:
        """Per prompt its canonical copy, or None (no second look)."""
        return [canonical_prompt(prompt, lexicon_of(self.tokenizer)) for prompt in prompts]

    def keys(self, prompts, chat: bool):
        """(rows with a copy, what the guard sees at those copies' prompt: keys, mask), or None when no prompt
        needs a second look."""
        from .keys import guard_prompt_keys

        copies = self.copies(prompts)
        rows = [i for i, copy in enumerate(copies) if copy is not None]
        if not rows:
            return None
        keep = self.model.manifest.max_context - 1
        sequences = [self.tokenizer.encode_prompt(copies[i], chat)[-keep:] for i in rows]
        keys, mask = guard_prompt_keys(self.model, self.guard, sequences, self.batch_size, desc="second look")
        return rows, keys, mask

    def refused(self, prompts, chat: bool) -> dict:
        """Per prompt whether it got a second look and whether its copy is refused (the evals' record)."""
        looked = [False] * len(prompts)
        refused = [False] * len(prompts)
        seen = self.keys(prompts, chat)
        if seen is not None:
            rows, keys, mask = seen
            for row, hit in zip(rows, self.guard.check(keys, mask)):
                looked[row], refused[row] = True, hit is not None
        return {"looked": looked, "refused": refused}


__all__ = ["Lexicon", "SecondLook", "Spelling", "canonical_prompt", "canonical_text", "lexicon_of"]
