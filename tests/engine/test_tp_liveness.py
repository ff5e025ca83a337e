"""A tensor-parallel engine's group stays up while idle and fails loudly when a rank dies (gloo, two
processes). A follower waits for rank 0's next command inside a collective, which times out: an engine
idle longer than that lost its followers, and a dead follower left rank 0 failing every step while its
worker answered /health."""

from __future__ import annotations

import asyncio
import time

from appliance.config import EngineConfig
from appliance.engine.request import SamplingParams
from appliance.llm import LLM
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Error, Event

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


def _config(**kw) -> EngineConfig:  # type: ignore[no-untyped-def]
    return EngineConfig(dtype="float32", page_size=4, num_pages=64, threads=1, **kw)


def test_an_idle_tp_engine_outlives_its_collective_timeout(tiny_model) -> None:
    """Idle three times the group's timeout (2 s): rank 0's keepalive pings hold the followers."""
    with LLM(str(tiny_model), _config(tp_timeout_s=2.0), tp_size=2) as llm:
        first = llm.generate([PROMPT], PARAMS)[0].token_ids
        time.sleep(6.0)
        assert llm.engine.tp_failure() is None
        assert llm.generate([PROMPT], PARAMS)[0].token_ids == first


async def _last(q: asyncio.Queue[Event]) -> Event:
    while True:
        ev = await asyncio.wait_for(q.get(), 60)
        if isinstance(ev, (Done, Error)):
            return ev


def test_a_dead_follower_stops_the_engine_loop_and_fails_its_requests(tiny_model) -> None:
    llm = LLM(str(tiny_model), _config(), tp_size=2)
    engine = llm.engine

    async def scenario() -> tuple[Event, Event, bool, str | None]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            ok = await _last(loop.submit("before", PROMPT, PARAMS))
            engine._tp_procs[0].kill()
            engine._tp_procs[0].join(10)
            failed = await _last(loop.submit("after", PROMPT, PARAMS))
            end = time.monotonic() + 10
            while loop.alive and time.monotonic() < end:
                await asyncio.sleep(0.05)
            return ok, failed, loop.alive, loop.fatal
        finally:
            loop.stop()

    ok, failed, alive, fatal = asyncio.run(scenario())
    assert isinstance(ok, Done)
    assert isinstance(failed, Error) and failed.status == 500 and "pdbox-tp1 (exit code -9) exited" in failed.message
    assert not alive and fatal is not None and "pdbox-tp1" in fatal
    t0 = time.monotonic()
    engine.shutdown()  # no collective with the dead rank: it returns at once
    assert time.monotonic() - t0 < 5
