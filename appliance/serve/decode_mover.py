"""Moving decoding requests, KV and all, from one engine to another (``--mode auto``).

An engine that turns prefill need not wait for its decodes to end. For each request decoding there
the router reserves pages on a decode-leaning engine (``/internal/decode`` with ``reserve_tokens``),
then asks the source to let go (``/internal/move``): between two steps it pushes every page of the
request's KV into those pages — the same one-sided push as a prefill handoff — and signals the room
with the tokens generated so far; the destination goes on from the last sampled token, not yet fed.
The source's stream ends ``moved``; the request's generator picks up the destination's stream
(:meth:`DecodeMover.follow`), so the client sees one unbroken answer.

A move that fails (no room, the request finished or is not decoding yet, a transfer error) leaves
the request where it is.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from appliance.serve import openai_api as oai
from appliance.serve.dispatch import Eligible
from appliance.serve.metrics import Registry
from appliance.serve.policies import WorkerHandle
from appliance.serve.progress import Progress
from appliance.serve.protocol import DecodeRequest, Moved, MoveRequest
from appliance.serve.relay import Outcome, Relayed, relay
from appliance.serve.router_config import RouterConfig
from appliance.serve.worker_client import WorkerClient, WorkerFailed, WorkerStream
from appliance.serve.worker_pool import WorkerPool

log = logging.getLogger("pdbox.auto")
MARGIN_TOKENS = 64  # pages reserved for a moving request beyond its context as the router last saw it
EVACUATE_POLL_S = 0.25  # how often an engine turned prefill looks again for decodes to move off it
EVACUATE_WITHIN_S = 120.0  # ... and for how long


class DecodeMover:
    """The adaptive placement's moves, counted in ``pdbox_decode_moves_total`` by outcome.

    ``active``: the placement's requests in flight (rid -> `Progress`); ``eligible``: the healthy engines
    taking a role now; ``leaning``: an engine's leaning; ``enabled``: ``--move-decodes``."""

    def __init__(self, cfg: RouterConfig, pool: WorkerPool, client: WorkerClient, reg: Registry,
                 active: dict[str, Progress], eligible: Eligible, leaning: Callable[[WorkerHandle], str],
                 clock: Callable[[], float], enabled: bool = True) -> None:
        self.cfg = cfg
        self.pool = pool
        self.client = client
        self.active = active
        self.eligible = eligible
        self.leaning = leaning
        self.clock = clock
        self.enabled = enabled
        self._legs: dict[str, asyncio.Future[WorkerStream | None]] = {}  # rid -> dst's stream, once src let go
        self.m_moves = reg.counter("pdbox_decode_moves_total", "Decoding requests moved to another engine, by outcome",
                                   ("outcome",))

    @property
    def count(self) -> int:
        """Requests moved so far."""
        return int(self.m_moves.get(outcome="moved"))

    @property
    def failed(self) -> int:
        """Moves tried that left the request where it was (no room at the destination, or the source
        refused or failed the push)."""
        return int(self.m_moves.get(outcome="no_room") + self.m_moves.get(outcome="refused"))

    async def evacuate(self, engine: str) -> int:
        """Move every request decoding on ``engine`` to the decode-leaning engines (fewest decodes first);
        returns how many moved. Those still prefilling there (no first token yet) stay."""
        if not self.enabled:
            return 0
        todo = [rid for rid, p in self.active.items()
                if p.decode_on == engine and p.first_at is not None and not p.moving and p.parsed is not None]
        dsts = [w for w in self.eligible("decode") if w.name != engine]
        if not todo or not dsts:
            return 0
        load = {w.name: sum(1 for p in self.active.values() if p.decode_on == w.name) for w in dsts}
        plan = []
        for rid in todo:  # spread them: each goes where the fewest decode, KV room breaking ties
            dst = min(dsts, key=lambda w: (load[w.name], -w.kv_free))
            load[dst.name] += 1
            plan.append(self.move(rid, dst))
        return sum(await asyncio.gather(*plan))

    async def evacuate_all(self, engine: str) -> None:
        """While ``engine`` leans prefill: move its decodes off it, and the prompts it was prefilling for
        itself as soon as they decode (they would otherwise decode beside its prefills), within a deadline."""
        deadline = self.clock() + EVACUATE_WITHIN_S
        w = self.pool.workers.get(engine)
        while (self.enabled and w is not None and self.leaning(w) == "prefill" and self.clock() < deadline
               and any(p.decode_on == engine for p in self.active.values())):
            await self.evacuate(engine)
            await asyncio.sleep(EVACUATE_POLL_S)

    async def move(self, rid: str, dst: WorkerHandle) -> bool:
        """Move one decoding request to ``dst``: reserve pages there, have its engine push the KV and let
        go (its stream ends ``moved``), and hand ``dst``'s stream to the request's own generator."""
        p = self.active.get(rid)
        if p is None or p.parsed is None or p.moving or p.decode_on == dst.name or rid in self._legs:
            return False
        src = self.pool.workers.get(p.decode_on)
        if src is None:
            return False
        parsed, room = p.parsed, secrets.token_urlsafe(18)
        context = len(parsed.prompt_ids) + p.emitted + MARGIN_TOKENS
        if self.pool.max_model_len:
            context = min(context, self.pool.max_model_len - 1)
        dreq = DecodeRequest(rid=rid, room=room, prompt_ids=parsed.prompt_ids, sampling=parsed.sampling,
                             lease_s=self.cfg.lease_s + self.cfg.lease_per_token_s * context, reserve_tokens=context)
        p.moving = True
        leg: asyncio.Future[WorkerStream | None] = asyncio.get_running_loop().create_future()
        try:
            try:
                stream, reserved = await self.client.reserve(dst, dreq)
            except (WorkerFailed, oai.ApiError) as exc:
                self.m_moves.inc(outcome="no_room")
                log.info("move %s %s -> %s: %s", rid, src.name, dst.name, exc)
                return False
            self._legs[rid] = leg
            try:
                await self.client.move(src, MoveRequest(rid=rid, room=room, dst_pages=reserved.pages,
                                                        handles=reserved.handles))
            except (WorkerFailed, oai.ApiError) as exc:
                self.m_moves.inc(outcome="refused")
                log.warning("move %s %s -> %s refused: %s", rid, src.name, dst.name, str(exc)[:200])
                leg.set_result(None)
                self.client.done_with(stream)  # closing the stream is the abort: dst frees the room
                await stream.events.aclose()  # type: ignore[attr-defined]
                return False
            except BaseException:  # cancelled mid-way (the router is stopping)
                leg.set_result(None)
                self.client.done_with(stream)
                raise
            self.m_moves.inc(outcome="moved")
            dst.inflight += 1
            p.decode_on = dst.name
            leg.set_result(stream)
            if self.active.get(rid) is not p:  # the client left while it moved: nobody will read dst's stream
                self.drop(rid)
            return True
        finally:
            p.moving = False
            if self._legs.get(rid) is leg and leg.done() and leg.result() is None:
                del self._legs[rid]

    def drop(self, rid: str) -> None:
        """The request is over: close a destination stream nobody will read (the client left mid-move)."""
        leg = self._legs.pop(rid, None)
        if leg is not None and leg.done() and leg.result() is not None:
            stream = leg.result()
            assert stream is not None
            stream.worker.inflight -= 1
            self.client.done_with(stream)

    async def follow(self, rid: str, p: Progress, moved: Moved) -> AsyncIterator[Relayed]:
        """The rest of a moved request, from the engine it moved to (which may move it on again)."""
        while True:
            fut, stream = self._legs.get(rid), None
            if fut is not None:
                try:  # NOTE: the source let go after the push; the router's answer to the move may lag a little
                    stream = await asyncio.wait_for(asyncio.shield(fut), self.cfg.connect_timeout_s)
                except TimeoutError:
                    pass
            self._legs.pop(rid, None)
            if stream is None:
                raise WorkerFailed(f"{p.decode_on} let request {rid} go, but its move did not complete")
            dst = stream.worker
            p.decode_on = dst.name
            # the client has the first token, from the engine it moved from: relay drops ``first`` events
            events = relay(stream.events, dst.name, idle_s=self.cfg.stream_idle_s, first_wait_s=self.cfg.stream_idle_s,
                           usage=lambda _ev: (moved.prompt_tokens, moved.cached_tokens))
            try:
                async for ev in events:
                    if isinstance(ev, Moved):
                        break  # on again: follow it to the next engine
                    yield ev
                    if isinstance(ev, Outcome):
                        return
            finally:
                dst.inflight -= 1
                self.client.done_with(stream)
                await events.aclose()  # type: ignore[attr-defined]
                await stream.events.aclose()  # type: ignore[attr-defined]
