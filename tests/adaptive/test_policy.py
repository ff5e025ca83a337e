"""The per-request decision and the role balancer, on fake engines and a fake clock."""

from __future__ import annotations

import math

import pytest

from appliance.serve.adaptive import CostModel, EngineLoad, RoleBalancer, decide, decode_slack_s

COST = CostModel(prefill_tok_s=500.0, decode_step_s=0.025)  # 1500 tokens: 3 s; 150 tokens: 0.3 s
TPOT = 0.0375  # 1.5 x the isolated step
P = EngineLoad("e0", "prefill")


def test_slack_is_what_the_mean_tpot_can_still_absorb() -> None:
    # not started: every gap may spend (slo - step)
    assert decode_slack_s(201, 0, 0.0, 0.025, TPOT) == pytest.approx(200 * 0.0125)
    # 101 tokens out in 2.5 s (on pace), 100 to go at 25 ms: 200 gaps x 37.5 ms - 2.5 s - 2.5 s
    assert decode_slack_s(201, 101, 2.5, 0.025, TPOT) == pytest.approx(7.5 - 5.0)
    # already behind: no slack left
    assert decode_slack_s(201, 101, 6.0, 0.025, TPOT) < 0


def test_idle_decode_engine_hands_over_to_a_free_prefill_engine_and_prefills_locally_when_it_is_busy() -> None:
    d = decide(1500, EngineLoad("e1", "decode"), [P], COST)
    assert d.disagg and d.code == "free" and not d.needs_prefill_engine
    busy = EngineLoad("e0", "prefill", queued_prefill_tokens=3000)
    d = decide(1500, EngineLoad("e1", "decode"), [busy], COST)
    assert not d.disagg and d.code == "idle"


def test_handoff_is_taken_when_it_meets_the_ttft_target() -> None:
    d = decide(150, EngineLoad("e1", "decode", running=4, slack_s=2.0), [P], COST)
    assert d.disagg and d.code == "free" and "unstalled" in d.reason
    assert not d.needs_prefill_engine  # 0.3 s fits a 2 s slack


def test_short_prompt_prefills_locally_while_the_prefill_engine_is_busy_if_decodes_have_slack() -> None:
    busy = EngineLoad("e0", "prefill", queued_prefill_tokens=1500)  # a RAG prompt ahead: 3 s
    d = decide(150, EngineLoad("e1", "decode", running=4, slack_s=2.0), [busy], COST)
    assert not d.disagg and d.code == "busy" and "within their slack" in d.reason
    # one decode nearly out of slack: local would break its TPOT, so it waits for the handoff ...
    ahead = EngineLoad("e0", "prefill", queued_prefill_tokens=800)  # 1.9 s vs a 1.7 s target
    d = decide(150, EngineLoad("e1", "decode", running=4, slack_s=0.2), [ahead], COST)
    assert d.disagg and d.code == "stall" and d.needs_prefill_engine
    # ... even when the queue is long: a late first token costs one request, a stall every decode there
    d = decide(150, EngineLoad("e1", "decode", running=4, slack_s=0.2), [busy], COST)
    assert d.disagg and d.code == "stall"


def test_long_prompt_beside_running_decodes_is_handed_over_even_behind_a_queue() -> None:
    queued = EngineLoad("e0", "prefill", queued_prefill_tokens=6000)  # 12 s ahead, 15 s in all
    d = decide(1500, EngineLoad("e1", "decode", running=3, slack_s=0.5), [queued], COST)
    assert d.disagg and d.code == "stall" and d.needs_prefill_engine and "beyond their slack" in d.reason


def test_full_decode_kv_forces_handoff_and_no_prefill_engine_forces_local() -> None:
    d = decide(100, EngineLoad("e1", "decode", running=2, kv_free_frac=0.05, slack_s=5), [P], COST)
    assert d.disagg and d.code == "kv"
    d = decide(1500, EngineLoad("e1", "decode", running=8, slack_s=1.0), [], COST)
    assert not d.disagg and "no prefill" in d.reason and d.needs_prefill_engine


def test_with_no_prefill_engine_a_prompt_that_fits_nowhere_waits_for_the_engine_that_drains_first() -> None:
    busy = EngineLoad("e1", "decode", running=3, slack_s=0.5)
    others = [EngineLoad("e2", "decode", running=2, drain_s=4.0), EngineLoad("e3", "decode", running=1, drain_s=1.0)]
    d = decide(1500, busy, [], COST, others=others)
    assert d.disagg and d.code == "drain" and d.prefill_on == "e3" and d.needs_prefill_engine
    assert d.disagg_ttft_s == pytest.approx(1.0 + 3.0 + 0.01 + 1500 * 2e-6)
    assert d.wait_s == pytest.approx(12.5 / 1.2 - 3.013)  # what the target (with margin) leaves for waiting
    # a drain too slow for the TTFT target: prefill where it decodes
    d = decide(1500, busy, [], COST, others=[EngineLoad("e2", "decode", running=2, drain_s=30.0)])
    assert not d.disagg and d.code == "no_prefill"
    # a prompt that fits the decodes' slack needs no drain
    d = decide(150, busy, [], COST, others=others)
    assert not d.disagg and d.code == "no_prefill" and not d.needs_prefill_engine


def test_ttft_slo_sets_the_target_when_given() -> None:
    assert COST.ttft_target_s(1500) == pytest.approx(4 * 3.0 + 0.5)
    assert COST.ttft_target_s(1500, 1.0) == 1.0
    queued = EngineLoad("e0", "prefill", queued_prefill_tokens=500)  # 1 s ahead -> 1.3 s
    d = decide(150, EngineLoad("e1", "decode", running=1, slack_s=10.0), [queued], COST, slo_ttft_s=5.0)
    assert d.disagg and d.code == "free"
    d = decide(150, EngineLoad("e1", "decode", running=1, slack_s=10.0), [queued], COST, slo_ttft_s=1.0)
    assert not d.disagg and d.code == "busy"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def loads(running: int = 0) -> list[EngineLoad]:
    return [EngineLoad("e0", "prefill", running=0), EngineLoad("e1", "decode", running=running)]


def test_balancer_hands_an_idle_prefill_engine_to_decode_only_after_the_quiet_window() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0)
    for _ in range(39):  # chat only: nothing needed a prefill engine, but the window is not yet over
        assert b.tick(loads(8)) is None
        clock.t += 0.5
    clock.t += 0.5
    assert b.tick(loads(8)) is None  # quiet for 20 s: the want starts, it must persist 1 s
    clock.t += 1.0
    assert b.tick(loads(8)) == "e0"
    assert b.leanings == {"e0": "decode", "e1": "decode"}
    assert "-> decode" in b.last_reason and b.switches == 1


def test_balancer_grows_the_prefill_side_within_seconds_of_demand_and_dwells() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0, min_prefill=0, decode_busy_s=0.03)  # decode steps fast
    b.leanings = {"e0": "decode", "e1": "decode"}
    b.record(5.0)  # RAG prompts no decode engine could absorb: 5 s of prefill in 10 s, beyond 2 x 20%
    assert b.targets() == (1, 1)
    assert b.tick(loads(2)) is None  # must persist
    clock.t += 1.0
    moved = b.tick(loads(2))
    assert moved == "e0" and b.leanings[moved] == "prefill"  # the engine with fewer decodes moves
    # demand gone right away: the long window still remembers it, so no flip back
    for _ in range(15):
        clock.t += 1.0
        assert b.tick(loads(2)) is None
    assert b.switches == 1


def test_balancer_keeps_min_decode_and_scales_with_demand_on_many_engines() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=30.0)
    engines = [EngineLoad(f"e{i}", "decode", running=i) for i in range(4)]
    for _ in range(60):  # 30 s of prefill work every 10 s: 3 engines' worth, capped at 4 - min_decode
        b.record(3.0)
        clock.t += 1.0
        b.tick(engines)
    assert sum(v == "prefill" for v in b.leanings.values()) == 3
    assert b.leanings["e3"] == "decode"  # the busiest decoder never moved
    assert b.switches == 3


def test_demand_that_is_gone_before_it_persisted_moves_nothing() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0, up_window_s=10.0)
    b.leanings = {"e0": "decode", "e1": "decode"}
    b.record(3.0)
    assert b.tick(loads()) is None  # the want starts now
    clock.t += 10.5  # no tick saw it persist, and the short window has forgotten it
    assert b.tick(loads()) is None
    assert b.switches == 0


def test_a_dead_engine_leaves_a_decode_engine() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock)
    b.tick([EngineLoad("e0", "prefill"), EngineLoad("e1", "decode")])
    dead = [EngineLoad("e0", "prefill"), EngineLoad("e1", "decode", healthy=False)]
    b.tick(dead)
    clock.t += 1.5
    assert b.tick(dead) == "e0" and b.leanings["e0"] == "decode"
    assert math.isinf(EngineLoad("x", "decode").slack_s)


def test_an_idle_prefill_engine_stays_put_while_the_decode_side_is_not_busy() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0, decode_busy_s=0.03)

    def run(step_s: float, running: int = 3) -> str | None:
        moved = None
        for _ in range(30):
            clock.t += 1.0
            moved = moved or b.tick([EngineLoad("e0", "prefill"), EngineLoad("e1", "decode", running=running,
                                                                                step_s=step_s)])
        return moved

    assert run(0.026) is None  # quiet, but decode steps are fast: nothing to gain from a second decoder
    assert run(0.035, running=0) is None  # slow step figure, but nothing decoding now
    assert run(0.035) == "e0"  # busy decoder: the quiet prefill engine turns to decode


def test_decode_engines_give_one_up_only_for_prefill_demand_beyond_their_stall_budget() -> None:
    clock = Clock()

    def grows(prefill_s_per_s: float, step_s: float) -> bool:
        b = RoleBalancer(COST, clock, decode_busy_s=0.03)
        b.leanings = {"e0": "decode", "e1": "decode"}
        engines = [EngineLoad(e, "decode", running=4, step_s=step_s) for e in ("e0", "e1")]
        for _ in range(12):
            b.record(prefill_s_per_s)
            clock.t += 1.0
            if b.tick(engines):
                return True
        return False

    assert not grows(0.3, 0.035)  # short prompts beside busy decodes: 0.3 engine, within 2 x 20%: both decode
    assert not grows(0.3, 0.025)  # fast steps now (two engines share the batch) do not undo that: no flapping
    assert grows(0.5, 0.035)  # beyond the stall budget: a prefill engine pays


def test_a_prefill_engine_busy_with_prompts_that_fit_locally_stays_a_prefill_engine() -> None:
    """RAG at a low rate: each prompt arrived while the decode engine could have absorbed it (nothing
    "needed" a prefill engine), but together they are 0.66 engine of prefill: two decode engines
    would spend a third of their time stalled, so the prefill engine stays."""
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0, decode_busy_s=0.03)
    busy = [EngineLoad("e0", "prefill"), EngineLoad("e1", "decode", running=2, step_s=0.035)]
    for _ in range(60):
        clock.t += 1.0
        b.record(0.66, needed=False)
        assert b.tick(busy) is None
    assert b.demand(20.0) == 0 and b.demand(20.0, needed_only=False) == pytest.approx(0.66, rel=0.1)
    for _ in range(30):  # chat: little prefill at all; the busy decode side gets the engine
        clock.t += 1.0
        b.record(0.1, needed=False)
        if b.tick(busy):
            break
    assert b.leanings["e0"] == "decode"


def test_only_an_idle_prefill_engine_turns_decode_and_the_last_one_not_under_rare_long_prompts() -> None:
    """A prefill engine turns decode only with no prompt queued or running on it (no new decode lands
    beside a prefill). And while long prompts still need handing over, even rarely (one every 17 s,
    within the stall budget), the last prefill engine stays."""
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0, decode_busy_s=0.03)

    def engines(queued: int) -> list[EngineLoad]:
        return [EngineLoad("e0", "prefill", queued_prefill_tokens=queued),
                EngineLoad("e1", "decode", running=6, step_s=0.035)]

    for i in range(40):
        clock.t += 1.0
        if i in (5, 22):
            b.record(4.6)  # a RAG prompt, handed over
        elif i % 2 == 0:
            b.record(0.15, needed=False)  # chat prompts, absorbed locally
        assert b.tick(engines(queued=0)) is None
    for _ in range(25):  # chat only now: the prefill engine stays while a prompt is queued on it ...
        clock.t += 1.0
        b.record(0.15, needed=False)
        assert b.tick(engines(queued=1500)) is None
    assert b.demand(20.0) == 0
    moved = None
    for _ in range(3):  # ... and moves once it is idle
        clock.t += 1.0
        moved = moved or b.tick(engines(queued=0))
    assert moved == "e0" and b.leanings == {"e0": "decode", "e1": "decode"}


def test_prefill_engines_that_stay_must_carry_the_handed_over_demand() -> None:
    clock = Clock()
    b = RoleBalancer(COST, clock, idle_s=20.0, decode_busy_s=0.03)
    engines = [EngineLoad(f"e{i}", "prefill" if i < 3 else "decode", running=0 if i < 3 else 6, step_s=0.035)
               for i in range(8)]
    for _ in range(60):  # 1.0 engine of handed-over prefill, within 5 decoders' stall budget (1.2):
        clock.t += 1.0  # it needs ceil(1.0 / 0.7) = 2 engines, so one of 3 turns decode and no more
        b.record(1.0)
        b.tick(engines)
    assert sum(v == "prefill" for v in b.leanings.values()) == 2 and b.switches == 1
    for _ in range(60):  # 0.5 engine: one carries it, the other turns decode; the last one stays
        clock.t += 1.0
        b.record(0.5)
        b.tick(engines)
    assert sum(v == "prefill" for v in b.leanings.values()) == 1 and b.switches == 2


def test_with_moves_rare_long_prompts_borrow_an_engine_and_the_last_prefill_engine_goes() -> None:
    """With decode moves a long prompt can borrow an engine (``drain``) for ~0.5 s of moving. Under
    0.25 engine of handed-over prefill in 20 s the last prefill engine turns decode; above it stays
    (no flapping: growing back still needs the stall budget's 2 x 20%); short prompts still count
    against the stall budget."""
    clock = Clock()

    def run(long_s: float, every_s: int, chat_s: float, borrow: float = 0.25) -> dict[str, str]:
        b = RoleBalancer(COST, clock, idle_s=20.0, decode_busy_s=0.03, borrow_below=borrow)
        engines = [EngineLoad("e0", "prefill"), EngineLoad("e1", "decode", running=6, step_s=0.035)]
        for i in range(60):
            clock.t += 1.0
            if i % every_s == 0:
                b.record(long_s)  # a long prompt, handed over
            b.record(chat_s, needed=False)
            b.tick(engines)
        return b.leanings

    assert run(2.0, 12, 0.15)["e0"] == "decode"  # 1-2 in any 20 s: 0.1-0.2 engine, each borrows one
    assert run(2.0, 12, 0.15, borrow=0.0)["e0"] == "prefill"  # without moves the last one stays
    assert run(3.4, 9, 0.15)["e0"] == "prefill"  # 2-3 in 20 s: 0.34-0.51 engine, a standing prefill engine
    assert run(2.0, 12, 0.5)["e0"] == "prefill"  # the short prompts alone are beyond 2 x 20% of the decoders
