"""AdaptivePlacement.choose on fake worker handles and a fake clock: where a request goes, and why."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from appliance.serve import openai_api as oai
from appliance.serve.adaptive_placement import AdaptivePlacement
from appliance.serve.load_report import LoadReport
from appliance.serve.policies import WorkerHandle
from appliance.serve.progress import Progress
from appliance.serve.router import Router
from appliance.serve.router_config import AutoConfig, RouterConfig

LOAD = LoadReport(prefill_tok_s=500.0, decode_step_s=0.025, total_pages=1000, free_pages=1000)


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def placement(cfg: RouterConfig, auto: AutoConfig, clock) -> AdaptivePlacement:  # type: ignore[no-untyped-def]
    """The adaptive placement of a router in ``--mode auto`` (no workers yet)."""
    p = Router(cfg, tokenizer=None, vocab_size=49152, auto=auto, clock=clock).placement
    assert isinstance(p, AdaptivePlacement)
    return p


def router(prefill: tuple[str, ...] = ("e0",), move: bool = False, clock=None  # type: ignore[no-untyped-def]
           ) -> tuple[AdaptivePlacement, Clock]:
    """``move``: an engine turning prefill moves its decodes away (else they finish there first)."""
    clock = clock or Clock()
    r = placement(RouterConfig(mode="auto", decode_policy="round_robin"),
                  AutoConfig(initial_prefill=prefill, move=move), clock)
    for name in ("e0", "e1"):
        r.pool.add(WorkerHandle(name=name, role="auto", url=f"http://{name}", healthy=True, load=LOAD))
    r.rebalance()  # the balancer takes the starting split
    return r, clock


def decoding(r: AdaptivePlacement, rid: str, on: str, max_tokens: int, emitted: int, since_first_s: float) -> None:
    """A request the router has in flight on ``on``, ``emitted`` tokens out, the first ``since_first_s`` ago."""
    now = r.clock()
    r.active[rid] = Progress(on, on, 100, max_tokens, now - since_first_s - 0.3, now - since_first_s, emitted)


def test_long_prompt_goes_to_the_prefill_engine_while_a_decode_runs_beside_it() -> None:
    r, _ = router()
    decoding(r, "a", "e1", 48, 10, 0.25)  # a short answer: ~0.5 s of slack
    kind, choice, dec, uncached = r.choose(list(range(1500)))
    assert kind == "disagg" and choice["prefill"].name == "e0" and choice["decode"].name == "e1"
    assert dec.code == "free" and uncached == 1500
    assert r.balancer is not None and r.balancer.demand(10.0) > 0  # it needed a prefill engine


def test_with_no_prefill_engine_a_long_prompt_moves_to_the_decode_engine_that_can_absorb_it() -> None:
    r, _ = router(prefill=())
    decoding(r, "a", "e0", 48, 10, 0.25)  # e0: a short answer with little slack
    r.dispatch.policies["decode"].i = -1  # round robin would pick e0 first
    kind, choice, dec, _ = r.choose(list(range(1500)))
    assert kind == "local" and choice["unified"].name == "e1" and dec.code == "moved"
    assert dec.reason.startswith("moved to e1") and r.balancer.demand(10.0) == 0
    # both busy with long answers and little slack: it must prefill beside someone; the demand is recorded
    decoding(r, "a", "e0", 2000, 10, 25.0)  # 50 s of decoding left: no drain in time
    decoding(r, "b", "e1", 2000, 10, 25.0)
    kind, choice, dec, _ = r.choose(list(range(1500)))
    assert kind == "local" and dec.code == "no_prefill" and r.balancer.demand(10.0) > 0


def test_when_decodes_can_move_a_long_prompt_turns_an_engine_prefill_at_once() -> None:
    r, _ = router(prefill=(), move=True)
    decoding(r, "a", "e0", 2000, 10, 25.0)  # long answers with little slack: 50 s to finish where they are
    decoding(r, "b", "e1", 2000, 10, 25.0)
    r.active["c"] = Progress("e1", "e1", 300, 64, r.clock())  # e1 also prefills a prompt for itself
    kind, choice, dec, _ = r.choose(list(range(1500)))
    # e0's decode moves to e1 (0.5 s); e1 would first have to finish its own 300-token prefill
    assert kind == "disagg" and dec.code == "drain" and choice["prefill"].name == "e0"
    assert "e0 drains in 0.5 s" in dec.reason and r.leaning(choice["prefill"]) == "prefill"
    r2, _ = router(prefill=(), move=False)  # the same load, decodes that cannot move: nothing drains in time
    decoding(r2, "a", "e0", 2000, 10, 25.0)
    decoding(r2, "b", "e1", 2000, 10, 25.0)
    assert r2.choose(list(range(1500)))[2].code == "no_prefill"


def test_with_no_prefill_engine_a_long_prompt_waits_for_an_engine_to_drain_then_hands_over() -> None:
    r, _ = router(prefill=())
    decoding(r, "a", "e0", 48, 10, 0.25)  # short answers, little slack: ~1 s of decoding left on each
    decoding(r, "b", "e1", 60, 10, 0.25)
    kind, choice, dec, _ = r.choose(list(range(1500)))
    assert kind == "disagg" and dec.code == "drain" and choice["prefill"].name == "e0"  # drains first
    assert choice["decode"].name == "e1" and "e0 drains in 1.0 s" in dec.reason
    # 1500 tokens: 3 s of prefill, target 4 x 3 + 0.5 s; it may wait what the target leaves (with margin)
    assert dec.wait_s == pytest.approx(12.5 / 1.2 - 3.0 - 0.01 - 1500 * 2e-6, abs=1e-6)
    assert r.leaning(choice["prefill"]) == "prefill" and r.balancer.switches == 1
    assert r.balancer.demand(10.0) > 0  # the long window remembers it: no flip back at once
    kind, choice, dec, _ = r.choose(list(range(1500)))  # the next one has a prefill engine again
    assert kind == "disagg" and dec.code == "free" and choice["prefill"].name == "e0"


def test_queued_tokens_count_what_was_sent_since_the_last_load_report() -> None:
    r, clock = router()
    r.loaded_at["e0"] = clock.t - 1.0
    r.active["x"] = Progress("e0", "e1", 1200, 32, clock.t)  # sent after the report, no first token yet
    e0 = r.pool.workers["e0"]
    e0.load = msgspec.structs.replace(e0.load, queued_prefill_tokens=300)
    assert r.est.queued_prefill_tokens(r.pool.workers["e0"]) == 1200
    r.active["x"].first_at = clock.t
    assert r.est.queued_prefill_tokens(r.pool.workers["e0"]) == 300


def test_a_short_prompt_waits_only_for_queued_prompts_with_earlier_ttft_deadlines() -> None:
    r, clock = router()
    r.active["rag"] = Progress("e0", "e1", 1500, 32, clock.t - 1.0)  # a RAG prompt queued 1 s ago
    e0 = r.pool.workers["e0"]
    assert r.est.queued_ahead(e0, 150) == 0  # slack order: the short prompt goes first ...
    e0.load = msgspec.structs.replace(e0.load, prefill_chunk=256)
    assert r.est.queued_ahead(e0, 150) == 256  # ... after the chunk of the RAG prompt running now
    e0.load = LOAD
    assert r.est.queued_ahead(e0, 2000) == 1500  # a longer one waits behind it
    clock.t += 11.0  # the RAG prompt has aged 12 s, past a new short one's deadline: it goes first
    assert r.est.queued_ahead(e0, 150) == 1500
    decoding(r, "a", "e1", 48, 10, 0.25)
    kind, choice, dec, _ = r.choose(list(range(150)))
    assert kind == "local" and dec.code == "busy"  # 3 s behind the aged prompt: prefill it where it decodes


def test_slo_admission_refuses_at_once_when_the_predicted_ttft_is_far_beyond_the_slo() -> None:
    clock = Clock()
    r = placement(RouterConfig(mode="auto"), AutoConfig(initial_prefill=("e0",), slo_ttft_ms=500), clock)
    for name in ("e0", "e1"):
        r.pool.add(WorkerHandle(name=name, role="auto", url=f"http://{name}", healthy=True, load=LOAD))
    r.rebalance()
    kind, *_ = r.choose(list(range(150)))  # 0.3 s of prefill: within 2 x 500 ms
    assert kind == "disagg"
    for i in range(3):  # 3 x 1500 tokens queued on both engines: ~9 s ahead of anything
        r.active[f"rag{i}"] = Progress("e0", "e1", 1500, 32, clock.t)
        r.active[f"loc{i}"] = Progress("e1", "e1", 1500, 32, clock.t)
    with pytest.raises(oai.ApiError) as err:
        r.choose(list(range(2000)))
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"
    assert "beyond 2 x the 500 ms SLO" in err.value.message
    assert r.m_rejected.get() == 1


def test_a_prompt_held_for_a_draining_engine_starts_when_its_last_decode_ends() -> None:
    r, _ = router(prefill=(), clock=time.monotonic)
    decoding(r, "a", "e0", 48, 10, 0.25)
    started: list[float] = []

    held = Progress("e0", "e1", 1500, 32, time.monotonic() - 100.0)
    r.active["held"] = held
    e0 = r.pool.workers["e0"]
    r.loaded_at["e0"] = time.monotonic()  # a fresh report from e0: nothing queued there yet

    async def inner():
        started.append(time.monotonic())
        assert not held.held and r.est.queued_prefill_tokens(e0) == 1500  # sent now, before e0's next report
        yield "token"

    async def main() -> list:
        t0 = time.monotonic()
        asyncio.get_running_loop().call_later(0.2, r.active.pop, "a")  # e0's last decode ends
        gen = r._after_drain("e0", 5.0, inner(), held)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        # while held, the prompt counts as e0's queued prefill (the balancer must not move e0 back)
        assert held.held and r.est.queued_prefill_tokens(e0) == 1500
        out = [await first] + [ev async for ev in gen]
        assert 0.2 <= started[0] - t0 < 1.0
        # with no time left to wait it goes at once, decodes or not
        decoding(r, "b", "e0", 48, 10, 0.25)
        t1 = time.monotonic()
        out += [ev async for ev in r._after_drain("e0", 0.0, inner(), held)]
        assert started[1] - t1 < 0.1
        return out

    assert asyncio.run(main()) == ["token", "token"]


def test_an_engine_turning_prefill_spreads_its_decodes_over_the_others() -> None:
    r, _ = router(prefill=(), move=True)
    r.pool.add(WorkerHandle(name="e2", role="auto", url="http://e2", healthy=True, load=LOAD))
    r.rebalance()
    for rid in ("a", "b", "c"):
        decoding(r, rid, "e0", 200, 10, 0.5)
    decoding(r, "x", "e1", 200, 10, 0.5)  # e1 decodes one already, e2 none
    r.active["y"] = Progress("e0", "e0", 300, 64, r.clock())  # still prefilling on e0: it cannot move yet
    for p in r.active.values():
        p.parsed = object()  # what a move re-opens the request with (the move itself is faked here)
    moves: list[tuple[str, str]] = []

    async def fake_move(rid: str, dst: WorkerHandle) -> bool:
        moves.append((rid, dst.name))
        return True

    r.mover.move = fake_move  # type: ignore[method-assign]
    assert asyncio.run(r.mover.evacuate("e0")) == 3
    assert sorted(d for _, d in moves) == ["e1", "e2", "e2"] and "y" not in dict(moves)
    r.mover.enabled = False  # --no-move-decodes: they finish where they are
    assert asyncio.run(r.mover.evacuate("e0")) == 0 and len(moves) == 3
