"""A GGUF byte-level vocabulary splits text as its ``tokenizer.ggml.pre`` says (Llama 3's digit groups of three,
Qwen2's single digits, a leading non-letter joining a word), checked on hand-made merges and against
transformers' own GGUF tokenizer conversion."""

from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers

from appliance.model.tokenizer import _bpe_from_pieces

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["1 2", "12 3", "123 4", "h e", "he l", "hel l", "hell o", "( hello"]
VOCAB = ALPHABET + ["12", "123", "1234", "he", "hel", "hell", "hello", "(hello"]
TEXT = "1234 (hello"


def pieces(pre: str) -> list[str]:
    tok = _bpe_from_pieces(VOCAB, MERGES, [], pre)
    return tok.encode(TEXT, add_special_tokens=False).tokens


@pytest.mark.parametrize("pre,want", [
    ("llama-bpe", ["123", "4", "Ġ", "(", "hello"]),  # \p{N}{1,3}; " (" is its own run (no merge), then "hello"
    ("qwen2", ["1", "2", "3", "4", "Ġ", "(", "hello"]),  # \p{N}: one digit each
    ("default", ["1234", "Ġ", "(", "hello"]),  # GPT-2: digits in one run
    ("smollm", ["1", "2", "3", "4", "Ġ", "(", "hello"]),
])
def test_gguf_pre_tokenizer_splits(pre, want) -> None:
    assert pieces(pre) == want


def test_a_leading_non_letter_joins_the_word_on_llama3() -> None:
    tok = _bpe_from_pieces(VOCAB, MERGES, [], "llama-bpe")
    assert tok.encode("(hello", add_special_tokens=False).tokens == ["(hello"]
    gpt2 = _bpe_from_pieces(VOCAB, MERGES, [], "default")
    assert gpt2.encode("(hello", add_special_tokens=False).tokens == ["(", "hello"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_same_ids_as_transformers_gguf_tokenizer(pre) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    ref, _ = convert_gguf_tokenizer("llama", {"tokenizer_type": "gpt2", "tokens": VOCAB, "merges": MERGES,
                                              "pre_tokenizer_type": pre, "token_type": [1] * len(VOCAB)})
    ours = _bpe_from_pieces(VOCAB, MERGES, [], pre)
    for text in (TEXT, "(hello 12 1234567 he's\n\n  hello", "x1234y"):
        assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids
