"""A prefill leg whose row cannot be sampled (the worker's engine loops, the shm transport, a tiny model):
that prompt's leg answers an error and never signals its room, the prompt handed over beside it in the
same steps arrives whole with the tokens a lone engine gives, and once the router drops the failed
room (it closes decode's stream) neither engine holds a page."""

from __future__ import annotations

import asyncio

import pytest

from appliance.engine.handoff import Transfer
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Error
from tests.adaptive import test_move_engine as mv
from tests.engine.faults import poison
from tests.engine.reference import NaiveLlama

GOOD = [7 + (i * 5) % 240 for i in range(21)]
BAD = [9 + (i * 3) % 200 for i in range(17)]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LEG = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)  # prefill's part: the first token


@pytest.fixture
def pair(tiny_model):
    a, b = mv.worker(str(tiny_model), "a"), mv.worker(str(tiny_model), "b")
    yield a, b
    for w in (a, b):
        w.handoff.close()
        w.engine.shutdown()


def test_a_failed_prefill_leg_signals_nothing_and_leaks_nothing(pair, tiny_model) -> None:
    a, b = pair
    undo = poison(a.engine, "bad", after=0)

    async def scenario() -> tuple[list, list, list, bool]:
        aio = asyncio.get_running_loop()
        la, lb = EngineLoop(a.engine, aio, a.transport), EngineLoop(b.engine, aio, b.transport)
        la.start()
        lb.start()
        try:
            legs = {}
            for rid, prompt in (("bad", BAD), ("good", GOOD)):
                qb = lb.open_stream(rid)
                pages = await lb.call(lambda r=rid, p=prompt: lb.reserve(r, f"room-{r}", p, PARAMS, 1, 10.0))
                legs[rid] = qb, Transfer(room=f"room-{rid}", handles=[b.handle_json], dst_pages=pages)
            qa_bad = la.submit("bad", BAD, LEG, legs["bad"][1])
            qa_good = la.submit("good", GOOD, LEG, legs["good"][1])
            bad = await mv.until(qa_bad, (Done, Error))
            prefill_good = await mv.until(qa_good, (Done, Error))
            decode_good = await mv.until(legs["good"][0], (Done, Error))
            await asyncio.sleep(0.3)  # a signal for the failed room would have landed by now
            signalled = not legs["bad"][0].empty()
            lb.abort("bad")  # what the router does when a leg fails: decode drops the room
            await asyncio.sleep(1.2)  # the dropped room's pages leave quarantine (HANDOFF_GRACE_S)
            await lb.call(lb._release_quarantine)
            return bad, prefill_good, decode_good, signalled
        finally:
            la.stop()
            lb.stop()

    try:
        bad, prefill_good, decode_good, signalled = asyncio.run(scenario())
    finally:
        undo()
    assert len(bad) == 1 and isinstance(bad[0], Error) and bad[0].status == 500, bad
    assert not signalled, "the failed leg's room was signalled"
    assert isinstance(prefill_good[-1], Done) and isinstance(decode_good[-1], Done)
    expected = NaiveLlama(str(tiny_model)).greedy(GOOD, PARAMS.max_tokens)
    assert mv.tokens(prefill_good) == expected[:1] and mv.tokens(decode_good) == expected
    assert mv.idle(a) and mv.idle(b)
