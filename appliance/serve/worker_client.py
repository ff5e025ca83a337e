"""Typed calls from the router to one worker: run a whole request, reserve decode pages, prefill,
move a decoding request, read its metrics.

Every call is abandoned the moment the pool marks its worker down (`WorkerFailed`), and every open
response is registered with the pool, which closes it then. Closing a worker's response is how the
router aborts that request there: `WorkerClient.done_with` is synchronous on purpose, so a request's
cleanup can tell every engine before its first await.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec

from appliance.serve import openai_api as oai
from appliance.serve.internal_error import error_message
from appliance.serve.policies import WorkerHandle
from appliance.serve.protocol import (
    DecodeRequest,
    Error,
    Event,
    ExtendRequest,
    GenerateRequest,
    MoveRequest,
    PrefillAnswer,
    PrefillRequest,
    Reserved,
    decode_event,
)
from appliance.serve.router_config import RouterConfig
from appliance.serve.worker_pool import WorkerPool

T = TypeVar("T")
METRICS_TIMEOUT_S = 2.0


class WorkerFailed(Exception):
    """A worker broke before the client saw a byte (the router may retry elsewhere)."""


class WorkerBusy(WorkerFailed):
    """A worker answered 503: it is up but has no room now (e.g. no free KV pages); later may do."""


@dataclass
class WorkerStream:
    """An open NDJSON event stream of one request on one worker."""

    worker: WorkerHandle
    resp: aiohttp.ClientResponse
    events: AsyncIterator[Event]


class WorkerClient:
    def __init__(self, cfg: RouterConfig, pool: WorkerPool) -> None:
        self.cfg = cfg
        self.pool = pool

    async def generate(self, w: WorkerHandle, req: GenerateRequest) -> WorkerStream:
        """Run the whole request on ``w`` (unified, or an adaptive engine prefilling for itself)."""
        resp = await self._post(w, "/internal/generate", req)
        return WorkerStream(w, resp, self._events(resp, w.name))

    async def reserve(self, d: WorkerHandle, dreq: DecodeRequest) -> tuple[WorkerStream, Reserved]:
        """Open decode's stream and wait (``connect_timeout_s``) for its reservation (pages, pool handles)."""
        resp: aiohttp.ClientResponse | None = None
        events: AsyncIterator[Event] | None = None
        try:
            async with asyncio.timeout(self.cfg.connect_timeout_s):
                resp = await self._post(d, "/internal/decode", dreq)
                events = self._events(resp, d.name)
                ev = await anext(events)
            if not isinstance(ev, Reserved):
                why = ev.message if isinstance(ev, Error) and ev.message else "no reservation"
                raise WorkerFailed(f"{d.name}: {why}")
            return WorkerStream(d, resp, events), ev
        except BaseException as exc:
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
            if resp is not None:
                self.pool.done_with(d, resp)
            if isinstance(exc, TimeoutError):
                raise WorkerFailed(f"{d.name} did not reserve within {self.cfg.connect_timeout_s:.0f} s") from None
            raise

    async def prefill(self, p: WorkerHandle, preq: PrefillRequest) -> PrefillAnswer:
        """Prefill on ``p``, which pushes the KV into decode's reserved pages; its first token and usage."""
        resp = await self._post(p, "/internal/prefill", preq)
        try:
            body = await self.unless_down(p, resp.read)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WorkerFailed(f"{p.name}: {type(exc).__name__}: {exc}") from None
        finally:
            self.pool.done_with(p, resp)
        try:
            first = msgspec.json.decode(body, type=PrefillAnswer)
        except msgspec.MsgspecError as exc:
            raise WorkerFailed(f"{p.name} answered without a first token: {exc}") from None
        if not first.token_ids:
            raise WorkerFailed(f"{p.name} answered without a first token")
        return first

    async def extend(self, d: WorkerHandle, room: str, lease_s: float) -> bool:
        """Renew decode's reservation of ``room`` for ``lease_s`` from now; False when decode no longer
        holds it or does not answer (the decode leg then reports why)."""
        try:
            resp = await self._post(d, "/internal/extend", ExtendRequest(room=room, lease_s=lease_s))
        except (WorkerFailed, oai.ApiError):
            return False
        try:
            answer = await asyncio.wait_for(resp.json(), self.cfg.connect_timeout_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return False
        finally:
            self.pool.done_with(d, resp)
        return isinstance(answer, dict) and answer.get("ok") is True

    async def move(self, src: WorkerHandle, req: MoveRequest) -> None:
        """Have ``src`` push a decoding request's KV into another engine's reserved pages and let it go."""
        resp = await self._post(src, "/internal/move", req)
        self.pool.done_with(src, resp)

    async def metrics_text(self, w: WorkerHandle) -> str:
        """``w``'s Prometheus text ('' when it does not answer in time)."""
        assert self.pool.session is not None
        try:
            async with self.pool.session.get(w.url + "/metrics",
                                             timeout=aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)) as r:
                return await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return ""

    def done_with(self, stream: WorkerStream) -> None:
        """Close the stream's response now, without an await: the worker drops the request."""
        self.pool.done_with(stream.worker, stream.resp)

    # -- the wire ----------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.cluster_token}", "Content-Type": "application/json"}

    async def _post(self, w: WorkerHandle, path: str, payload: Any) -> aiohttp.ClientResponse:
        """POST to a worker and return the open response (registered: it is closed if ``w`` goes down)."""
        assert self.pool.session is not None
        session = self.pool.session
        data = msgspec.json.encode(payload)
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)

        async def post() -> aiohttp.ClientResponse:
            return await session.post(w.url + path, data=data, headers=self._headers(), timeout=timeout)

        try:
            resp = await self.unless_down(w, post)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WorkerFailed(f"{w.name}: {type(exc).__name__}: {exc}") from None
        if resp.status == 400:
            body = await resp.read()
            resp.release()
            raise oai.ApiError(400, error_message(body))
        if resp.status != 200:
            body = await resp.read()
            resp.release()
            kind = WorkerBusy if resp.status == 503 else WorkerFailed
            raise kind(f"{w.name} answered {resp.status}: {error_message(body)}")
        self.pool.track(w, resp)
        return resp

    async def unless_down(self, w: WorkerHandle, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` unless ``w`` is marked down first (then cancel it and raise `WorkerFailed`)."""
        down = self.pool.down_event(w.name)
        if down.is_set():
            raise WorkerFailed(f"{w.name} is down")
        task = asyncio.ensure_future(fn())
        waiter = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # NOTE: cancelled (the client left) in the same loop turn as the worker answered: nobody will
            # read or close that response, so close it now (the worker drops the request).
            if task.done() and not task.cancelled() and task.exception() is None:
                answered = task.result()
                if isinstance(answered, aiohttp.ClientResponse):
                    answered.close()
            raise
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise WorkerFailed(f"{w.name} went down (no answer to /health)")
        return task.result()

    async def _events(self, resp: aiohttp.ClientResponse, who: str) -> AsyncIterator[Event]:
        """Events of a worker's NDJSON stream; a break or a stream that ends early is `WorkerFailed`."""
        try:
            async for line in resp.content:
                if line.strip():
                    try:
                        yield decode_event(line)
                    except msgspec.MsgspecError as exc:
                        raise WorkerFailed(f"{who} sent a malformed event: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkerFailed(f"{who} stream broke: {type(exc).__name__}: {exc}") from None
        raise WorkerFailed(f"{who} closed its stream before finishing")

