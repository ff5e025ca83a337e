"""A tensor-parallel engine's group stays up while idle and fails loudly when a rank dies (gloo, two
processes). A follower waits for rank 0's next command inside a collective, which times out: an engine
idle longer than that lost its followers, and a dead follower left rank 0 failing every step while its
worker answered /health."""

from __future__ import annotations

import asyncio
import time

import pytest

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


def test_a_step_that_fails_inside_the_group_is_fatal_and_shutdown_does_not_wait(tiny_model, monkeypatch) -> None:
    """Rank 0 raises between its command and its collectives: the followers wait in an all-reduce it will
    not join. The loop fails the request, answers later ones at once, and the engine stops without
    waiting out the group's timeout for a collective with them."""
    llm = LLM(str(tiny_model), _config(), tp_size=2)
    engine = llm.engine

    def broken(*args, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated kernel fault")

    async def scenario() -> tuple[Event, Event, bool, str | None]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            monkeypatch.setattr(engine.runner.model, "forward", broken)
            failed = await _last(loop.submit("a", PROMPT, PARAMS))
            later = await _last(loop.submit("b", PROMPT, PARAMS))
            return failed, later, loop.alive, loop.fatal
        finally:
            loop.stop()

    failed, later, alive, fatal = asyncio.run(scenario())
    for ev in (failed, later):
        assert isinstance(ev, Error) and ev.status == 500 and "simulated kernel fault" in ev.message, ev
    assert not alive and fatal is not None and "a tensor-parallel step failed" in fatal
    t0 = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - t0 < 5


def test_keepalive_pings_never_land_inside_a_step(tiny_model) -> None:
    """Pings are due every 0.1 s, and rank 0 spends 0.25 s of each step between its command and its
    collectives: each command and its collectives hold the group's lock, so the followers never read a
    ping where a collective belongs (the tokens are TP 1's)."""
    prompts = [[5 + i, 6, 7, 8] for i in range(2)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(str(tiny_model), _config()) as one:
        want = [c.token_ids for c in one.generate(prompts, params)]
    with LLM(str(tiny_model), _config(tp_timeout_s=0.6), tp_size=2) as two:
        runner = two.engine.runner
        assert runner.keepalive.every_s == pytest.approx(0.1)
        forward = runner.model.forward

        def slow(*args, **kw):  # type: ignore[no-untyped-def]
            time.sleep(0.25)
            return forward(*args, **kw)

        runner.model.forward = slow  # type: ignore[method-assign]
        assert [c.token_ids for c in two.generate(prompts, params)] == want
        runner.model.forward = forward  # type: ignore[method-assign]
        assert two.engine.tp_failure() is None
