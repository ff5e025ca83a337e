"""A worker's engine loop (tiny model). n samples: every sample's tokens carry its index, each sample ends
with its own finish event, ``done`` comes once after the last, reporting the prompt's own cache hit;
aborting mid-way ends every sample and leaves no page behind. A step's events reach the asyncio loop in
one hand-over (one ``call_soon_threadsafe``, which takes a lock and writes the loop's wake-up pipe), not one
per request and token, each stream's still in order."""

from __future__ import annotations

import asyncio

import pytest

import appliance.serve.engine_loop as engine_loop
from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Error, Event, Tokens
from tests.engine.faults import assert_idle as idle

PROMPT = list(range(10, 31))  # 21 tokens: five full pages of 4 and one token
PARAMS = SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, n=3)
TOGETHER = [list(range(10, 21)), list(range(30, 39)), list(range(50, 63))]  # three requests, one command
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


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


def test_a_steps_events_reach_the_loop_in_one_hand_over(engine, monkeypatch) -> None:
    batches: list[list[tuple[asyncio.Queue, Event]]] = []
    deliver = engine_loop._deliver

    def counted(batch):
        batches.append(list(batch))
        deliver(batch)

    monkeypatch.setattr(engine_loop, "_deliver", counted)

    async def scenario() -> list[list[Event]]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            def add_all() -> None:  # one command: the three requests are scheduled in the same steps
                for i, prompt in enumerate(TOGETHER):
                    engine.add_request(prompt, GREEDY, request_id=f"r{i}")

            queues = [loop.open_stream(f"r{i}") for i in range(len(TOGETHER))]
            await loop.call(add_all)
            return [await drain(q) for q in queues]
        finally:
            loop.stop()

    streams = asyncio.run(scenario())
    for evs in streams:  # each stream: its six tokens in order, then done
        assert all(isinstance(e, Tokens) for e in evs[:-1]) and isinstance(evs[-1], Done)
        assert sum(len(e.token_ids) for e in evs[:-1]) == 6
    events = sum(len(b) for b in batches)
    assert events == sum(len(evs) for evs in streams)
    # the decode steps carry the three requests' tokens together: one hand-over for three events
    assert max(len({id(q) for q, _ in b}) for b in batches) == 3
    assert len(batches) < events / 2
    idle(engine)
