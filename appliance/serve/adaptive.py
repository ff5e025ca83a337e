"""Adaptive mode: per request, disaggregate or not; and how many engines lean prefill.

Every engine in ``--mode auto`` can prefill, decode, and hand KV over. Two pure, clock-driven parts:

- :func:`decide` chooses, for one request, between prefilling on a prefill-leaning engine and
  handing the KV over (``disagg``), or prefilling locally on the decode engine that will generate
  the answer (``local``). A handoff keeps the decode batch running undisturbed, so it is taken
  whenever it meets the request's time-to-first-token target; otherwise the request prefills
  locally if the decodes running there have the TPOT slack to absorb the stall. With no prefill
  engine and no slack, it may wait for another engine to drain and turn prefill (``drain``).
- :class:`RoleBalancer` sizes the prefill side to the prefill work that could not be absorbed
  locally (seconds of prefill per second of wall time), with hysteresis: it grows within seconds
  of a demand and shrinks only after a long quiet window, one engine at a time. A switch is
  drain-free: it only changes where NEW work goes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from appliance.engine.slack import SLACK_K


@dataclass(frozen=True)
class CostModel:
    """Per-engine costs measured on this device at start-up (and kept current by the engines)."""

    prefill_tok_s: float  # prompt tokens per second, one engine
    decode_step_s: float  # one decode step at small batch
    handoff_s: float = 0.01  # fixed cost of the two-engine path (RPCs + signal)
    transfer_s_per_token: float = 2e-6  # KV bytes per token / transport bandwidth
    ttft_factor: float = SLACK_K  # default TTFT target: this x the prompt's own prefill time (the ...
    ttft_floor_s: float = 0.5  # ... scheduler's slack-order goal) plus this

    def prefill_s(self, tokens: int) -> float:
        return tokens / max(self.prefill_tok_s, 1e-6)

    def ttft_target_s(self, tokens: int, slo_ttft_s: float = 0.0) -> float:
        """The TTFT a request should get: the SLO when one is set, else relative to its own prefill."""
        return slo_ttft_s if slo_ttft_s > 0 else self.ttft_factor * self.prefill_s(tokens) + self.ttft_floor_s


def decode_slack_s(max_tokens: int, emitted: int, since_first_s: float, step_s: float, tpot_slo_s: float) -> float:
    """How much more stall a decoding request can absorb and still end within its mean-TPOT SLO.

    TPOT is the mean gap after the first token: ``(max_tokens - 1)`` gaps in all, ``emitted - 1``
    of them already spent in ``since_first_s``, the rest at ``step_s`` each.
    """
    gaps = max(1, max_tokens - 1)
    if emitted <= 0:
        return (tpot_slo_s - step_s) * gaps
    return tpot_slo_s * gaps - since_first_s - step_s * max(0, max_tokens - emitted)


@dataclass(frozen=True)
class EngineLoad:
    """What the router knows about one engine right now."""

    name: str
    leaning: str  # "prefill" | "decode"
    queued_prefill_tokens: int = 0  # prompt tokens waiting or mid-prefill
    running: int = 0  # requests decoding (or about to)
    kv_free_frac: float = 1.0
    healthy: bool = True
    slack_s: float = math.inf  # the least stall any request decoding here can still absorb
    step_s: float = 0.0  # the engine's current decode step time (grows with its batch)
    drain_s: float = 0.0  # until the requests decoding here are done (their remaining tokens x step)


@dataclass(frozen=True)
class Decision:
    disagg: bool
    reason: str
    local_ttft_s: float = 0.0
    disagg_ttft_s: float = 0.0
    code: str = ""  # short label for metrics: idle, free, busy, kv, stall, no_prefill (+ moved, by the router)
    needs_prefill_engine: bool = False  # local prefill would break the running decodes' TPOT
    prefill_on: str = ""  # with disagg: the prefill engine (the least queued ready one)
    wait_s: float = 0.0  # with code "drain": how long the prompt may wait for ``prefill_on`` to drain


def decide(uncached_tokens: int, decode: EngineLoad, prefill: Sequence[EngineLoad], cost: CostModel,
           slo_ttft_s: float = 0.0, margin: float = 1.2, others: Sequence[EngineLoad] = ()) -> Decision:
    """Disaggregate this request, or prefill it where it will decode?

    Local prefill stalls every decode on that engine for as long as the prefill (and what is queued
    ahead of it) takes; it fits when that is within the decodes' slack (:func:`decode_slack_s`).
    A handoff costs the prefill queue's wait plus the transfer, and stalls nobody. With no prefill
    engine (or none in time), a prompt that fits nowhere may wait for one of the ``others`` (the
    other decode-leaning engines) to finish its decodes, then prefill there and hand over: the
    prompt spends TTFT slack so that no decode stalls, and that engine turns prefill (``drain``).
    """
    local_ttft = cost.prefill_s(decode.queued_prefill_tokens + uncached_tokens)
    fits = decode.running == 0 or local_ttft * margin <= decode.slack_s
    target = cost.ttft_target_s(uncached_tokens, slo_ttft_s)
    ready = [p for p in prefill if p.healthy and p.name != decode.name]
    transfer = cost.handoff_s + cost.transfer_s_per_token * uncached_tokens
    best = min(ready, key=lambda p: p.queued_prefill_tokens, default=None)
    disagg_ttft = cost.prefill_s(best.queued_prefill_tokens + uncached_tokens) + transfer if best else math.inf

    def out(disagg: bool, reason: str, code: str) -> Decision:
        return Decision(disagg, reason, local_ttft, disagg_ttft if best else 0.0, code, not fits,
                        best.name if disagg and best else "")

    def drained() -> Decision | None:
        """The other engine that drains soonest, if waiting for it still meets the TTFT target."""
        cands = [e for e in others if e.healthy and e.name != decode.name]
        if fits or not cands:
            return None
        e = min(cands, key=lambda e: e.drain_s + cost.prefill_s(e.queued_prefill_tokens))
        ttft = e.drain_s + cost.prefill_s(e.queued_prefill_tokens + uncached_tokens) + transfer
        if ttft * margin > target:
            return None
        return Decision(True, f"{uncached_tokens} uncached tokens fit no decode's slack: {e.name} drains in "
                              f"{e.drain_s:.1f} s, then prefills and hands over", local_ttft, ttft, "drain",
                        True, e.name, max(0.0, target / margin - ttft + e.drain_s))

    if best is None:
        return drained() or out(False, "no prefill engine available", "no_prefill")
    if decode.kv_free_frac < 0.1:
        return out(True, f"decode KV nearly full ({decode.kv_free_frac:.0%} free): prefill elsewhere", "kv")
    if decode.running == 0:
        if local_ttft * margin < disagg_ttft:
            return out(False, f"decode engine idle, prefill queue busy ({disagg_ttft:.1f} s): prefill locally",
                       "idle")
        return out(True, "prefill engine free: hand over, keep the decode engine free", "free")
    if disagg_ttft <= target:
        return out(True, f"handoff meets the TTFT target ({disagg_ttft:.2f} <= {target:.2f} s); "
                         f"{decode.running} decodes run unstalled", "free")
    if fits:
        return out(False, f"prefill queue busy ({disagg_ttft:.1f} s); local prefill stalls {decode.running} "
                          f"decodes {local_ttft:.2f} s, within their slack", "busy")
    return out(True, f"{uncached_tokens} uncached tokens would stall {decode.running} decodes "
                     f"{local_ttft:.2f} s, beyond their slack", "stall")


@dataclass
class RoleBalancer:
    """Sizes the prefill-leaning side to the prefill work that must be handed over.

    :meth:`record` is told the prefill seconds of each request, and whether it could not be
    prefilled locally (``needed``). Demand over a window is those seconds per second: engines' worth
    of prefill. One stall budget rules both ways: the prefill side grows when the short window's
    handed-over demand is beyond ``stall_frac`` of the decode engines' time (and needs more engines,
    each loaded to at most ``util_target``); it shrinks only when all the prompts of the long window,
    prefilled where they decode, would take at most ``stall_frac`` of the decode engines' time with
    one engine more, the decode engines are busy (their mean step, where they decode, is at least
    ``decode_busy_s``; 0: always), an idle prefill engine is there to move (no prompt queued or
    running on it) and the prefill engines that stay can carry the handed-over demand (the last
    one goes only when there was none: letting it go under rare long prompts, which then wait for a
    decode engine to drain, measured worse on ``shift``). A change must
    persist ``persist_s``, and the last switch must be ``dwell_s`` old, so roles do not flap; one
    engine moves at a time, keeping ``min_prefill``/``min_decode``.
    """

    cost: CostModel
    clock: Callable[[], float]
    util_target: float = 0.7
    up_window_s: float = 10.0
    idle_s: float = 20.0  # the long window: the prefill side shrinks only after this much lower demand
    persist_s: float = 1.0
    dwell_s: float = 5.0
    min_prefill: int = 0  # 0: with no prefill-leaning engine every request prefills where it decodes
    min_decode: int = 1
    decode_busy_s: float = 0.0
    leanings: dict[str, str] = field(default_factory=dict)
    stall_frac: float = 0.2  # shrink only if, with one engine fewer on prefill, all the prompts of the long
    # window would take at most this share of the decode engines' time to prefill where they decode
    borrow_below: float = 0.0  # with decode moves: under this handed-over demand (long window) even the
    # last prefill engine turns decode, and each long prompt borrows an engine (``drain``: its decodes
    # move, ~0.5 s) instead of one standing mostly idle; 0 = the last one stays while any prompt needs it
    _work: deque[tuple[float, float, bool]] = field(default_factory=deque)
    _start: float | None = None
    _since: float | None = None
    _direction: str = ""
    _last_switch: float = -1e18
    switches: int = 0
    last_reason: str = ""

    def assign(self, name: str, leaning: str, why: str) -> None:
        """A request needs ``name`` to lean ``leaning`` now (the ``drain`` decision): a counted switch.
        The demand it records keeps the long window from undoing it at once."""
        if self.leanings.get(name) == leaning:
            return
        self.leanings[name] = leaning
        self._last_switch = self.clock()
        self._direction, self._since = "", None
        self.switches += 1
        self.last_reason = f"{name} -> {leaning}: {why}"

    def record(self, prefill_s: float, needed: bool = True) -> None:
        """A request's ``prefill_s`` seconds of prefill work; ``needed``: it could not be absorbed locally."""
        self._work.append((self.clock(), prefill_s, needed))

    def demand(self, window_s: float, needed_only: bool = True) -> float:
        """Prefill seconds per second over the last ``window_s``: what needed a prefill engine, or all."""
        now = self.clock()
        while self._work and self._work[0][0] < now - max(self.up_window_s, self.idle_s):
            self._work.popleft()
        return sum(s for t, s, needed in self._work if t >= now - window_s and (needed or not needed_only)) / window_s

    def targets(self) -> tuple[int, int]:
        """(prefill engines the short window asks for, prefill engines the long window needs)."""
        up = math.ceil(self.demand(self.up_window_s) / self.util_target - 1e-9)
        down = math.ceil(self.demand(self.idle_s) / self.util_target - 1e-9)
        return up, down

    def decode_busy(self, live: Sequence[EngineLoad]) -> bool:
        """Would the decode side gain from one more engine? Its mean step where it decodes is slow."""
        steps = [e.step_s for e in live if self.leanings[e.name] == "decode" and e.running > 0]
        return bool(steps) and sum(steps) / len(steps) >= self.decode_busy_s

    def tick(self, loads: Sequence[EngineLoad]) -> str | None:
        """Observe the engines; returns the name of an engine that switched leaning, or None."""
        now = self.clock()
        if self._start is None:
            self._start = now
        for e in loads:
            self.leanings.setdefault(e.name, e.leaning)
        live = [e for e in loads if e.healthy]
        n_pre = sum(1 for e in live if self.leanings[e.name] == "prefill")
        up, down = self.targets()
        cap = len(live) - self.min_decode
        want = ""
        # the same stall budget both ways: grow when what had to be handed over is beyond it, shrink when
        # all the prompts would be within it with one decode engine more (all >= needed: hysteresis)
        n_dec = len(live) - n_pre
        idle_pre = [e for e in live if self.leanings[e.name] == "prefill" and not e.queued_prefill_tokens]
        local, needed = self.demand(self.idle_s, needed_only=False), self.demand(self.idle_s)
        if needed < self.borrow_below:
            # what needed a prefill engine borrows one per prompt, stalling nobody; only the prompts that
            # would prefill where they decode count against the stall budget
            down, local = 0, local - needed
        stall_ok = local <= self.stall_frac * (n_dec + 1)
        if min(up, cap) > n_pre and self.demand(self.up_window_s) > self.stall_frac * n_dec:
            want = "prefill"
        # the prefill engines that stay must carry the handed-over demand (the last one goes only when
        # there is none); only an idle one moves, so no new decode lands beside a prompt's prefill
        elif (max(down, self.min_prefill) < n_pre and now - self._start >= self.idle_s
              and self.decode_busy(live) and stall_ok and idle_pre):
            want = "decode"
        elif n_pre > cap and n_pre > self.min_prefill:  # an engine died: keep min_decode
            want = "decode"
        if want != self._direction:
            self._direction, self._since = want, now
        if not want or self._since is None or now - self._since < self.persist_s:
            return None
        if now - self._last_switch < self.dwell_s:
            return None
        donor = "decode" if want == "prefill" else "prefill"
        donors = [e for e in live if self.leanings[e.name] == donor]
        if donor == "prefill":
            donors = idle_pre or donors  # a busy one moves only to replace a dead decode engine
        if not donors:
            return None
        # the donor with the least work of its current kind moves over
        pick = min(donors, key=lambda e: e.running if donor == "decode" else e.queued_prefill_tokens)
        self.leanings[pick.name] = want
        self._last_switch = now
        self._since = now
        self.switches += 1
        self.last_reason = (f"{pick.name} -> {want}: handed-over prefill demand {self.demand(self.up_window_s):.2f} "
                            f"engines ({self.up_window_s:g} s), {self.demand(self.idle_s):.2f} ({self.idle_s:g} s); "
                            f"{n_pre} prefill-leaning of {len(live)}")
        return pick.name
