"""One request on its engines: unified (one engine runs it all) or disaggregated (prefill hands the KV
to decode). The placement says which, and may name the engines; the dispatcher picks any it does
not name, opens the worker legs, relays their events and, on every way out, aborts what is left.

Disaggregated lifecycle (docs/design.md §3): mint an unguessable room id, open the decode stream
(decode reserves pages or refuses at once; another decode engine is tried, or, when all are up but
full, asked again within ``kv_wait_s``), send the prompt to prefill with decode's page ids and pool
handle, stream prefill's first token as soon as it is sampled, then relay decode's tokens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType

from appliance.serve import openai_api as oai
from appliance.serve.policies import Policy, WorkerHandle, make_policy
from appliance.serve.protocol import (
    MAX_LEASE_S,
    DecodeRequest,
    Done,
    First,
    GenerateRequest,
    Moved,
    PrefillRequest,
    Reserved,
    Tokens,
)
from appliance.serve.relay import Relayed, relay
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.worker_client import WorkerBusy, WorkerClient, WorkerFailed, WorkerStream

log = logging.getLogger("pdbox.router")
KV_RETRY_S = 0.25  # how often a prompt waiting for decode KV pages asks again
RENEW_MIN_S = 0.1  # decode's reservation is renewed at most this often
Chosen = Mapping[str, WorkerHandle]  # role -> the engine the placement chose for it ({}: the policies pick)
NO_CHOICE: Chosen = MappingProxyType({})
Eligible = Callable[[str], list[WorkerHandle]]  # role -> the healthy engines that may take it now


class Dispatcher:
    def __init__(self, cfg: RouterConfig, client: WorkerClient, metrics: RouterMetrics, eligible: Eligible) -> None:
        self.cfg = cfg
        self.client = client
        self.metrics = metrics
        self.eligible = eligible
        self.policies: dict[str, Policy] = {
            "prefill": make_policy(cfg.prefill_policy, cfg.page_size),
            "decode": make_policy(cfg.decode_policy, cfg.page_size),
            "unified": make_policy(cfg.unified_policy, cfg.page_size),
        }

    def pick(self, role: str, ids: list[int], exclude: set[str], chosen: Chosen) -> WorkerHandle:
        """The placement's engine for ``role`` while it is healthy and not excluded, else the policy's."""
        w = chosen.get(role)
        if w is not None and w.name not in exclude and w.healthy:
            return w
        pool = [w for w in self.eligible(role) if w.name not in exclude]
        if not pool:
            raise oai.ApiError(503, f"no healthy {role} worker is available; retry later", kind="server_error",
                               headers={"Retry-After": "2"})
        return self.policies[role].pick(pool, ids)

    async def unified(self, parsed: oai.ParsedRequest, rid: str, chosen: Chosen = NO_CHOICE
                      ) -> AsyncIterator[Relayed]:
        tried: set[str] = set()
        req = GenerateRequest(rid=rid, prompt_ids=parsed.prompt_ids, sampling=parsed.sampling)
        while True:
            w = self.pick("unified", parsed.prompt_ids, tried, chosen)
            # NOTE: counted from the pick, not from the worker's answer: prompts arriving together must see
            # each other (a busy worker answers late, and 46 of a burst of 48 went to one engine).
            w.inflight += 1
            try:
                stream = await self.client.generate(w, req)
                break
            except WorkerFailed as exc:
                w.inflight -= 1
                log.warning("retrying elsewhere: %s", exc)
                tried.add(w.name)
            except BaseException:
                w.inflight -= 1
                raise
        self.policies["unified"].record(w, parsed.prompt_ids)
        # NOTE: no deadline before the first token: the request may queue behind others' prefills
        events = relay(stream.events, w.name, idle_s=self.cfg.stream_idle_s, first_wait_s=None)
        try:
            async for ev in events:
                yield ev
        finally:
            # NOTE: the abort first, before any await (see disagg's finally).
            w.inflight -= 1
            self.client.done_with(stream)
            await events.aclose()  # type: ignore[attr-defined]
            await stream.events.aclose()  # type: ignore[attr-defined]

    async def reserve_decode(self, ids: list[int], dreq: DecodeRequest, chosen: Chosen
                             ) -> tuple[WorkerStream, Reserved]:
        """The stream and reservation of the first decode engine that reserves; when every healthy one is
        up but full, pages free as decodes end, so wait (within ``kv_wait_s``), else 503."""
        tried: set[str] = set()
        busy_only, waited, deadline = True, False, time.monotonic() + self.cfg.kv_wait_s
        while True:
            d = self.pick("decode", ids, tried, chosen)
            d.inflight += 1  # from the pick (see unified); the caller gives it back when the request ends
            try:
                return await self.client.reserve(d, dreq)
            except BaseException as exc:
                d.inflight -= 1
                if not isinstance(exc, WorkerFailed):
                    raise
                busy_only = busy_only and isinstance(exc, WorkerBusy)
                log.log(logging.DEBUG if waited else logging.WARNING, "decode %s refused room: %s", d.name, exc)
                tried.add(d.name)
            if len(tried) < len(self.eligible("decode")):
                continue
            if not (busy_only and time.monotonic() < deadline):
                raise oai.ApiError(503, "no decode worker could reserve KV pages for this prompt; retry later",
                                   kind="server_error", headers={"Retry-After": "1"})
            waited = True
            await asyncio.sleep(KV_RETRY_S)
            tried.clear()

    async def await_handoff(self, p: WorkerHandle, d: WorkerHandle, room: str, lease: float,
                            ptask: asyncio.Future, dtask: asyncio.Future, handoff_by: float, late: str) -> float:
        """Wait for either leg. While prefill's leg is open and its worker healthy, the prompt is only
        queued there (behind others' prefills, which no estimate bounds: shorter prompts may pass it),
        so decode's reservation is renewed each third of the lease, up to ``MAX_LEASE_S`` in all. A
        prefill that is down or hung stops the renewals and the lease ends the wait. The new deadline."""
        clock = asyncio.get_running_loop().time
        give_up_at = clock() + MAX_LEASE_S
        while True:
            left = handoff_by - clock()
            if left <= 0:
                raise WorkerFailed(late)
            done, _ = await asyncio.wait({ptask, dtask}, timeout=min(left, max(lease / 3, RENEW_MIN_S)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                return handoff_by
            if p.healthy and clock() + lease < give_up_at and await self.client.extend(d, room, lease):
                handoff_by = clock() + lease + 2 * self.cfg.connect_timeout_s

    async def disagg(self, parsed: oai.ParsedRequest, rid: str, chosen: Chosen = NO_CHOICE
                     ) -> AsyncIterator[Relayed]:
        cfg = self.cfg
        room = secrets.token_urlsafe(18)
        ids = parsed.prompt_ids
        p = self.pick("prefill", ids, set(), chosen)
        # NOTE: the lease covers the prompts queued on that prefill engine too: a burst of prompts waits
        # its turn there, and a lease for this prompt alone expired in the queue (48 chat prompts at once).
        lease = min(cfg.lease_s + cfg.lease_per_token_s * (p.prefill_tokens + len(ids)), MAX_LEASE_S)
        dreq = DecodeRequest(rid=rid, room=room, prompt_ids=ids, sampling=parsed.sampling, prefill_tp=max(1, p.tp),
                             lease_s=lease)
        p.prefill_tokens += len(ids)  # counted from now on, so prompts arriving together see each other
        p.inflight += 1
        try:
            stream, reserved = await self.reserve_decode(ids, dreq, chosen)
        except BaseException:
            p.prefill_tokens -= len(ids)
            p.inflight -= 1
            raise
        d = stream.worker
        self.policies["prefill"].record(p, ids)
        self.policies["decode"].record(d, ids)
        preq = PrefillRequest(rid=rid, room=room, prompt_ids=ids, sampling=parsed.sampling,
                              dst_pages=reserved.pages, handles=reserved.handles)
        # NOTE: the handoff. Prefill's answer races decode's stream; either leg failing fails the request,
        # and closing the other leg makes that worker drop its part. Decode's lease bounds a stuck prefill.
        ptask = asyncio.ensure_future(self.client.prefill(p, preq))
        ptask.add_done_callback(lambda _t: setattr(p, "prefill_tokens", p.prefill_tokens - len(ids)))
        dtask = asyncio.ensure_future(anext(stream.events))
        cached = 0
        clock = asyncio.get_running_loop().time
        handoff_by = clock() + lease + 2 * cfg.connect_timeout_s
        late = f"no KV handoff from {p.name} to {d.name} within the {lease:.1f} s lease"
        events: AsyncIterator[Relayed] | None = None
        try:
            # NOTE: never yield inside asyncio.timeout (the consumer's awaits would run under it).
            handoff_by = await self.await_handoff(p, d, room, lease, ptask, dtask, handoff_by, late)
            skip_first, prefill_first_at = False, 0.0
            scores = parsed.sampling.prompt_logprobs is not None  # only prefill's answer has the prompt's
            if scores and not ptask.done():
                try:
                    async with asyncio.timeout_at(handoff_by):
                        await asyncio.wait({ptask})
                except TimeoutError:
                    raise WorkerFailed(late) from None
            if not dtask.done() or scores:  # prefill answered first: the client gets the token now
                first = ptask.result()  # raises WorkerFailed / ApiError when prefill failed
                prefill_first_at = time.monotonic()
                cached = first.cached_tokens
                yield Tokens(token_ids=first.token_ids, logprobs=first.logprobs, prompt_logprobs=first.prompt_logprobs)
                skip_first = True
            else:  # decode's first token came before prefill's answer: no handoff time was left to wait
                self.metrics.handoff_tail.observe(0.0)
            try:
                async with asyncio.timeout_at(handoff_by):
                    head = await dtask
            except TimeoutError:
                raise WorkerFailed(late) from None

            def on_first(_ev: First) -> bool:
                if skip_first:  # the client already has it, from prefill
                    self.metrics.handoff_tail.observe(time.monotonic() - prefill_first_at)
                return not skip_first

            def usage(ev: Done | Moved) -> tuple[int, int]:
                if isinstance(ev, Done) and ptask.done() and not ptask.cancelled() and ptask.exception() is None:
                    return len(ids), ptask.result().cached_tokens
                return len(ids), cached

            events = relay(stream.events, d.name, idle_s=cfg.stream_idle_s, first_wait_s=cfg.stream_idle_s,
                           head=head, on_first=on_first, usage=usage)
            async for ev in events:
                yield ev
        finally:
            # NOTE: the engines are told first, without an await: closing decode's stream (and cancelling the
            # prefill leg, which closes prefill's) is the abort. A client that vanished can cancel this task
            # after the cleanup began: aiohttp cancels the handler one loop turn after the write that found
            # the socket closing, so a cancel may land on the first await below, and what follows it is lost.
            p.inflight -= 1
            d.inflight -= 1
            legs = [t for t in (ptask, dtask) if not t.done()]
            for t in (ptask, dtask):
                t.add_done_callback(_retrieved)
                if not t.done():
                    t.cancel()
            self.client.done_with(stream)
            if legs:  # NOTE: wait, not gather: a late cancel of this task must not cancel the legs a second time
                await asyncio.wait(legs)
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
            await stream.events.aclose()  # type: ignore[attr-defined]


def _retrieved(task: asyncio.Future) -> None:
    """Mark a leg's outcome as seen (its error, if any, was handled or superseded by the request's own)."""
    if not task.cancelled():
        task.exception()
