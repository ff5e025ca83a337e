"""The per-request decision and the role balancer, on fake engines and a fake clock."""

from __future__ import annotations

from appliance.serve.adaptive import CostModel, EngineLoad, RoleBalancer, decide

COST = CostModel(prefill_tok_s=200.0, decode_step_s=0.025, chunk_tokens=512)
TPOT = 0.0375  # 1.5 x the isolated step


def test_idle_decode_engine_prefills_locally() -> None:
    d = decide(1500, EngineLoad("e1", "decode"), [EngineLoad("e0", "prefill")], COST, TPOT)
    assert not d.disagg and "idle" in d.reason


def test_short_prompt_stays_local_within_tpot_slack() -> None:
    cost = CostModel(prefill_tok_s=4000.0, decode_step_s=0.025)
    d = decide(20, EngineLoad("e1", "decode", running=8), [EngineLoad("e0", "prefill")], cost, TPOT)
    assert not d.disagg and "within the TPOT slack" in d.reason


def test_long_prompt_beside_running_decodes_is_handed_over() -> None:
    d = decide(1500, EngineLoad("e1", "decode", running=8), [EngineLoad("e0", "prefill")], COST, TPOT)
    assert d.disagg and "stall 8 decodes" in d.reason


def test_backed_up_prefill_queue_keeps_it_local() -> None:
    busy = EngineLoad("e0", "prefill", queued_prefill_tokens=20_000)
    d = decide(600, EngineLoad("e1", "decode", running=4), [busy], COST, TPOT)
    assert not d.disagg and "backed up" in d.reason


def test_full_decode_kv_forces_handoff_and_no_prefill_engine_forces_local() -> None:
    d = decide(100, EngineLoad("e1", "decode", running=2, kv_free_frac=0.05), [EngineLoad("e0", "prefill")], COST,
               TPOT)
    assert d.disagg
    d = decide(1500, EngineLoad("e1", "decode", running=8), [], COST, TPOT)
    assert not d.disagg and "no prefill" in d.reason


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def loads(prefill_tokens: int, running: int) -> list[EngineLoad]:
    return [EngineLoad("e0", "prefill", queued_prefill_tokens=prefill_tokens, running=0),
            EngineLoad("e1", "decode", queued_prefill_tokens=0, running=running)]


def test_balancer_switches_after_persistent_pressure_and_not_before() -> None:
    clock = Clock()
    b = RoleBalancer(COST, TPOT, clock)
    # chat-heavy: many decodes, nothing to prefill -> the prefill engine should lean decode
    for _ in range(3):
        assert b.tick(loads(0, 40)) is None  # pressure must persist 2 s first
        clock.t += 0.5
    clock.t += 1.0
    assert b.tick(loads(0, 40)) == "e0"
    assert b.leanings == {"e0": "decode", "e1": "decode"}
    # RAG-heavy right after: the dwell time stops an immediate flip back (hysteresis)
    clock.t += 1.0
    assert b.tick(loads(8000, 0)) is None
    clock.t += 2.5
    assert b.tick(loads(8000, 0)) is None  # persisted, but the last switch is younger than 5 s
    clock.t += 2.0
    assert b.tick(loads(8000, 0)) in ("e0", "e1")
    assert sorted(b.leanings.values()) == ["decode", "prefill"]
    assert b.switches == 2


def test_balancer_ignores_a_brief_spike_and_keeps_one_decode_engine() -> None:
    clock = Clock()
    b = RoleBalancer(COST, TPOT, clock)
    b.tick(loads(8000, 0))
    clock.t += 1.0
    b.tick(loads(0, 0))  # the spike is gone before persist_s: no switch, direction reset
    clock.t += 5.0
    assert b.tick(loads(0, 0)) is None
    # with prefill pressure forever, the last decode-leaning engine never leaves
    for _ in range(20):
        clock.t += 1.0
        b.tick(loads(8000, 0))
    assert list(b.leanings.values()).count("decode") >= 1
