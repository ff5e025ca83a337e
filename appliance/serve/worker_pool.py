"""The router's workers: the registry of `WorkerHandle`s, their health loop and their down events.

A worker is *healthy* while it answers ``/health`` (served by its event loop even while its engine is
busy); one that answers 503 (its engine thread stopped) is marked down at once; one silent for
``unhealthy_after_s`` (SIGSTOP, a hung host), or whose process exited (the
launcher calls :meth:`WorkerPool.mark_down`), is marked down: it gets no new requests, and every
response still open on it is closed, which fails the requests it holds at once. ``/load`` (answered
between engine steps) refreshes what the placement reads: queue, KV pages, TP size, pool handle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from appliance.serve.internal_error import error_message
from appliance.serve.load_report import LoadReport, decode_load
from appliance.serve.policies import WorkerHandle
from appliance.serve.router_config import RouterConfig

log = logging.getLogger("pdbox.router")
LOAD_TIMEOUT_S = 2.0


class WorkerPool:
    def __init__(self, cfg: RouterConfig, max_model_len: int = 0) -> None:
        self.cfg = cfg
        self.workers: dict[str, WorkerHandle] = {}
        self.max_model_len = max_model_len  # the smallest any worker reported (0: none yet)
        self.session: aiohttp.ClientSession | None = None  # open between start() and close()
        self.load_listeners: list[Callable[[WorkerHandle], None]] = []  # called after each /load refresh
        self._down: dict[str, asyncio.Event] = {}  # set when the worker is marked down; replaced when it is back
        self._open: dict[str, set[aiohttp.ClientResponse]] = {}  # responses being read, closed when it goes down
        self._loading: dict[str, asyncio.Task] = {}  # at most one /load refresh in flight per worker

    # -- the registry ------------------------------------------------------------------------------
    def add(self, w: WorkerHandle) -> None:
        self.workers[w.name] = w

    def remove(self, name: str) -> None:
        self.workers.pop(name, None)

    def healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role == role and w.healthy]

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the session every worker call shares, and read every worker's health and load once."""
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
        )
        await self.refresh_all()

    async def close(self) -> None:
        for t in self._loading.values():
            t.cancel()
        if self.session is not None:
            await self.session.close()

    async def health_loop(self) -> None:
        """Probe every worker each ``health_interval_s``; refresh the load of those alive in the background."""
        while True:
            workers = list(self.workers.values())
            alive = await asyncio.gather(*(self.probe(w) for w in workers))
            for w, ok in zip(workers, alive):
                t = self._loading.get(w.name)
                if ok and (t is None or t.done()):
                    self._loading[w.name] = asyncio.create_task(self.load(w))
            await asyncio.sleep(self.cfg.health_interval_s)

    # -- health and load ---------------------------------------------------------------------------
    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(w) for w in list(self.workers.values())))

    async def refresh(self, w: WorkerHandle) -> None:
        """Probe liveness (``/health``, answered by the worker's event loop even while its engine is busy)
        and refresh load (``/load``, answered between engine steps)."""
        if await self.probe(w):
            await self.load(w)

    async def probe(self, w: WorkerHandle) -> bool:
        assert self.session is not None
        broken = ""  # the worker says it cannot serve (503: its engine thread stopped)
        try:
            async with self.session.get(w.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)) as resp:
                alive = resp.status == 200
                w.last_heard = time.monotonic()
                if resp.status == 503:
                    broken = error_message(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            alive = False
        if broken and w.healthy:
            self.mark_down(w.name, broken)
        elif alive:
            w.last_seen = time.monotonic()
        elif w.healthy and time.monotonic() - w.last_seen > self.cfg.unhealthy_after_s:
            self.mark_down(w.name, f"no answer to /health for {self.cfg.unhealthy_after_s:.0f} s")
        return alive

    async def load(self, w: WorkerHandle) -> None:
        assert self.session is not None
        try:
            async with self.session.get(w.url + "/load",
                                        timeout=aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientError(f"status {resp.status}")
                info = decode_load(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            info = None  # alive but busy: keep the last load; liveness alone decides health
        if info is not None:
            self._apply_load(w, info)
        for listener in self.load_listeners:
            listener(w)

    def _apply_load(self, w: WorkerHandle, info: LoadReport) -> None:
        w.load = info
        w.pid = info.pid
        w.tp = info.tp
        w.transport = info.transport
        mml = info.max_model_len
        if mml and (not self.max_model_len or mml < self.max_model_len):
            self.max_model_len = mml
        if not w.healthy and time.monotonic() - w.last_seen < self.cfg.unhealthy_after_s:
            w.healthy = True
            ev = self._down.get(w.name)
            if ev is not None and ev.is_set():
                self._down[w.name] = asyncio.Event()

    # -- down: stop routing and fail what it holds ---------------------------------------------------
    def mark_down(self, name: str, reason: str) -> None:
        """Stop routing to ``name`` and fail every request it is serving now (the launcher calls this when
        the process exits; the health loop when it stops answering)."""
        w = self.workers.get(name)
        if w is None:
            return
        if w.healthy:
            log.warning("worker %s is down: %s", name, reason)
        w.healthy = False
        w.last_seen = min(w.last_seen, time.monotonic() - self.cfg.unhealthy_after_s)
        self.down_event(name).set()
        for resp in list(self._open.pop(name, ())):
            resp.close()

    def down_event(self, name: str) -> asyncio.Event:
        """Set once ``name`` is marked down (a new one replaces it when the worker is back)."""
        ev = self._down.get(name)
        if ev is None:
            ev = self._down[name] = asyncio.Event()
        return ev

    def track(self, w: WorkerHandle, resp: aiohttp.ClientResponse) -> None:
        """``resp`` is being read from ``w``: close it if ``w`` goes down."""
        self._open.setdefault(w.name, set()).add(resp)

    def done_with(self, w: WorkerHandle, resp: aiohttp.ClientResponse) -> None:
        """Close ``resp`` (closing a worker's stream is how the router aborts that request there)."""
        self._open.get(w.name, set()).discard(resp)
        resp.close()
