"""Registry (router side) and register client (worker side), on this host: no Slurm needed."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from slurm.messages import WorkerInfo
from slurm.register import RegistrationError, deregister, register
from slurm.registry import Registry, make_standalone_app
from tests.waiting import wait_until_async

TOKEN = "test-token"


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _health_app(status: list[int]) -> tuple[web.AppRunner, str]:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=status[0], text="x")

    app = web.Application()
    app.router.add_get("/health", health)
    return await _serve(app)


def _info(url: str, rank: int = 0, role: str = "decode", job_id: str = "7") -> WorkerInfo:
    return WorkerInfo(role=role, url=url, rank=rank, tp=2, job_id=job_id, node="n1", pid=1)  # type: ignore[arg-type]




def test_register_health_drop_and_deregister() -> None:
    async def scenario() -> None:
        registry = Registry(health_interval_s=0.2, drop_after_s=1.0, probe_timeout_s=0.5)
        router, router_url = await _serve(make_standalone_app(TOKEN, registry))
        status = [200]
        worker, worker_url = await _health_app(status)
        try:
            with pytest.raises(RegistrationError, match="401"):
                await asyncio.to_thread(register, router_url, "wrong", _info(worker_url), deadline_s=2)
            await asyncio.to_thread(register, router_url, TOKEN, _info(worker_url))
            await wait_until_async(lambda: registry.workers("decode") == [_info(worker_url)], 5.0,
                                   what="the registry to list the decode worker")
            assert registry.workers("prefill") == []

            # a failing health check makes it unroutable at once and drops it after drop_after_s
            status[0] = 503
            await wait_until_async(lambda: registry.workers("decode") == [], 5.0,
                                   what="the registry to drop the decode worker")
            assert registry.workers(healthy_only=False)
            await wait_until_async(lambda: registry.workers(healthy_only=False) == [], 3,
                                   what="the registry to forget the worker")
            assert registry.events()[-1].kind == "drop"

            # deregister by url, and by (role, job_id, rank) as a job wrapper does
            status[0] = 200
            await asyncio.to_thread(register, router_url, TOKEN, _info(worker_url, rank=0))
            await asyncio.to_thread(register, router_url, TOKEN, _info(worker_url + "/", rank=1))
            await wait_until_async(lambda: len(registry.workers("decode")) == 2, 5.0,
                                   what="two decode workers in the registry")
            assert await asyncio.to_thread(deregister, router_url, TOKEN, url=worker_url)
            assert await asyncio.to_thread(deregister, router_url, TOKEN, role="decode", job_id="7", rank=1)
            assert registry.workers(healthy_only=False) == []
            assert [e.kind for e in registry.events()[-2:]] == ["deregister", "deregister"]
        finally:
            await worker.cleanup()
            await router.cleanup()

    asyncio.run(scenario())


def test_reregistration_replaces_stale_entry() -> None:
    async def scenario() -> None:
        registry = Registry(health_interval_s=0.2)
        router, router_url = await _serve(make_standalone_app(TOKEN, registry))
        worker, worker_url = await _health_app([200])
        try:
            await asyncio.to_thread(register, router_url, TOKEN, _info("http://127.0.0.1:9"))  # a dead port
            await asyncio.to_thread(register, router_url, TOKEN, _info(worker_url))  # same job and rank
            await wait_until_async(lambda: registry.workers("decode") == [_info(worker_url)], 5.0,
                                   what="the registry to list the decode worker")
            assert len(registry.workers(healthy_only=False)) == 1
        finally:
            await worker.cleanup()
            await router.cleanup()

    asyncio.run(scenario())


def test_client_gives_up_at_deadline_and_deregister_never_raises() -> None:
    t0 = time.monotonic()
    with pytest.raises(RegistrationError, match="within"):
        register("http://127.0.0.1:9", TOKEN, _info("http://x:1"), deadline_s=1.0, timeout_s=0.2)
    assert time.monotonic() - t0 < 3
    assert deregister("http://127.0.0.1:9", TOKEN, url="http://x:1", timeout_s=0.2) is False
    with pytest.raises(ValueError):
        deregister("http://127.0.0.1:9", TOKEN)


def test_bad_registration_is_rejected() -> None:
    async def scenario() -> None:
        router, router_url = await _serve(make_standalone_app(TOKEN))
        try:
            bad = _info("http://x:1")
            bad = WorkerInfo(**{**{f: getattr(bad, f) for f in bad.__struct_fields__}, "role": "router"})  # type: ignore[arg-type]
            with pytest.raises(RegistrationError, match="400"):
                await asyncio.to_thread(register, router_url, TOKEN, bad, deadline_s=1)
        finally:
            await router.cleanup()

    asyncio.run(scenario())


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        make_standalone_app("")
