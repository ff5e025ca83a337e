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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from appliance.serve import openai_api as oai
from appliance.serve.policies import WorkerHandle
from appliance.serve.protocol import DecodeRequest, Event, MoveRequest
from appliance.serve.router import Outcome, WorkerFailed

if TYPE_CHECKING:
    from appliance.serve.auto_router import AutoRouter, _Progress

log = logging.getLogger("pdbox.auto")
MARGIN_TOKENS = 64  # pages reserved for a moving request beyond its context as the router last saw it
EVACUATE_POLL_S = 0.25  # how often an engine turned prefill looks again for decodes to move off it
EVACUATE_WITHIN_S = 120.0  # ... and for how long


class DecodeMover:
    """The adaptive router's moves, counted in ``pdbox_decode_moves_total`` by outcome."""

    def __init__(self, router: AutoRouter) -> None:
        self.r = router
        self._legs: dict[str, asyncio.Future] = {}  # rid -> the destination's stream, once its source let go
        self.m_moves = router.reg.counter("pdbox_decode_moves_total",
                                          "Decoding requests moved to another engine, by outcome")

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
        r = self.r
        if not r.auto.move:
            return 0
        todo = [rid for rid, p in r.active.items()
                if p.decode_on == engine and p.first_at is not None and not p.moving and p.parsed is not None]
        dsts = [w for w in r.healthy("decode") if w.name != engine]
        if not todo or not dsts:
            return 0
        load = {w.name: sum(1 for p in r.active.values() if p.decode_on == w.name) for w in dsts}
        plan = []
        for rid in todo:  # spread them: each goes where the fewest decode, KV room breaking ties
            dst = min(dsts, key=lambda w: (load[w.name], -kv_free(w)))
            load[dst.name] += 1
            plan.append(self.move(rid, dst))
        return sum(await asyncio.gather(*plan))

    async def evacuate_all(self, engine: str) -> None:
        """While ``engine`` leans prefill: move its decodes off it, and the prompts it was prefilling for
        itself as soon as they decode (they would otherwise decode beside its prefills), within a deadline."""
        r = self.r
        deadline = r.clock() + EVACUATE_WITHIN_S
        w = r.workers.get(engine)
        while (r.auto.move and w is not None and r.leaning(w) == "prefill" and r.clock() < deadline
               and any(p.decode_on == engine for p in r.active.values())):
            await self.evacuate(engine)
            await asyncio.sleep(EVACUATE_POLL_S)

    async def move(self, rid: str, dst: WorkerHandle) -> bool:
        """Move one decoding request to ``dst``: reserve pages there, have its engine push the KV and let
        go (its stream ends ``moved``), and hand ``dst``'s stream to the request's own generator."""
        r = self.r
        p = r.active.get(rid)
        if p is None or p.parsed is None or p.moving or p.decode_on == dst.name or rid in self._legs:
            return False
        src = r.workers.get(p.decode_on)
        if src is None:
            return False
        parsed, room = p.parsed, secrets.token_urlsafe(18)
        context = len(parsed.prompt_ids) + p.emitted + MARGIN_TOKENS
        if r.max_model_len:
            context = min(context, r.max_model_len - 1)
        dreq = DecodeRequest(rid=rid, room=room, prompt_ids=parsed.prompt_ids, sampling=parsed.sampling,
                             lease_s=r.cfg.lease_s + r.cfg.lease_per_token_s * context, reserve_tokens=context)
        p.moving = True
        leg: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            try:
                dresp, lines, reserved = await r._reserve(dst, dreq)
            except (WorkerFailed, oai.ApiError) as exc:
                self.m_moves.inc(outcome="no_room")
                log.info("move %s %s -> %s: %s", rid, src.name, dst.name, exc)
                return False
            self._legs[rid] = leg
            try:
                resp = await r._post(src, "/internal/move", MoveRequest(
                    rid=rid, room=room, dst_pages=reserved.pages, handles=reserved.handles))
                r._done_with(src, resp)
            except (WorkerFailed, oai.ApiError) as exc:
                self.m_moves.inc(outcome="refused")
                log.warning("move %s %s -> %s refused: %s", rid, src.name, dst.name, str(exc)[:200])
                leg.set_result(None)
                r._done_with(dst, dresp)  # closing the stream is the abort: dst frees the room
                await lines.aclose()
                return False
            except BaseException:  # cancelled mid-way (the router is stopping)
                leg.set_result(None)
                r._done_with(dst, dresp)
                raise
            self.m_moves.inc(outcome="moved")
            dst.inflight += 1
            p.decode_on = dst.name
            leg.set_result((dst, dresp, lines))
            if r.active.get(rid) is not p:  # the client left while it moved: nobody will read dst's stream
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
            dst, dresp, _ = leg.result()
            dst.inflight -= 1
            self.r._done_with(dst, dresp)

    async def follow(self, rid: str, p: _Progress, moved: Event) -> AsyncIterator[Event | Outcome]:
        """The rest of a moved request, from the engine it moved to (which may move it on again)."""
        r = self.r
        while True:
            fut, leg = self._legs.get(rid), None
            if fut is not None:
                try:  # NOTE: the source let go after the push; the router's answer to the move may lag a little
                    leg = await asyncio.wait_for(asyncio.shield(fut), r.cfg.connect_timeout_s)
                except TimeoutError:
                    pass
            self._legs.pop(rid, None)
            if leg is None:
                raise WorkerFailed(f"{p.decode_on} let request {rid} go, but its move did not complete")
            dst, dresp, lines = leg
            p.decode_on = dst.name
            try:
                while True:
                    ev = await r._next(lines, dst.name, r.cfg.stream_idle_s)
                    if ev.kind == "first":
                        continue  # the client has that token, from the engine it moved from
                    if ev.kind == "tokens":
                        yield Event(kind="tokens", token_ids=ev.token_ids, logprobs=ev.logprobs)
                    elif ev.kind == "done":
                        yield Outcome(ev.finish_reason, moved.prompt_tokens, moved.cached_tokens)
                        return
                    elif ev.kind == "error":
                        raise oai.ApiError(ev.status or 502, ev.message, kind="server_error")
                    elif ev.kind == "moved":
                        break
            finally:
                dst.inflight -= 1
                r._done_with(dst, dresp)
                await lines.aclose()


def kv_free(w: WorkerHandle) -> float:
    """The share of ``w``'s KV pages free or evictable, as its last load report says."""
    total = w.load.get("total_pages") or 1
    return (w.load.get("free_pages", total) + w.load.get("evictable_pages", 0)) / total
