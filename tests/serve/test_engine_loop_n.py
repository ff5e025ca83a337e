"""n samples through a worker's engine loop (tiny model): every sample's tokens carry its index, each
sample ends with its own finish event, ``done`` comes once after the last, reporting the prompt's own
cache hit; aborting mid-way ends every sample and leaves no page behind."""

from __future__ import annotations

import asyncio

import pytest

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Error, Event
from tests.engine.faults import assert_idle as idle

PROMPT = list(range(10, 31))  # 21 tokens: five full pages of 4 and one token
PARAMS = SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, n=3)


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=128))


async def drain(q: asyncio.Queue[Event]) -> list[Event]:
    out = []
    while True:
        ev = await asyncio.wait_for(q.get(), 60)
        out.append(ev)
        if isinstance(ev, (Done, Error)):
            return out


def test_samples_stream_with_their_index_and_done_comes_last(engine) -> None:
    async def scenario() -> list[Event]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            return await drain(loop.submit("r", PROMPT, PARAMS))
        finally:
            loop.stop()

    evs = asyncio.run(scenario())
    assert isinstance(evs[-1], Done) and evs[-1].prompt_tokens == len(PROMPT) and evs[-1].cached_tokens == 0
    for i in range(3):
        mine = [e for e in evs[:-1] if e.index == i]
        assert sum(len(e.token_ids) for e in mine) == 5
        assert [e.finish_reason for e in mine if e.finish_reason] == ["length"] and mine[-1].finish_reason
    idle(engine)


def test_an_abort_ends_every_sample(engine) -> None:
    async def scenario() -> None:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            q = loop.submit("s", PROMPT, SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True, n=3))
            seen: set[int] = set()
            while seen != {0, 1, 2}:
                seen.add((await asyncio.wait_for(q.get(), 60)).index)
            loop.abort("s")
            await loop.call(lambda: None)
            assert not loop.open_samples
        finally:
            loop.stop()

    asyncio.run(scenario())
    idle(engine)


def test_the_engine_thread_enters_the_engines_device(engine, monkeypatch) -> None:
    """The thread that steps the engine makes the engine's device its current one before any step (a new
    thread starts on cuda:0, where Triton would launch an engine's kernels bound to another GPU)."""
    import threading

    import appliance.serve.engine_loop as engine_loop

    entered: list[tuple[str, object]] = []
    monkeypatch.setattr(engine_loop, "enter_device", lambda d: entered.append((threading.current_thread().name, d)))

    async def scenario() -> list[Event]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            return await drain(loop.submit("r", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True)))
        finally:
            loop.stop()

    assert isinstance(asyncio.run(scenario())[-1], Done)
    assert entered == [("pdbox-engine", engine.runner.device)]
    idle(engine)
