"""A worker whose engine thread cannot serve says so: a bug in one command or one request fails only
that request and the thread goes on; a stopped thread makes ``/health`` answer 503, and the router
marks that worker down at the next probe instead of routing to it until its lease deadlines fire."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiohttp import web

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.internal_error import error_response
from appliance.serve.policies import WorkerHandle
from appliance.serve.protocol import Done, Error, Event
from appliance.serve.router_config import RouterConfig
from appliance.serve.worker_pool import WorkerPool

PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=64))


async def last_event(q: asyncio.Queue[Event]) -> Event:
    while True:
        ev = await asyncio.wait_for(q.get(), 60)
        if isinstance(ev, (Done, Error)):
            return ev


def test_a_failing_request_or_command_leaves_the_thread_serving(engine, monkeypatch, caplog) -> None:
    real_add = engine.add_request
    calls = {"n": 0}

    def add_once_broken(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated engine bug")
        return real_add(*args, **kw)

    monkeypatch.setattr(engine, "add_request", add_once_broken)

    async def scenario() -> tuple[Event, Event, bool]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            broken = await last_event(loop.submit("bad", [5, 6, 7], PARAMS))
            loop.inbox.put(lambda: 1 / 0)  # a command with a bug of its own
            ok = await last_event(loop.submit("good", [5, 6, 7], PARAMS))
            return broken, ok, loop.alive
        finally:
            loop.stop()

    with caplog.at_level(logging.ERROR, logger="pdbox.engine"):
        broken, ok, alive = asyncio.run(scenario())
    assert isinstance(broken, Error) and broken.status == 500 and "simulated engine bug" in broken.message
    assert isinstance(ok, Done) and alive
    assert "engine command failed" in caplog.text and "adding request bad failed" in caplog.text
    assert engine.pool.num_free + engine.cache.evictable_pages() == engine.pool.num_pages, "KV pages leaked"


def test_a_stopped_loop_is_not_alive(engine) -> None:
    async def scenario() -> tuple[bool, bool]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        before = loop.alive
        loop.stop()
        return before, loop.alive

    assert asyncio.run(scenario()) == (True, False)


def test_the_router_marks_a_503_worker_down_at_once_and_takes_it_back_when_it_recovers() -> None:
    async def scenario() -> list[bool]:
        state = {"broken": True}

        async def health(request: web.Request) -> web.Response:
            if state["broken"]:
                return error_response(503, "worker w0: its engine thread has stopped")
            return web.json_response({"status": "ok"})

        async def load(request: web.Request) -> web.Response:
            return web.json_response({"name": "w0", "role": "unified", "total_pages": 8, "free_pages": 8})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/load", load)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pool = WorkerPool(RouterConfig(unhealthy_after_s=60.0))
        w = WorkerHandle("w0", "unified", f"http://127.0.0.1:{port}", healthy=True, last_seen=time.monotonic())
        pool.add(w)
        await pool.start()
        try:
            seen = [w.healthy, pool.down_event("w0").is_set()]  # long before unhealthy_after_s
            state["broken"] = False
            await pool.refresh(w)
            return seen + [w.healthy]
        finally:
            await pool.close()
            await runner.cleanup()

    assert asyncio.run(scenario()) == [False, True, True]
