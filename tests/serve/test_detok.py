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


def stream(tok, ids: list[int], stop: tuple[str, ...], rng: random.Random) -> str:
    inc = IncrementalText(tok, stop)
    out, i = [], 0
    while i < len(ids) and not inc.stopped:
        n = rng.choice([1, 1, 1, 2, 3, 7])
        out.append(inc.feed(ids[i : i + n]))
        i += n
    out.append(inc.finish())
    return "".join(out)


def reference(tok, ids: list[int], stop: tuple[str, ...]) -> str:
    text = tok.decode(ids)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
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
