"""The router of ``--mode auto``: per-request disaggregation and live role rebalancing.

Every worker runs role ``auto`` (it can prefill, decode and hand KV over). Each engine leans
``prefill`` or ``decode`` (the :class:`RoleBalancer` moves them as traffic shifts). A request goes
to a decode-leaning engine; :func:`decide` says whether a prefill-leaning engine computes its
prompt and hands the KV over, or the decode engine prefills it itself.

An engine that turns prefill does not wait for its decodes to end: the router moves each of them,
KV and all, to another decode engine (:class:`~appliance.serve.decode_mover.DecodeMover`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from aiohttp import web

from appliance.engine.scheduler import ttft_slack
from appliance.serve import openai_api as oai
from appliance.serve.adaptive import CostModel, Decision, EngineLoad, RoleBalancer, decide, decode_slack_s
from appliance.serve.decode_mover import DecodeMover, kv_free
from appliance.serve.policies import CacheAware, WorkerHandle
from appliance.serve.protocol import Event
from appliance.serve.router import Outcome, Router, RouterConfig

log = logging.getLogger("pdbox.auto")
_choice: contextvars.ContextVar[dict[str, WorkerHandle]] = contextvars.ContextVar("pdbox_auto_choice")


DECODE_BUSY_FRAC = 0.8  # a prefill engine turns to decode only while decode steps take >= this x the TPOT SLO
DRAIN_POLL_S = 0.02  # how often a prompt held for a draining engine looks again
MOVE_S = 0.5  # what moving an engine's decodes elsewhere takes (a step there, the push, a step here)
BORROW_BELOW = 0.25  # with moves: the last prefill engine turns decode under this handed-over demand
# (engine-seconds per second, the long window): at most one ~3.5 s long prompt in 20 s borrows an engine


@dataclass(frozen=True)
class AutoConfig:
    """``slo_tpot_ms``/``slo_ttft_ms`` 0 = derived from the calibration (1.5 x step; TTFT relative to the
    prompt's own prefill, and no admission control). ``rebalance_idle_s``: how long the handed-over
    prefill demand must stay low before a prefill-leaning engine turns to decode."""

    initial_prefill: tuple[str, ...] = ()
    slo_tpot_ms: float = 0.0
    slo_ttft_ms: float = 0.0
    reject_factor: float = 2.0
    rebalance: bool = True
    rebalance_idle_s: float = 20.0
    move: bool = True  # an engine turning prefill moves its decodes to another engine (else: they drain)

    def __post_init__(self) -> None:
        for flag, value in (("--slo-tpot-ms", self.slo_tpot_ms), ("--slo-ttft-ms", self.slo_ttft_ms)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0 (0: derived), got {value:g}")
        if self.rebalance_idle_s <= 0:
            raise ValueError(f"--rebalance-idle-s must be > 0, got {self.rebalance_idle_s}")


@dataclass
class _Progress:
    """One request in flight, as the router sees it: where it prefills and decodes, and how far it is."""

    prefill_on: str
    decode_on: str
    tokens: int  # uncached prompt tokens sent to prefill
    max_tokens: int
    sent_at: float  # when the prompt went to its prefill engine (after a drain hold, if any)
    first_at: float | None = None
    emitted: int = 0
    held: bool = False  # waiting in the router for ``prefill_on`` to drain: its prefill counts as queued there
    parsed: oai.ParsedRequest | None = None  # what a move needs to re-open the request elsewhere
    moving: bool = False


class AutoRouter(Router):
    def __init__(self, cfg: RouterConfig, auto: AutoConfig, tokenizer, vocab_size: int, max_model_len: int = 0,
                 clock=time.monotonic) -> None:
        super().__init__(cfg, tokenizer, vocab_size, max_model_len)
        self.auto = auto
        self.clock = clock
        self.balancer: RoleBalancer | None = None
        self.tracker = CacheAware(cfg.page_size)
        r = self.reg
        self.m_decisions = r.counter("pdbox_auto_decisions_total", "Adaptive-mode decisions by outcome and reason")
        self.m_switches = r.counter("pdbox_role_switches_total", "Engines that changed leaning")
        self.m_rejected = r.counter("pdbox_slo_rejections_total", "Requests refused because TTFT SLO was out of reach")
        self.last_decision = ""
        self.active: dict[str, _Progress] = {}
        self.loaded_at: dict[str, float] = {}
        self._derived_tpot_s: float | None = None
        self._tasks: set[asyncio.Task] = set()
        self.mover = DecodeMover(self)

    # -- engines and their leanings ------------------------------------------------------------------
    def cost(self) -> CostModel:
        live = [w for w in self.workers.values() if w.healthy and w.load.get("prefill_tok_s")]
        if not live:
            return CostModel(prefill_tok_s=200.0, decode_step_s=0.05)
        rate = min(float(w.load["prefill_tok_s"]) for w in live)
        step = max(float(w.load.get("decode_step_s", 0.05)) for w in live)
        return CostModel(prefill_tok_s=rate, decode_step_s=step)

    def tpot_slo_s(self) -> float:
        """The TPOT SLO: the configured one, else 1.5 x the step first reported (the start-up calibration,
        fixed from then on: the live step grows with the batch, the target must not)."""
        if self.auto.slo_tpot_ms:
            return self.auto.slo_tpot_ms / 1e3
        if self._derived_tpot_s is None:
            steps = [float(w.load["decode_step_s"]) for w in self.workers.values() if w.load.get("decode_step_s")]
            if not steps:
                return 1.5 * self.cost().decode_step_s
            self._derived_tpot_s = 1.5 * min(steps)
        return self._derived_tpot_s

    def leaning(self, w: WorkerHandle) -> str:
        if self.balancer is not None and w.name in self.balancer.leanings:
            return self.balancer.leanings[w.name]
        return "prefill" if w.name in self.auto.initial_prefill else "decode"

    async def _load(self, w: WorkerHandle) -> None:
        await super()._load(w)
        self.loaded_at[w.name] = self.clock()

    def slack_s(self, w: WorkerHandle) -> float:
        """The least stall any request decoding on ``w`` can still absorb within the TPOT SLO."""
        now, slo = self.clock(), self.tpot_slo_s()
        step = float(w.load.get("decode_step_s") or self.cost().decode_step_s)
        return min((decode_slack_s(p.max_tokens, p.emitted, now - p.first_at if p.first_at else 0.0, step, slo)
                    for p in self.active.values() if p.decode_on == w.name), default=math.inf)

    def queued_prefill_tokens(self, w: WorkerHandle) -> int:
        """The worker's last report, or, when larger, what the router sent it since that report."""
        since = self.loaded_at.get(w.name, -math.inf)
        sent = sum(p.tokens for p in self.active.values()
                   if p.prefill_on == w.name and p.first_at is None and (p.held or p.sent_at >= since))
        return max(int(w.load.get("queued_prefill_tokens", 0)), sent)

    def queued_ahead(self, w: WorkerHandle, tokens: int) -> int:
        """Prompt tokens ``w`` will prefill before a new prompt of ``tokens``. Auto engines prefill in
        slack order (the scheduler's): a queued prompt goes first when its TTFT slack is the smaller,
        so a short prompt passes long ones that have not waited long - but not the chunk the engine
        is running now, which finishes first. Queued prompts count whole."""
        now, rate = self.clock(), self.cost().prefill_tok_s
        mine = ttft_slack(now, tokens, tokens, rate, now)
        ahead, passed = 0, 0
        for p in self.active.values():
            if p.prefill_on == w.name and p.first_at is None:
                if ttft_slack(p.sent_at, p.tokens, p.tokens, rate, now) <= mine:
                    ahead += p.tokens
                else:
                    passed = max(passed, p.tokens)
        if ahead:
            return ahead
        return min(int(w.load.get("prefill_chunk") or 0), passed)  # the chunk of a passed prompt running now

    def loads(self, tokens: int | None = None) -> list[EngineLoad]:
        """Every engine's load; with ``tokens``, its prefill queue is what would run before such a prompt."""
        out = []
        for w in self.workers.values():
            free = kv_free(w)
            running = sum(1 for p in self.active.values() if p.decode_on == w.name)
            queued = self.queued_prefill_tokens(w) if tokens is None else self.queued_ahead(w, tokens)
            out.append(EngineLoad(w.name, self.leaning(w), queued, running, free, w.healthy,
                                  self.slack_s(w), float(w.load.get("decode_step_s") or 0.0), self.drain_s(w)))
        return out

    def drain_s(self, w: WorkerHandle) -> float:
        """Until no request decodes on ``w``: its remaining tokens at the current step, or, when its
        decodes can move to another engine, the move (after the prompts it is prefilling for itself,
        which :func:`decide` counts as its queued prefill)."""
        cost = self.cost()
        step = float(w.load.get("decode_step_s") or cost.decode_step_s)
        mine = [p for p in self.active.values() if p.decode_on == w.name]
        if not mine:
            return 0.0
        if self.auto.move and any(x is not w for x in self.healthy("decode")):
            return MOVE_S  # after the prompts it prefills for itself, which count as its queued prefill
        return max(step * max(0, p.max_tokens - p.emitted) + (cost.prefill_s(p.tokens) if p.first_at is None else 0)
                   for p in mine)

    def healthy(self, role: str) -> list[WorkerHandle]:
        live = [w for w in self.workers.values() if w.healthy]
        if role in ("auto", "unified"):
            return live
        return [w for w in live if self.leaning(w) == role]

    def roles(self) -> tuple[str, ...]:
        return ("auto",)

    def _pick(self, role: str, ids: list[int], exclude: set[str]) -> WorkerHandle:
        chosen = _choice.get({}).get(role)
        if chosen is not None and chosen.name not in exclude and chosen.healthy:
            return chosen
        return super()._pick(role, ids, exclude)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.refresh(w) for w in list(self.workers.values())))
            moved = self.rebalance()
            if moved is not None and self.leaning(self.workers[moved]) == "prefill":
                self._background(self.mover.evacuate_all(moved))
            await asyncio.sleep(self.cfg.health_interval_s)

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _balancer(self) -> RoleBalancer:
        if self.balancer is None:
            self.balancer = RoleBalancer(self.cost(), self.clock, idle_s=self.auto.rebalance_idle_s,
                                         borrow_below=BORROW_BELOW if self.auto.move else 0.0)
            for w in self.workers.values():
                self.balancer.leanings[w.name] = "prefill" if w.name in self.auto.initial_prefill else "decode"
        return self.balancer

    def rebalance(self) -> str | None:
        if not self.auto.rebalance or not self.workers:
            return None
        balancer = self._balancer()
        balancer.cost = self.cost()
        balancer.decode_busy_s = DECODE_BUSY_FRAC * self.tpot_slo_s()
        moved = balancer.tick(self.loads())
        if moved is not None:
            self._counted(moved)
        for w in self.workers.values():
            self.reg.gauge("pdbox_engine_leaning", "1 on the leaning an engine has now").set(
                1.0, target=w.name, leaning=self.leaning(w))
            self.reg.gauge("pdbox_engine_leaning", "1 on the leaning an engine has now").set(
                0.0, target=w.name, leaning="decode" if self.leaning(w) == "prefill" else "prefill")
        return moved

    # -- the decision ----------------------------------------------------------------------------------
    def choose(self, ids: Sequence[int]) -> tuple[str, dict[str, WorkerHandle], Decision, int]:
        """Where this prompt goes: ("disagg" | "local", the engines by role, the decision, uncached tokens)."""
        decoders = self.healthy("decode") or self.healthy("auto")
        if not decoders:
            raise oai.ApiError(503, "no healthy engine is available; retry later", kind="server_error",
                               headers={"Retry-After": "2"})
        d = self.policies["decode"].pick(decoders, ids)
        cost, slo_ttft_s = self.cost(), self.auto.slo_ttft_ms / 1e3
        uncached = len(ids) - self.tracker.matched_tokens(d, ids)
        loads = {e.name: e for e in self.loads(uncached)}
        prefill = [loads[w.name] for w in self.healthy("prefill")]
        decision = decide(uncached, loads[d.name], prefill, cost, slo_ttft_s)
        if not decision.disagg and decision.needs_prefill_engine:
            # no prefill engine to hand over to, and this one's decodes cannot absorb the prefill:
            # another decode engine (most slack first) may, prefilling it where it decodes
            for alt in sorted((w for w in decoders if w is not d), key=lambda w: -loads[w.name].slack_s):
                n = len(ids) - self.tracker.matched_tokens(alt, ids)
                other = decide(n, {e.name: e for e in self.loads(n)}[alt.name], prefill, cost, slo_ttft_s)
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
            p = self.workers[decision.prefill_on]
            return "disagg", {"prefill": p, "decode": d}, decision, uncached
        return "local", {"unified": d}, decision, uncached

    def _switch(self, name: str, leaning: str, why: str) -> None:
        if self.leaning(self.workers[name]) == leaning:
            return
        self._balancer().assign(name, leaning, why)
        self._counted(name)

    def _counted(self, name: str) -> None:
        """An engine changed leaning (by the balancer's tick or a drain): metrics and log."""
        self.m_switches.inc(target=name, leaning=self.leaning(self.workers[name]))
        log.info("role switch: %s", self._balancer().last_reason)

    async def _after_drain(self, engine: str, wait_s: float, gen: AsyncIterator[Event | Outcome],
                           mine: _Progress) -> AsyncIterator[Event | Outcome]:
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

    def _generate(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Event | Outcome]:
        kind, choice, decision, uncached = self.choose(parsed.prompt_ids)
        _choice.set(choice)
        self.last_decision = f"{kind}: {decision.reason}"
        self.m_decisions.inc(decision=kind, reason=decision.code)
        decoder = choice.get("unified") or choice["decode"]
        self.tracker.record(decoder, parsed.prompt_ids)
        log.debug("%s -> %s (%s)", rid, kind, decision.reason)
        gen = self._unified(parsed, rid) if kind == "local" else self._disagg(parsed, rid)
        progress = _Progress((choice.get("prefill") or decoder).name, decoder.name, uncached,
                             parsed.sampling.max_tokens, self.clock(), parsed=parsed)
        if decision.code == "drain":
            # its decodes move away now, and the prompts it prefills for itself once they decode: else
            # they would decode beside its prefills when the hold ends first (measured: 180 ms TPOT)
            self._background(self.mover.evacuate_all(choice["prefill"].name))
            gen = self._after_drain(choice["prefill"].name, decision.wait_s, gen, progress)
        return self._tracked(rid, progress, gen)

    async def _tracked(self, rid: str, p: _Progress, gen: AsyncIterator[Event | Outcome]
                       ) -> AsyncIterator[Event | Outcome]:
        """Pass the events through, keeping the request's progress for the slack and queue estimates."""
        self.active[rid] = p
        try:
            async for ev in gen:
                if isinstance(ev, Event) and ev.kind == "moved":
                    await gen.aclose()  # type: ignore[attr-defined]
                    gen = self.mover.follow(rid, p, ev)
                    async for later in gen:
                        if isinstance(later, Event) and later.token_ids:
                            p.emitted += len(later.token_ids)
                        yield later
                    return
                if isinstance(ev, Event) and ev.kind == "tokens" and ev.token_ids:
                    if p.first_at is None:
                        p.first_at = self.clock()
                    p.emitted += len(ev.token_ids)
                yield ev
        finally:
            self.active.pop(rid, None)
            self.mover.drop(rid)
            await gen.aclose()  # type: ignore[attr-defined]

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/workers/{name}/leaning", self.set_leaning)
        return app

    async def set_leaning(self, request: web.Request) -> web.Response:
        """Operator: lean an engine ``prefill`` or ``decode`` now. Turning prefill moves its decodes to
        the other decode engines first (see :meth:`evacuate`); the balancer may change it again later."""
        name = request.match_info["name"]
        w = self.workers.get(name)
        if w is None:
            raise oai.ApiError(404, f"no engine named {name!r}; engines: {', '.join(self.workers)}",
                               kind="not_found_error")
        try:
            body = await request.json()
        except ValueError as exc:
            raise oai.ApiError(400, f"body must be JSON like {{\"leaning\": \"prefill\"}}: {exc}") from None
        leaning = body.get("leaning") if isinstance(body, dict) else None
        if leaning not in ("prefill", "decode"):
            raise oai.ApiError(400, f"leaning must be \"prefill\" or \"decode\", got {leaning!r}")
        if leaning == "prefill" and not [x for x in self.healthy("decode") if x is not w]:
            raise oai.ApiError(409, f"{name} is the last healthy decode-leaning engine; it must stay decode",
                               kind="conflict")
        self._switch(name, leaning, "operator request")
        moved = 0
        if leaning == "prefill":
            moved = await self.mover.evacuate(name)
            self._background(self.mover.evacuate_all(name))  # what still prefills there moves once it decodes
        return web.json_response({"name": name, "leaning": leaning, "moved": moved})

    async def list_workers(self, request: web.Request) -> web.Response:
        resp = await super().list_workers(request)
        body = json.loads(resp.text)
        for w in body["workers"]:
            handle = self.workers.get(w["name"])
            if handle is not None:
                w["leaning"] = self.leaning(handle)
        body["last_decision"] = self.last_decision
        body["role_switches"] = self.balancer.switches if self.balancer else 0
        body["decodes_moved"] = self.mover.count
        body["decode_moves_failed"] = self.mover.failed
        return web.json_response(body)
