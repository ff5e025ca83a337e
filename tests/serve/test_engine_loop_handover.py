"""The engine thread hands a step's events to the asyncio loop in one call, not one per request and token
(each ``call_soon_threadsafe`` takes a lock and writes the loop's wake-up pipe), and every stream still gets
its own events in order: tokens, then ``done``."""

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

PROMPTS = [list(range(10, 21)), list(range(30, 39)), list(range(50, 63))]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


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
                for i, prompt in enumerate(PROMPTS):
                    engine.add_request(prompt, PARAMS, request_id=f"r{i}")

            queues = [loop.open_stream(f"r{i}") for i in range(len(PROMPTS))]
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
