"""Adaptive mode: per request, disaggregate or not; and which engines lean prefill or decode.

Every engine in ``--mode auto`` can prefill, decode, and hand KV over. Two pure, clock-driven parts:

- :func:`decide` chooses, for one request, between prefilling on a prefill-leaning engine and
  handing the KV over (``disagg``), or prefilling locally on the decode engine that will generate
  the answer (``local``), from the uncached prompt length, the prefill queue's predicted wait and
  the decode engine's batch and KV pressure, with a :class:`CostModel` calibrated at start-up.
- :class:`RoleBalancer` moves engines between the ``prefill`` and ``decode`` leanings when the
  traffic shifts, with hysteresis (a pressure must persist, and a switch must age) so roles do not
  flap. A switch is drain-free: it only changes where NEW work goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostModel:
    """Per-engine costs measured on this device at start-up."""

    prefill_tok_s: float  # prompt tokens per second, one engine
    decode_step_s: float  # one decode step at small batch
    chunk_tokens: int = 512  # chunked-prefill budget per step
    handoff_s: float = 0.01  # fixed cost of the two-engine path (RPCs + signal)
    transfer_s_per_token: float = 2e-6  # KV bytes per token / transport bandwidth

    def prefill_s(self, tokens: int) -> float:
        return tokens / max(self.prefill_tok_s, 1e-6)

    def stall_per_step_s(self, tokens: int) -> float:
        """How much one step of the decode batch grows while ``tokens`` are prefilled beside it."""
        return self.prefill_s(min(tokens, self.chunk_tokens))


@dataclass(frozen=True)
class EngineLoad:
    """What the router knows about one engine right now."""

    name: str
    leaning: str  # "prefill" | "decode"
    queued_prefill_tokens: int = 0  # prompt tokens waiting or mid-prefill
    running: int = 0  # requests decoding
    kv_free_frac: float = 1.0
    healthy: bool = True


@dataclass(frozen=True)
class Decision:
    disagg: bool
    reason: str
    local_ttft_s: float = 0.0
    disagg_ttft_s: float = 0.0
    code: str = ""  # short label for metrics: idle, queue, slack, backed_up, kv, stall, no_prefill


def decide(uncached_tokens: int, decode: EngineLoad, prefill: Sequence[EngineLoad], cost: CostModel,
           tpot_slo_s: float, margin: float = 1.2) -> Decision:
    """Disaggregate this request, or prefill it where it will decode?

    Local prefill costs the running decode batch ``stall_per_step`` on each of its chunks, which
    TPOT can absorb only up to its slack. A handoff costs the prefill queue's wait plus transfer.
    """
    local_ttft = cost.prefill_s(decode.queued_prefill_tokens + uncached_tokens)
    ready = [p for p in prefill if p.healthy and p.name != decode.name]
    if not ready:
        return Decision(False, "no prefill engine available", local_ttft, 0.0, "no_prefill")
    best = min(ready, key=lambda p: p.queued_prefill_tokens)
    disagg_ttft = (cost.prefill_s(best.queued_prefill_tokens + uncached_tokens) + cost.handoff_s
                   + cost.transfer_s_per_token * uncached_tokens)
    if decode.kv_free_frac < 0.1:
        return Decision(True, f"decode KV nearly full ({decode.kv_free_frac:.0%} free): prefill elsewhere",
                        local_ttft, disagg_ttft, "kv")
    if decode.running == 0:
        if local_ttft <= disagg_ttft * margin:
            return Decision(False, "decode engine idle: prefill locally", local_ttft, disagg_ttft, "idle")
        return Decision(True, "decode engine's own prefill queue is longer", local_ttft, disagg_ttft, "queue")
    slack = tpot_slo_s - cost.decode_step_s
    stall = cost.stall_per_step_s(uncached_tokens)
    if stall <= slack:
        return Decision(False, f"{uncached_tokens} uncached tokens stall {decode.running} decodes by "
                               f"{stall * 1e3:.0f} ms/step, within the TPOT slack", local_ttft, disagg_ttft,
                        "slack")
    if disagg_ttft > margin * local_ttft + 2.0:
        return Decision(False, f"prefill queue backed up ({disagg_ttft:.1f} s vs {local_ttft:.1f} s locally)",
                        local_ttft, disagg_ttft, "backed_up")
    return Decision(True, f"{uncached_tokens} uncached tokens would stall {decode.running} decodes by "
                          f"{stall * 1e3:.0f} ms/step", local_ttft, disagg_ttft, "stall")


@dataclass
class RoleBalancer:
    """Keeps a prefill/decode split that follows the traffic.

    Pressure, each in "seconds of work per engine of that leaning": prefill = queued prompt
    tokens / prefill rate; decode = running requests x step time / TPOT SLO. When one side's
    pressure exceeds ``ratio`` times the other's (plus a floor) for ``persist_s``, and the last
    switch is older than ``dwell_s``, one engine moves over (keeping ``min_prefill``/``min_decode``).
    """

    cost: CostModel
    tpot_slo_s: float
    clock: Callable[[], float]
    ratio: float = 2.0
    floor_s: float = 0.25
    persist_s: float = 2.0
    dwell_s: float = 5.0
    min_prefill: int = 0  # 0: with no prefill-leaning engine every request prefills where it decodes
    min_decode: int = 1
    leanings: dict[str, str] = field(default_factory=dict)
    _since: float | None = None
    _direction: str = ""
    _last_switch: float = -1e18
    switches: int = 0
    last_reason: str = ""

    def pressures(self, loads: Sequence[EngineLoad]) -> tuple[float, float]:
        """(prefill, decode) backlog in seconds per engine of that leaning.

        Prefill: queued prompt tokens / prefill rate. Decode: running requests x one step each
        (the serial work a decode round would cost without batching; a heuristic, not a
        prediction: it grows with the batch the decode side carries).
        """
        live = [e for e in loads if e.healthy]
        n_pre = sum(1 for e in live if self.leanings.get(e.name) == "prefill")
        n_dec = sum(1 for e in live if self.leanings.get(e.name) == "decode")
        p = sum(self.cost.prefill_s(e.queued_prefill_tokens) for e in live) / max(1, n_pre)
        d = sum(e.running for e in live) * self.cost.decode_step_s / max(1, n_dec)
        return p, d

    def tick(self, loads: Sequence[EngineLoad]) -> str | None:
        """Observe the engines; returns the name of an engine that switched leaning, or None."""
        now = self.clock()
        for e in loads:
            self.leanings.setdefault(e.name, e.leaning)
        p, d = self.pressures(loads)
        want = ""
        if p > self.ratio * d + self.floor_s:
            want = "prefill"
        elif d > self.ratio * p + self.floor_s:
            want = "decode"
        if want != self._direction:
            self._direction, self._since = want, now
        if not want or self._since is None or now - self._since < self.persist_s:
            return None
        if now - self._last_switch < self.dwell_s:
            return None
        donor = "decode" if want == "prefill" else "prefill"
        donors = [e for e in loads if self.leanings.get(e.name) == donor and e.healthy]
        if len(donors) <= (self.min_decode if donor == "decode" else self.min_prefill):
            return None
        # the donor with the least work of its current kind moves over
        pick = min(donors, key=lambda e: e.running if donor == "decode" else e.queued_prefill_tokens)
        self.leanings[pick.name] = want
        self._last_switch = now
        self._since = now
        self.switches += 1
        self.last_reason = f"{pick.name} -> {want}: prefill pressure {p:.2f} s vs decode {d:.2f} s"
        return pick.name
