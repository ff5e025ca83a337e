"""The placement of ``--mode auto``: per-request disaggregation and live role rebalancing.

Every worker runs role ``auto`` (it can prefill, decode and hand KV over). Each engine leans
``prefill`` or ``decode`` (the :class:`RoleBalancer` moves them as traffic shifts). A request goes
to a decode-leaning engine; :func:`decide` says whether a prefill-leaning engine computes its
prompt and hands the KV over, or the decode engine prefills it itself. The choice reaches the
dispatcher as an explicit argument (the engines by role).

An engine that turns prefill does not wait for its decodes to end: they move, KV and all, to another
decode engine (:class:`~appliance.serve.decode_mover.DecodeMover`, owned here). What each engine's
load is, as the router estimates it between reports: :class:`~appliance.serve.engine_loads.EngineLoads`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from appliance.serve import openai_api as oai
from appliance.serve.adaptive import Decision, RoleBalancer, decide
from appliance.serve.decode_mover import DecodeMover
from appliance.serve.dispatch import Dispatcher
from appliance.serve.engine_loads import EngineLoads
from appliance.serve.policies import CacheAware, WorkerHandle
from appliance.serve.progress import Progress
from appliance.serve.protocol import Moved, Tokens
from appliance.serve.relay import Relayed
from appliance.serve.router_config import AutoConfig, RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.worker_client import WorkerClient
from appliance.serve.worker_pool import WorkerPool

log = logging.getLogger("pdbox.auto")

DECODE_BUSY_FRAC = 0.8  # a prefill engine turns to decode only while decode steps take >= this x the TPOT SLO
DRAIN_POLL_S = 0.02  # how often a prompt held for a draining engine looks again
BORROW_BELOW = 0.25  # with moves: the last prefill engine turns decode under this handed-over demand
# (engine-seconds per second, the long window): at most one ~3.5 s long prompt in 20 s borrows an engine
LEANING_LABELS = ("target", "leaning")  # pdbox_engine_leaning: one series per engine and leaning


class AdaptivePlacement:
    def __init__(self, cfg: RouterConfig, auto: AutoConfig, pool: WorkerPool, client: WorkerClient,
                 metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.auto = auto
        self.pool = pool
        self.clock = clock
        self.balancer: RoleBalancer | None = None
        self.tracker = CacheAware(cfg.page_size)
        self.dispatch = Dispatcher(cfg, client, metrics, self.healthy)
        r = metrics.reg
        self.reg = r
        self.m_decisions = r.counter("pdbox_auto_decisions_total", "Adaptive-mode decisions by outcome and reason",
                                     ("decision", "reason"))
        self.m_switches = r.counter("pdbox_role_switches_total", "Engines that changed leaning", ("target", "leaning"))
        self.m_rejected = r.counter("pdbox_slo_rejections_total", "Requests refused because TTFT SLO was out of reach")
        self.last_decision = ""
        self.active: dict[str, Progress] = {}
        self.loaded_at: dict[str, float] = {}
        pool.load_listeners.append(lambda w: self.loaded_at.__setitem__(w.name, self.clock()))
        self.est = EngineLoads(pool, auto, self.active, self.loaded_at, clock, self.leaning, self.healthy)
        self._tasks: set[asyncio.Task] = set()
        self.mover = DecodeMover(cfg, pool, client, r, self.active, self.healthy, self.leaning, clock, auto.move)

    # -- engines and their leanings ----------------------------------------------------------------
    def leaning(self, w: WorkerHandle) -> str:
        if self.balancer is not None and w.name in self.balancer.leanings:
            return self.balancer.leanings[w.name]
        return "prefill" if w.name in self.auto.initial_prefill else "decode"

    def healthy(self, role: str) -> list[WorkerHandle]:
        live = [w for w in self.pool.workers.values() if w.healthy]
        if role in ("auto", "unified"):
            return live
        return [w for w in live if self.leaning(w) == role]

    def roles(self) -> tuple[str, ...]:
        return ("auto",)

    async def health_loop(self) -> None:
        while True:
            await self.pool.refresh_all()
            moved = self.rebalance()
            if moved is not None and self.leaning(self.pool.workers[moved]) == "prefill":
                self._background(self.mover.evacuate_all(moved))
            await asyncio.sleep(self.cfg.health_interval_s)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _balancer(self) -> RoleBalancer:
        if self.balancer is None:
            self.balancer = RoleBalancer(self.est.cost(), self.clock, idle_s=self.auto.rebalance_idle_s,
                                         borrow_below=BORROW_BELOW if self.auto.move else 0.0)
            for w in self.pool.workers.values():
                self.balancer.leanings[w.name] = "prefill" if w.name in self.auto.initial_prefill else "decode"
        return self.balancer

    def rebalance(self) -> str | None:
        if not self.auto.rebalance or not self.pool.workers:
            return None
        balancer = self._balancer()
        balancer.cost = self.est.cost()
        balancer.decode_busy_s = DECODE_BUSY_FRAC * self.est.tpot_slo_s()
        moved = balancer.tick(self.est.loads())
        if moved is not None:
            self._counted(moved)
        for w in self.pool.workers.values():
            self.reg.gauge("pdbox_engine_leaning", "1 on the leaning an engine has now", LEANING_LABELS).set(
                1.0, target=w.name, leaning=self.leaning(w))
            self.reg.gauge("pdbox_engine_leaning", "1 on the leaning an engine has now", LEANING_LABELS).set(
                0.0, target=w.name, leaning="decode" if self.leaning(w) == "prefill" else "prefill")
        return moved

    def _switch(self, name: str, leaning: str, why: str) -> None:
        if self.leaning(self.pool.workers[name]) == leaning:
            return
        self._balancer().assign(name, leaning, why)
        self._counted(name)

    def _counted(self, name: str) -> None:
        """An engine changed leaning (by the balancer's tick or a drain): metrics and log."""
        self.m_switches.inc(target=name, leaning=self.leaning(self.pool.workers[name]))
        log.info("role switch: %s", self._balancer().last_reason)

    async def set_leaning(self, name: str, leaning: str) -> int:
        """Operator: lean engine ``name`` ``prefill`` or ``decode`` now; returns how many decodes moved off
        it. Turning prefill moves its decodes to the other decode engines first; the balancer may change
        it again later. ``name`` must be one of the pool's engines."""
        w = self.pool.workers[name]
        if leaning == "prefill" and not [x for x in self.healthy("decode") if x is not w]:
            raise oai.ApiError(409, f"{name} is the last healthy decode-leaning engine; it must stay decode",
                               kind="conflict")
        self._switch(name, leaning, "operator request")
        moved = 0
        if leaning == "prefill":
            moved = await self.mover.evacuate(name)
            self._background(self.mover.evacuate_all(name))  # what still prefills there moves once it decodes
        return moved

    def describe(self, w: WorkerHandle) -> dict[str, Any]:
        return {"leaning": self.leaning(w)}

    def summary(self) -> dict[str, Any]:
        return {"last_decision": self.last_decision, "role_switches": self.balancer.switches if self.balancer else 0,
                "decodes_moved": self.mover.count, "decode_moves_failed": self.mover.failed}

    # -- the decision ------------------------------------------------------------------------------
    def choose(self, ids: Sequence[int]) -> tuple[str, dict[str, WorkerHandle], Decision, int]:
        """Where this prompt goes: ("disagg" | "local", the engines by role, the decision, uncached tokens)."""
        decoders = self.healthy("decode") or self.healthy("auto")
        if not decoders:
            raise oai.ApiError(503, "no healthy engine is available; retry later", kind="server_error",
                               headers={"Retry-After": "2"})
        d = self.dispatch.policies["decode"].pick(decoders, ids)
        cost, slo_ttft_s = self.est.cost(), self.auto.slo_ttft_ms / 1e3
        uncached = len(ids) - self.tracker.matched_tokens(d, ids)
        loads = {e.name: e for e in self.est.loads(uncached)}
        prefill = [loads[w.name] for w in self.healthy("prefill")]
        decision = decide(uncached, loads[d.name], prefill, cost, slo_ttft_s)
        if not decision.disagg and decision.needs_prefill_engine:
            # no prefill engine to hand over to, and this one's decodes cannot absorb the prefill:
            # another decode engine (most slack first) may, prefilling it where it decodes
            for alt in sorted((w for w in decoders if w is not d), key=lambda w: -loads[w.name].slack_s):
                n = len(ids) - self.tracker.matched_tokens(alt, ids)
                other = decide(n, {e.name: e for e in self.est.loads(n)}[alt.name], prefill, cost, slo_ttft_s)
                if not other.needs_prefill_engine:
                    d, uncached = alt, n
                    decision = replace(other, reason=f"moved to {alt.name}: {other.reason}", code="moved")
                    break
            else:
                if self.auto.rebalance:  # or one of the others drains, turns prefill and hands over
                    others = [loads[w.name] for w in decoders if w is not d]
                    decision = decide(uncached, loads[d.name], prefill, cost, slo_ttft_s, others=others)
        if self.auto.slo_ttft_ms:
            predicted = decision.disagg_ttft_s if decision.disagg else decision.local_ttft_s
            if predicted * 1e3 > self.auto.reject_factor * self.auto.slo_ttft_ms:
                self.m_rejected.inc()
                raise oai.ApiError(429, f"predicted time to first token {predicted * 1e3:.0f} ms is beyond "
                                        f"{self.auto.reject_factor:g} x the {self.auto.slo_ttft_ms:g} ms SLO; "
                                        "retry later",
                                   kind="rate_limit_error", headers={"Retry-After": "1"})
        if self.auto.rebalance:
            self._balancer().record(cost.prefill_s(uncached), needed=decision.needs_prefill_engine)
        if decision.code == "drain":
            self._switch(decision.prefill_on, "prefill", decision.reason)
        if decision.disagg:
            p = self.pool.workers[decision.prefill_on]
            return "disagg", {"prefill": p, "decode": d}, decision, uncached
        return "local", {"unified": d}, decision, uncached

    # -- the request -------------------------------------------------------------------------------
    def generate(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Relayed]:
        kind, choice, decision, uncached = self.choose(parsed.prompt_ids)
        self.last_decision = f"{kind}: {decision.reason}"
        self.m_decisions.inc(decision=kind, reason=decision.code)
        decoder = choice.get("unified") or choice["decode"]
        self.tracker.record(decoder, parsed.prompt_ids)
        log.debug("%s -> %s (%s)", rid, kind, decision.reason)
        if kind == "local":
            gen = self.dispatch.unified(parsed, rid, choice)
        else:
            gen = self.dispatch.disagg(parsed, rid, choice)
        progress = Progress((choice.get("prefill") or decoder).name, decoder.name, uncached,
                            parsed.sampling.max_tokens, self.clock(), parsed=parsed)
        if decision.code == "drain":
            # its decodes move away now, and the prompts it prefills for itself once they decode: else
            # they would decode beside its prefills when the hold ends first (measured: 180 ms TPOT)
            self._background(self.mover.evacuate_all(choice["prefill"].name))
            gen = self._after_drain(choice["prefill"].name, decision.wait_s, gen, progress)
        return self._tracked(rid, progress, gen)

    async def _after_drain(self, engine: str, wait_s: float, gen: AsyncIterator[Relayed],
                           mine: Progress) -> AsyncIterator[Relayed]:
        """Hold a prompt until ``engine`` has no decodes left (at most ``wait_s``), then run ``gen``.
        (The engine's decodes are moving away meanwhile, see :meth:`DecodeMover.evacuate_all`.)"""
        deadline = self.clock() + wait_s
        try:
            mine.held = True
            while self.clock() < deadline and any(p.decode_on == engine for p in self.active.values()):
                await asyncio.sleep(DRAIN_POLL_S)
            mine.held, mine.sent_at = False, self.clock()
            async for ev in gen:
                yield ev
        finally:
            await gen.aclose()  # type: ignore[attr-defined]

    async def _tracked(self, rid: str, p: Progress, gen: AsyncIterator[Relayed]
                       ) -> AsyncIterator[Relayed]:
        """Pass the events through, keeping the request's progress for the slack and queue estimates."""
        self.active[rid] = p
        try:
            async for ev in gen:
                if isinstance(ev, Moved):
                    await gen.aclose()  # type: ignore[attr-defined]
                    gen = self.mover.follow(rid, p, ev)
                    async for later in gen:
                        if isinstance(later, Tokens) and later.token_ids:
                            p.emitted += len(later.token_ids)
                        yield later
                    return
                if isinstance(ev, Tokens) and ev.token_ids:
                    if p.first_at is None:
                        p.first_at = self.clock()
                    p.emitted += len(ev.token_ids)
                yield ev
        finally:
            self.active.pop(rid, None)
            self.mover.drop(rid)
            await gen.aclose()  # type: ignore[attr-defined]
