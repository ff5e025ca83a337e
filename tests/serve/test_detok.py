"""Incremental detokenization equals decoding everything at once, with the real tokenizer.

Streams are fed in chunks of random sizes; text with multi-byte characters (split across byte-level
tokens), stop strings anywhere (also across chunk boundaries), and random token ids.
"""

from __future__ import annotations

import random

import pytest

from appliance.model.loader import load_tokenizer
from appliance.serve.detok import IncrementalText

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé façade — naïve café; 日本語のテキスト; emoji 🎉🚀 and 👩‍👩‍👧 families.",
    "def f(x):\n    return x * 2  # code\n\n\tindented\n",
    "   leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def tok(smollm_path):
    return load_tokenizer(smollm_path)[0]


def stream(tok, ids: list[int], stop: tuple[str, ...], rng: random.Random, min_tokens: int = 0) -> str:
    inc = IncrementalText(tok, stop, min_tokens)
    out, i = [], 0
    while i < len(ids) and not inc.stopped:
        n = 1 if min_tokens else rng.choice([1, 1, 1, 2, 3, 7])  # with min_tokens: a token an event, as served
        out.append(inc.feed(ids[i : i + n]))
        i += n
    out.append(inc.finish())
    return "".join(out)


def reference(tok, ids: list[int], stop: tuple[str, ...], min_tokens: int = 0) -> str:
    """The whole text cut at the first stop string that starts after the first min_tokens - 1 tokens' text."""
    text = tok.decode(ids)
    start = len(tok.decode(ids[:min_tokens - 1])) if min_tokens > 1 else 0
    cut = min((i for i in (text.find(s, start) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_whole_decode(tok, text: str) -> None:
    ids = tok.encode(text)
    for seed in range(5):
        assert stream(tok, ids, (), random.Random(seed)) == tok.decode(ids)


@pytest.mark.parametrize("stop", [("fox",), ("lazy dog", "quick"), ("🚀",), ("\n\n",), ("café; 日本",)])
def test_stop_strings_cut_exactly(tok, stop: tuple[str, ...]) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        for seed in range(5):
            assert stream(tok, ids, stop, random.Random(seed)) == reference(tok, ids, stop), (text, stop, seed)


def test_random_token_ids(tok) -> None:
    rng = random.Random(7)
    for _ in range(40):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 80))]
        assert stream(tok, ids, (), rng) == tok.decode(ids)


def test_no_text_is_released_before_it_is_stable(tok) -> None:
    ids = tok.encode("a 🎉 b")
    inc = IncrementalText(tok, ("b!",))
    released = "".join(inc.feed([t]) for t in ids)
    assert "\ufffd" not in released
    assert not released.endswith("b")  # may still grow into the stop string "b!"
    assert released + inc.finish() == "a 🎉 b"


@pytest.mark.parametrize("min_tokens", [0, 1, 2, 5, 12])
def test_min_tokens_holds_stop_strings_off_until_the_answer_is_long_enough(tok, min_tokens: int) -> None:
    text = "one, two, three, four, five, six, seven, eight"
    ids = tok.encode(text)
    got = stream(tok, ids, (",",), random.Random(0), min_tokens)
    assert got == reference(tok, ids, (",",), min_tokens)
    if min_tokens <= 2:
        assert got == "one"  # the first comma ends it
    if min_tokens == 12:
        assert len(got) > len("one, two, three")  # held past the first commas
