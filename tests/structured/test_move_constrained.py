"""A constrained request moved mid-decode to another engine (worker engine loops, shm, tiny model)
keeps its constraint: the destination rebuilds the matcher from the params and replays the tokens
so far, so the answer is the one a single engine gives, and it matches the grammar."""

from __future__ import annotations

import asyncio
import re

import pytest

from appliance.engine.constraint import Constraint
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Moved, Tokens
from tests.adaptive.test_move_engine import PROMPT, idle, tokens, until, worker

PATTERN = "[a-m]{12}-[n-z]{12}"
PARAMS = SamplingParams(max_tokens=40, temperature=0, constraint=Constraint.regex(PATTERN))


@pytest.fixture
def pair(tiny_model):
    a, b = worker(str(tiny_model), "a"), worker(str(tiny_model), "b")
    yield a, b
    for w in (a, b):
        w.handoff.close()
        w.engine.shutdown()


def test_a_moved_constrained_decode_keeps_its_constraint(pair) -> None:
    a, b = pair
    one = a.engine.add_request(PROMPT, PARAMS)
    a.engine.run_until_done([one])
    expected = one.output_ids
    assert re.fullmatch(PATTERN, one.text) and one.finish_reason == "stop"
    a.engine.cache.reset()

    async def scenario() -> tuple[list[int], list[int]]:
        aio = asyncio.get_running_loop()
        la, lb = EngineLoop(a.engine, aio, a.transport), EngineLoop(b.engine, aio, b.transport)
        la.start()
        lb.start()
        try:
            qa = la.submit("c", PROMPT, PARAMS)
            before = []
            while len(tokens(before)) < 8:
                before += await until(qa, (Tokens,))
            qb = lb.open_stream("c")
            pages = await lb.call(lambda: lb.reserve("c", "room-c", PROMPT, PARAMS, 1, 10.0,
                                                     reserve_tokens=len(PROMPT) + 8 + 32))
            await la.call(lambda: la.move_out("c", "room-c", [b.handle_json], pages))
            before += await until(qa, (Moved,))
            after = await until(qb, (Done,))
            assert after[-1].finish_reason == "stop"
            return tokens(before), tokens(after)
        finally:
            la.stop()
            lb.stop()

    before, after = asyncio.run(scenario())
    assert 8 <= len(before) < len(expected)
    assert after[0] == before[-1] and before + after[1:] == expected
    assert idle(a) and idle(b)
