"""Shared fixtures for the bench tests: a stand-in tokenizer and an in-thread fake server."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from bench.workloads import Corpus, PromptBuilder, TextCodec, corpus_text

HERE = Path(__file__).parent


class WordTokenizer:
    """Stand-in tokenizer: a token is a run of word characters, of whitespace, or one other character.

    Decoding is exact, but a cut window can re-encode to fewer tokens (two whitespace runs merge),
    which is the seam behaviour a real BPE tokenizer has too.
    """

    _pattern = re.compile(r"\w+|\s+|[^\w\s]")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._pattern.findall(text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.pieces)
                self.pieces.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


@pytest.fixture(scope="session")
def codec() -> TextCodec:
    tok = WordTokenizer()
    return TextCodec(encode=tok.encode, decode=tok.decode, name="word-standin")


@pytest.fixture(scope="session")
def corpus(codec: TextCodec) -> Corpus:
    return Corpus(corpus_text(), codec)


@pytest.fixture(scope="session")
def builder(codec: TextCodec, corpus: Corpus) -> PromptBuilder:
    return PromptBuilder(codec, corpus)


class ThreadServer:
    """Runs an aiohttp app on 127.0.0.1 with an OS-assigned port, on its own loop in a thread."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def fake_server() -> Iterator[ThreadServer]:
    from tests.bench.fake_server import make_app

    with ThreadServer(make_app()) as server:
        yield server
