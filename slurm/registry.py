"""Router-side worker registry: workers register over HTTP with the cluster token, the registry
health-checks each one every `health_interval_s` and drops those that fail for `drop_after_s`.

The router mounts it:

    registry = Registry()
    app.add_subapp("/internal", make_registry_app(token, registry))
    ...
    registry.workers("decode")   # healthy decode ranks, oldest first

`python -m slurm.registry --port 0 --port-file F` serves the registry alone (the stand-in router that
`pdbox slurm up` starts until the real router mounts it); the token comes from $PDBOX_CLUSTER_TOKEN.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import click
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from appliance.cli_support import HELP_OPTIONS, run_command
from appliance.serve.internal_error import error_middleware
from slurm.messages import Deregister, RegistryEvent, WorkerInfo, WorkerRole, WorkerStatus

log = logging.getLogger("pdbox.slurm.registry")

TOKEN_ENV = "PDBOX_CLUSTER_TOKEN"


@dataclass
class _Entry:
    info: WorkerInfo
    registered_at: float
    last_ok: float | None = None
    healthy: bool = False


class Registry:
    """The set of registered worker ranks. Not thread-safe: use it from the router's event loop.

    A rank is *healthy* (routable) after its first successful health check and until a check fails;
    it is dropped once it has had no successful check for `drop_after_s` (counted from registration
    for a rank that never answered).
    """

    def __init__(
        self, *, health_interval_s: float = 1.0, drop_after_s: float = 3.0, probe_timeout_s: float = 1.0
    ) -> None:
        if health_interval_s <= 0 or drop_after_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("Registry intervals and timeouts must be positive seconds")
        self.health_interval_s = health_interval_s
        self.drop_after_s = drop_after_s
        self.probe_timeout_s = probe_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._events: collections.deque[RegistryEvent] = collections.deque(maxlen=1000)
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # first checks of new registrations
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop, synchronously) whenever the set of healthy ranks may
        have changed: a registration, a deregistration, a drop, or a rank turning healthy or unhealthy."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a listener must not break registration or health checks
                log.exception("registry listener failed")

    # ---- queries -------------------------------------------------------------------------------
    def workers(self, role: WorkerRole | None = None, *, healthy_only: bool = True) -> list[WorkerInfo]:
        """Registered ranks of `role` (all roles when None), oldest registration first."""
        entries = sorted(self._entries.values(), key=lambda e: e.registered_at)
        return [
            e.info
            for e in entries
            if (role is None or e.info.role == role) and (e.healthy or not healthy_only)
        ]

    def statuses(self) -> list[WorkerStatus]:
        now = time.monotonic()
        return [
            WorkerStatus(
                info=e.info,
                healthy=e.healthy,
                registered_s=now - e.registered_at,
                last_ok_s=None if e.last_ok is None else now - e.last_ok,
            )
            for e in sorted(self._entries.values(), key=lambda e: e.registered_at)
        ]

    def events(self) -> list[RegistryEvent]:
        """The last 1000 register / deregister / drop events, oldest first."""
        return list(self._events)

    # ---- updates -------------------------------------------------------------------------------
    def register(self, info: WorkerInfo) -> None:
        """Add a rank, replacing an earlier registration of the same (role, job_id, rank)."""
        old = self._entries.pop(info.key, None)
        if old is not None and old.info.url != info.url:
            self._event("drop", old.info, "replaced by a new registration")
        self._entries[info.key] = _Entry(info=info, registered_at=time.monotonic())
        self._event("register", info)
        if old is not None:
            self._changed()
        if self._session is not None:  # first health check now, not a whole interval later
            task = asyncio.get_running_loop().create_task(self._check(info.key))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    def deregister(self, request: Deregister) -> list[WorkerInfo]:
        """Remove the matching ranks; returns them."""
        gone = [e.info for e in self._entries.values() if request.matches(e.info)]
        for info in gone:
            del self._entries[info.key]
            self._event("deregister", info)
        if gone:
            self._changed()
        return gone

    def _event(self, kind: str, info: WorkerInfo, reason: str = "") -> None:
        log.info("%s %s %s rank %d at %s %s", kind, info.role, info.job_id, info.rank, info.url, reason)
        self._events.append(RegistryEvent(at=time.time(), kind=kind, info=info, reason=reason))  # type: ignore[arg-type]

    # ---- health checks -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.probe_timeout_s))
            self._loop_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def stop(self) -> None:
        for task in list(self._checks):
            task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _health_loop(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.gather(*(self._check(key) for key in list(self._entries)))
            await asyncio.sleep(max(0.0, self.health_interval_s - (time.monotonic() - started)))

    async def _check(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None or self._session is None:
            return
        ok = False
        try:
            async with self._session.get(entry.info.url.rstrip("/") + "/health") as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if self._entries.get(key) is not entry:  # deregistered or replaced meanwhile
            return
        now = time.monotonic()
        was_healthy = entry.healthy
        entry.healthy = ok
        if ok:
            entry.last_ok = now
        else:
            silent_s = now - (entry.last_ok if entry.last_ok is not None else entry.registered_at)
            if silent_s >= self.drop_after_s:
                del self._entries[key]
                self._event("drop", entry.info, f"no healthy answer for {silent_s:.1f}s")
        if entry.healthy != was_healthy:
            self._changed()


REGISTRY_KEY = web.AppKey("pdbox_registry", Registry)


def make_registry_app(token: str, registry: Registry | None = None) -> web.Application:
    """The registration endpoints as an aiohttp app, meant to be mounted at /internal. Every request
    must carry `Authorization: Bearer <token>`. The app starts and stops the registry's health checks."""
    if not token:
        raise ValueError("the cluster token is empty; generate one (e.g. secrets.token_urlsafe(32))")
    reg = registry if registry is not None else Registry()
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise web.HTTPUnauthorized(text="missing or wrong cluster token\n")
        return await handler(request)

    async def register(request: web.Request) -> web.Response:
        try:
            info = msgspec.json.decode(await request.read(), type=WorkerInfo)
        except msgspec.ValidationError as e:
            raise web.HTTPBadRequest(text=f"bad registration: {e}\n") from e
        reg.register(info)
        return web.json_response({"ok": True, "key": info.key})

    async def deregister(request: web.Request) -> web.Response:
        try:
            req = msgspec.json.decode(await request.read(), type=Deregister)
        except msgspec.ValidationError as e:
            raise web.HTTPBadRequest(text=f"bad deregistration: {e}\n") from e
        if not req.url and (req.role is None or not req.job_id or req.rank < 0):
            raise web.HTTPBadRequest(text="deregister needs `url`, or `role`, `job_id` and `rank`\n")
        gone = reg.deregister(req)
        return web.json_response({"ok": True, "removed": [i.key for i in gone]})

    async def workers(request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(reg.statuses()), content_type="application/json")

    async def events(request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(reg.events()), content_type="application/json")

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await reg.start()
        yield
        await reg.stop()

    app = web.Application(middlewares=[error_middleware, auth])
    app[REGISTRY_KEY] = reg
    app.router.add_post("/register", register)
    app.router.add_post("/deregister", deregister)
    app.router.add_delete("/deregister", deregister)
    app.router.add_get("/workers", workers)
    app.router.add_get("/events", events)
    app.cleanup_ctx.append(lifecycle)
    return app


def make_standalone_app(token: str, registry: Registry | None = None) -> web.Application:
    """A router stand-in: the registry at /internal plus GET /health."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.add_subapp("/internal", make_registry_app(token, registry))
    return app


async def _serve(host: str, port: int, port_file: Path | None, token: str) -> None:
    runner = web.AppRunner(make_standalone_app(token))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    if port_file is not None:  # written last and atomically: its presence means "serving"
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{bound}\n")
        tmp.replace(port_file)
    log.info("registry serving on %s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


@click.command(help=__doc__.split("\n\n")[0], context_settings=HELP_OPTIONS)
@click.option("--host", default="0.0.0.0")
@click.option("--port", type=int, default=0, help="0: any free port (see --port-file)")
@click.option("--port-file", type=click.Path(path_type=Path), help="write the bound port here once serving")
def command(host: str, port: int, port_file: Path | None) -> None:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise click.UsageError(f"${TOKEN_ENV} is not set")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(host, port, port_file, token))


def main(argv: list[str] | None = None) -> int:
    """``python -m slurm.registry ARGS``; returns the exit status (2: a bad option, or no token)."""
    return run_command(command, argv, "python -m slurm.registry")


if __name__ == "__main__":
    sys.exit(main())
