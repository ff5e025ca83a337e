"""Moving a decoding request between two engines (the worker's engine loops, the shm transport, a tiny
model): the tokens go on exactly as on one engine, bad moves are refused and leave the request be,
and no page leaks on either side."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import pytest

from appliance.config import EngineConfig
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Event, First, Moved, Tokens
from appliance.serve.worker import Worker
from appliance.serve.worker_config import WorkerConfig
from tests.engine.reference import NaiveLlama

PROMPT = [5 + (i * 11) % 250 for i in range(37)]
STEPS = 24
PARAMS = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)


def worker(model: str, name: str) -> Worker:
    w = Worker(WorkerConfig(role="auto", name=name, model=model, transport="shm",
                            run_id=f"move-{secrets.token_hex(4)}",
                            engine=EngineConfig(dtype="float32", page_size=4, num_pages=128)))
    w.build_engine()
    return w


@contextlib.asynccontextmanager
async def loops(*workers: Worker) -> AsyncIterator[list[EngineLoop]]:
    """Each worker's engine loop, started; stopped on the way out."""
    aio = asyncio.get_running_loop()
    started = [EngineLoop(w.engine, aio, w.transport) for w in workers]
    for loop in started:
        loop.start()
    try:
        yield started
    finally:
        for loop in started:
            loop.stop()


async def until(q: asyncio.Queue[Event], kinds: tuple[type, ...], timeout_s: float = 30.0) -> list[Event]:
    """Events from ``q`` up to and including the first of ``kinds`` (event classes)."""
    out = []
    while True:
        ev = await asyncio.wait_for(q.get(), timeout_s)
        out.append(ev)
        if isinstance(ev, kinds):
            return out


def tokens(events: list[Event]) -> list[int]:
    return [t for ev in events if isinstance(ev, (Tokens, First)) for t in ev.token_ids]


@pytest.fixture(scope="module")
def pair(tiny_model):
    a, b = worker(str(tiny_model), "a"), worker(str(tiny_model), "b")
    yield a, b
    for w in (a, b):
        w.handoff.close()
        w.engine.shutdown()


def idle(w: Worker) -> bool:
    w.engine.cache.reset()
    return w.engine.pool.num_free == w.engine.pool.num_pages and not w.engine.requests


async def move_midway(la: EngineLoop, lb: EngineLoop, b: Worker) -> tuple[list[Event], list[Event]]:
    """Start PROMPT on ``la``, move it to ``lb`` after 8 tokens; the events on each side."""
    qa = la.submit("r", PROMPT, PARAMS)
    before: list[Event] = []
    while len(tokens(before)) < 8:
        before += await until(qa, (Tokens,))
    # the destination reserves room for more than the router saw: tokens go on meanwhile
    qb = lb.open_stream("r")
    pages = await lb.call(lambda: lb.reserve("r", "room-r", PROMPT, PARAMS, 1, 10.0,
                                             reserve_tokens=len(PROMPT) + 8 + 16))
    await la.call(lambda: la.move_out("r", "room-r", [b.handle_json], pages))
    before += await until(qa, (Moved,))
    return before, await until(qb, (Done,))


def test_a_request_moved_mid_decode_goes_on_with_the_same_tokens(pair, tiny_model) -> None:
    a, b = pair
    expected = NaiveLlama(str(tiny_model)).greedy(PROMPT, STEPS)

    async def scenario() -> tuple[list[int], list[int], Event]:
        async with loops(a, b) as (la, lb):
            before, after = await move_midway(la, lb, b)
            return tokens(before), tokens(after), before[-1]

    before, after, moved = asyncio.run(scenario())
    assert isinstance(moved, Moved) and moved.prompt_tokens == len(PROMPT)
    # the destination's first event repeats the last token the source sampled (not yet fed)
    assert after[0] == before[-1] and before + after[1:] == expected
    assert idle(a) and idle(b)


def test_bad_moves_are_refused_and_the_request_stays(pair, tiny_model) -> None:
    a, b = pair
    expected = NaiveLlama(str(tiny_model)).greedy(PROMPT, STEPS)

    async def scenario() -> list[int]:
        async with loops(a, b) as (la, lb):
            with pytest.raises(ValueError, match="not decoding here"):
                await la.call(lambda: la.move_out("nobody", "room-x", [b.handle_json], [0, 1]))
            qa = la.submit("s", PROMPT, PARAMS)
            got = await until(qa, (Tokens,))
            pages = await lb.call(lambda: lb.reserve("s", "room-s", PROMPT, PARAMS, 1, 10.0))
            # room for the prompt only: the request has more KV than that by now
            with pytest.raises(ValueError, match="reserved .* pages but the request holds"):
                await la.call(lambda: la.move_out("s", "room-s", [b.handle_json], pages[:1]))
            with pytest.raises(ValueError, match="reserve_tokens must be"):
                await lb.call(lambda: lb.reserve("s2", "room-s2", PROMPT, PARAMS, 1, 10.0, reserve_tokens=3))
            lb.abort("s")  # the router closes the destination's stream: the room is dropped
            got += await until(qa, (Done,))
            with pytest.raises(ValueError, match="not decoding here"):  # finished: nothing to move
                await la.call(lambda: la.move_out("s", "room-s", [b.handle_json], pages))
            await asyncio.sleep(1.2)  # the dropped room's pages leave quarantine (HANDOFF_GRACE_S)
            await lb.call(lb._release_quarantine)
            return tokens(got)

    assert asyncio.run(scenario()) == expected  # refused moves changed nothing
    assert idle(a) and idle(b)


@pytest.fixture
def fresh_pair(tiny_model):
    """A pair no other test wrote through (torn down after pytest has reported: a failure's traceback
    holds views of the mapped peer pool)."""
    a, b = worker(str(tiny_model), "a"), worker(str(tiny_model), "b")
    yield a, b
    for w in (a, b):
        w.handoff.close()
        w.engine.shutdown()


def test_a_move_after_a_prefill_handoff_to_the_same_engine(fresh_pair, tiny_model) -> None:
    """The order of the real server: ``a`` first hands a prompt's KV to ``b`` (from inside an engine
    step, under inference mode), then moves a decode there (a command between steps). The move once
    failed here: the peer's mapping, opened in inference mode, refused writes from outside it. A
    fresh pair, so that the handoff is the first write to ``b``."""
    a, b = fresh_pair
    expected = NaiveLlama(str(tiny_model)).greedy(PROMPT, STEPS)
    handed = [7 + (i * 5) % 240 for i in range(21)]

    async def scenario() -> tuple[list[int], list[int]]:
        from appliance.engine.handoff import Transfer

        async with loops(a, b) as (la, lb):
            one = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
            qb1 = lb.open_stream("h")
            room = await lb.call(lambda: lb.reserve("h", "room-h", handed, one, 1, 10.0))
            qa1 = la.submit("h", handed, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                            Transfer(room="room-h", handles=[b.handle_json], dst_pages=room))
            await until(qa1, (Done,))
            await until(qb1, (Done,))
            before, after = await move_midway(la, lb, b)
            return tokens(before), tokens(after)

    before, after = asyncio.run(scenario())
    assert after[0] == before[-1] and before + after[1:] == expected
    assert idle(a) and idle(b)
