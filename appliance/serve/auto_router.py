"""The router of ``--mode auto``: per-request disaggregation and live role rebalancing.

Every worker runs role ``auto`` (it can prefill, decode and hand KV over). Each engine leans
``prefill`` or ``decode`` (the :class:`RoleBalancer` moves them as traffic shifts). A request goes
to a decode-leaning engine; :func:`decide` says whether a prefill-leaning engine computes its
prompt and hands the KV over, or the decode engine prefills it itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from appliance.serve import openai_api as oai
from appliance.serve.adaptive import CostModel, EngineLoad, RoleBalancer, decide
from appliance.serve.policies import CacheAware, WorkerHandle
from appliance.serve.protocol import Event
from appliance.serve.router import Outcome, Router, RouterConfig

log = logging.getLogger("pdbox.auto")
_choice: contextvars.ContextVar[dict[str, WorkerHandle]] = contextvars.ContextVar("pdbox_auto_choice")


@dataclass(frozen=True)
class AutoConfig:
    """``slo_tpot_ms``/``slo_ttft_ms`` 0 = derived from the calibration (1.5 x step; no admission)."""

    initial_prefill: tuple[str, ...] = ()
    slo_tpot_ms: float = 0.0
    slo_ttft_ms: float = 0.0
    reject_factor: float = 2.0
    rebalance: bool = True


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

    # -- engines and their leanings ------------------------------------------------------------------
    def cost(self) -> CostModel:
        live = [w for w in self.workers.values() if w.healthy and w.load.get("prefill_tok_s")]
        if not live:
            return CostModel(prefill_tok_s=200.0, decode_step_s=0.05)
        rate = min(float(w.load["prefill_tok_s"]) for w in live)
        step = max(float(w.load.get("decode_step_s", 0.05)) for w in live)
        return CostModel(prefill_tok_s=rate, decode_step_s=step)

    def tpot_slo_s(self) -> float:
        return self.auto.slo_tpot_ms / 1e3 if self.auto.slo_tpot_ms else 1.5 * self.cost().decode_step_s

    def leaning(self, w: WorkerHandle) -> str:
        if self.balancer is not None and w.name in self.balancer.leanings:
            return self.balancer.leanings[w.name]
        return "prefill" if w.name in self.auto.initial_prefill else "decode"

    def loads(self) -> list[EngineLoad]:
        out = []
        for w in self.workers.values():
            total = w.load.get("total_pages") or 1
            free = (w.load.get("free_pages", total) + w.load.get("evictable_pages", 0)) / total
            out.append(EngineLoad(w.name, self.leaning(w), int(w.load.get("queued_prefill_tokens", 0)),
                                  int(w.load.get("decoding", 0)) + w.inflight, free, w.healthy))
        return out

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
            self.rebalance()
            await asyncio.sleep(self.cfg.health_interval_s)

    def rebalance(self) -> str | None:
        if not self.auto.rebalance or not self.workers:
            return None
        if self.balancer is None:
            self.balancer = RoleBalancer(self.cost(), self.tpot_slo_s(), self.clock)
            for w in self.workers.values():
                self.balancer.leanings[w.name] = "prefill" if w.name in self.auto.initial_prefill else "decode"
        self.balancer.cost = self.cost()
        self.balancer.tpot_slo_s = self.tpot_slo_s()
        moved = self.balancer.tick(self.loads())
        if moved is not None:
            self.m_switches.inc(target=moved, leaning=self.balancer.leanings[moved])
            log.info("role switch: %s", self.balancer.last_reason)
        for w in self.workers.values():
            self.reg.gauge("pdbox_engine_leaning", "1 on the leaning an engine has now").set(
                1.0, target=w.name, leaning=self.leaning(w))
            self.reg.gauge("pdbox_engine_leaning", "1 on the leaning an engine has now").set(
                0.0, target=w.name, leaning="decode" if self.leaning(w) == "prefill" else "prefill")
        return moved

    # -- the decision ----------------------------------------------------------------------------------
    def choose(self, ids: Sequence[int]) -> tuple[str, dict[str, WorkerHandle], str, str]:
        decoders = self.healthy("decode") or self.healthy("auto")
        if not decoders:
            raise oai.ApiError(503, "no healthy engine is available; retry later", kind="server_error",
                               headers={"Retry-After": "2"})
        d = self.policies["decode"].pick(decoders, ids)
        loads = {e.name: e for e in self.loads()}
        prefill = [loads[w.name] for w in self.healthy("prefill") if w.name != d.name]
        matched = self.tracker.matched_tokens(d, ids)
        decision = decide(len(ids) - matched, loads[d.name], prefill, self.cost(), self.tpot_slo_s())
        if self.auto.slo_ttft_ms:
            predicted = decision.disagg_ttft_s if decision.disagg else decision.local_ttft_s
            if predicted * 1e3 > self.auto.reject_factor * self.auto.slo_ttft_ms:
                self.m_rejected.inc()
                raise oai.ApiError(429, f"predicted time to first token {predicted * 1e3:.0f} ms is beyond "
                                        f"{self.auto.reject_factor:g} x the {self.auto.slo_ttft_ms:g} ms SLO; "
                                        "retry later",
                                   kind="rate_limit_error", headers={"Retry-After": "1"})
        if decision.disagg:
            p = min((w for w in self.healthy("prefill") if w.name != d.name),
                    key=lambda w: loads[w.name].queued_prefill_tokens)
            return "disagg", {"prefill": p, "decode": d}, decision.reason, decision.code
        return "local", {"unified": d}, decision.reason, decision.code

    def _generate(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Event | Outcome]:
        kind, choice, reason, code = self.choose(parsed.prompt_ids)
        _choice.set(choice)
        self.last_decision = f"{kind}: {reason}"
        self.m_decisions.inc(decision=kind, reason=code)
        self.tracker.record(choice.get("unified") or choice["decode"], parsed.prompt_ids)
        log.debug("%s -> %s (%s)", rid, kind, reason)
        if kind == "local":
            return self._unified(parsed, rid)
        return self._disagg(parsed, rid)

    async def list_workers(self, request: web.Request) -> web.Response:
        resp = await super().list_workers(request)
        import json

        body = json.loads(resp.text)
        for w in body["workers"]:
            handle = self.workers.get(w["name"])
            if handle is not None:
                w["leaning"] = self.leaning(handle)
        body["last_decision"] = self.last_decision
        body["role_switches"] = self.balancer.switches if self.balancer else 0
        return web.json_response(body)
