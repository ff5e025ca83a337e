"""Each engine's load as the adaptive placement estimates it: its last ``/load`` report, corrected by
what the router sent it since (prompts queued, requests decoding) and by the TPOT SLO's slack.

Read-only over the placement's state: the pool's workers, the requests in flight (`Progress`), when
each engine last reported, and each engine's leaning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from appliance.engine.slack import ttft_deadline
from appliance.serve.adaptive import CostModel, EngineLoad, decode_slack_s
from appliance.serve.dispatch import Eligible
from appliance.serve.policies import WorkerHandle
from appliance.serve.progress import Progress
from appliance.serve.router_config import AutoConfig
from appliance.serve.worker_pool import WorkerPool

MOVE_S = 0.5  # what moving an engine's decodes elsewhere takes (a step there, the push, a step here)


class EngineLoads:
    def __init__(self, pool: WorkerPool, auto: AutoConfig, active: dict[str, Progress], loaded_at: dict[str, float],
                 clock: Callable[[], float], leaning: Callable[[WorkerHandle], str], eligible: Eligible) -> None:
        self.pool = pool
        self.auto = auto
        self.active = active
        self.loaded_at = loaded_at
        self.clock = clock
        self.leaning = leaning
        self.eligible = eligible
        self._derived_tpot_s: float | None = None

    def cost(self) -> CostModel:
        live = [w for w in self.pool.workers.values() if w.healthy and w.load.prefill_tok_s]
        if not live:
            return CostModel(prefill_tok_s=200.0, decode_step_s=0.05)
        rate = min(w.load.prefill_tok_s for w in live)
        step = max(w.load.decode_step_s for w in live)
        return CostModel(prefill_tok_s=rate, decode_step_s=step)

    def tpot_slo_s(self) -> float:
        """The TPOT SLO: the configured one, else 1.5 x the step first reported (the start-up calibration,
        fixed from then on: the live step grows with the batch, the target must not)."""
        if self.auto.slo_tpot_ms:
            return self.auto.slo_tpot_ms / 1e3
        if self._derived_tpot_s is None:
            steps = [w.load.decode_step_s for w in self.pool.workers.values() if w.load.decode_step_s]
            if not steps:
                return 1.5 * self.cost().decode_step_s
            self._derived_tpot_s = 1.5 * min(steps)
        return self._derived_tpot_s

    def slack_s(self, w: WorkerHandle) -> float:
        """The least stall any request decoding on ``w`` can still absorb within the TPOT SLO."""
        now, slo = self.clock(), self.tpot_slo_s()
        step = w.load.decode_step_s or self.cost().decode_step_s
        return min((decode_slack_s(p.max_tokens, p.emitted, now - p.first_at if p.first_at else 0.0, step, slo)
                    for p in self.active.values() if p.decode_on == w.name), default=math.inf)

    def queued_prefill_tokens(self, w: WorkerHandle) -> int:
        """The worker's last report, or, when larger, what the router sent it since that report."""
        since = self.loaded_at.get(w.name, -math.inf)
        sent = sum(p.tokens for p in self.active.values()
                   if p.prefill_on == w.name and p.first_at is None and (p.held or p.sent_at >= since))
        return max(w.load.queued_prefill_tokens, sent)

    def queued_ahead(self, w: WorkerHandle, tokens: int) -> int:
        """Prompt tokens ``w`` will prefill before a new prompt of ``tokens``. Auto engines prefill in
        slack order (the scheduler's): a queued prompt goes first when its TTFT deadline is the earlier,
        so a short prompt passes long ones that have not waited long - but not the chunk the engine
        is running now, which finishes first. Queued prompts count whole."""
        rate = self.cost().prefill_tok_s
        mine = ttft_deadline(self.clock(), tokens, rate)
        ahead, passed = 0, 0
        for p in self.active.values():
            if p.prefill_on == w.name and p.first_at is None:
                if ttft_deadline(p.sent_at, p.tokens, rate) <= mine:
                    ahead += p.tokens
                else:
                    passed = max(passed, p.tokens)
        if ahead:
            return ahead
        return min(w.load.prefill_chunk, passed)  # the chunk of a passed prompt running now

    def loads(self, tokens: int | None = None) -> list[EngineLoad]:
        """Every engine's load; with ``tokens``, its prefill queue is what would run before such a prompt."""
        out = []
        for w in self.pool.workers.values():
            running = sum(1 for p in self.active.values() if p.decode_on == w.name)
            queued = self.queued_prefill_tokens(w) if tokens is None else self.queued_ahead(w, tokens)
            out.append(EngineLoad(w.name, self.leaning(w), queued, running, w.kv_free, w.healthy,
                                  self.slack_s(w), w.load.decode_step_s, self.drain_s(w)))
        return out

    def drain_s(self, w: WorkerHandle) -> float:
        """Until no request decodes on ``w``: its remaining tokens at the current step, or, when its
        decodes can move to another engine, the move (after the prompts it is prefilling for itself,
        which :func:`decide` counts as its queued prefill)."""
        cost = self.cost()
        step = w.load.decode_step_s or cost.decode_step_s
        mine = [p for p in self.active.values() if p.decode_on == w.name]
        if not mine:
            return 0.0
        if self.auto.move and any(x is not w for x in self.eligible("decode")):
            return MOVE_S  # after the prompts it prefills for itself, which count as its queued prefill
        return max(step * max(0, p.max_tokens - p.emitted) + (cost.prefill_s(p.tokens) if p.first_at is None else 0)
                   for p in mine)
