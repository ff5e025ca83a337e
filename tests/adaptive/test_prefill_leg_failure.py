"""A prefill leg whose row cannot be sampled (the worker's engine loops, the shm transport, a tiny model):
that prompt's leg answers an error and never signals its room but abandons it (decode fails the room at
once), the prompt handed over beside it in the same steps arrives whole with the tokens a lone engine
gives, and once the router drops the failed room (it closes decode's stream) neither engine holds a
page; a dropped room's pages wait for its writer to stop."""

from __future__ import annotations

import asyncio

import pytest

from appliance.engine.handoff import Transfer
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Error
from tests.adaptive import test_move_engine as mv
from tests.engine.faults import poison
from tests.engine.reference import NaiveLlama

GOOD = [7 + (i * 5) % 240 for i in range(21)]
BAD = [9 + (i * 3) % 200 for i in range(17)]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
LEG = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)  # prefill's part: the first token


@pytest.fixture
def pair(tiny_model):
    a, b = mv.worker(str(tiny_model), "a"), mv.worker(str(tiny_model), "b")
    yield a, b
    for w in (a, b):
        w.handoff.close()
        w.engine.shutdown()


def test_a_failed_prefill_leg_signals_nothing_and_leaks_nothing(pair, tiny_model) -> None:
    a, b = pair
    undo = poison(a.engine, "bad", after=0)

    async def scenario() -> tuple[list, list, list, bool]:
        async with mv.loops(a, b) as (la, lb):
            legs = {}
            for rid, prompt in (("bad", BAD), ("good", GOOD)):
                qb = lb.open_stream(rid)
                pages = await lb.call(lambda r=rid, p=prompt: lb.reserve(r, f"room-{r}", p, PARAMS, 1, 10.0))
                legs[rid] = qb, Transfer(room=f"room-{rid}", handles=[b.handle_json], dst_pages=pages)
            qa_bad = la.submit("bad", BAD, LEG, legs["bad"][1])
            qa_good = la.submit("good", GOOD, LEG, legs["good"][1])
            bad = await mv.until(qa_bad, (Done, Error))
            prefill_good = await mv.until(qa_good, (Done, Error))
            decode_good = await mv.until(legs["good"][0], (Done, Error))
            # the failed leg abandons its room: decode fails it at once (a signal would have landed by now too)
            early = await mv.until(legs["bad"][0], (Done, Error), timeout_s=5.0)
            lb.abort("bad")  # what the router does when a leg fails: decode drops the room
            await asyncio.sleep(1.2)  # the dropped room's pages leave quarantine (HANDOFF_GRACE_S)
            await lb.call(lb._release_quarantine)
            return bad, prefill_good, decode_good, early

    try:
        bad, prefill_good, decode_good, early = asyncio.run(scenario())
    finally:
        undo()
    assert len(bad) == 1 and isinstance(bad[0], Error) and bad[0].status == 500, bad
    assert len(early) == 1 and isinstance(early[0], Error), f"the failed leg's room was signalled: {early}"
    assert early[0].status == 502 and "gave the room up" in early[0].message
    assert isinstance(prefill_good[-1], Done) and isinstance(decode_good[-1], Done)
    expected = NaiveLlama(str(tiny_model)).greedy(GOOD, PARAMS.max_tokens)
    assert mv.tokens(prefill_good) == expected[:1] and mv.tokens(decode_good) == expected
    assert mv.idle(a) and mv.idle(b)



def test_a_failed_engine_step_abandons_the_rooms_it_was_writing(pair) -> None:
    """An engine step that raises after its KV writes fails every request in flight; a prefill leg among them
    abandons its room, so decode fails it at once instead of at its lease."""
    a, b = pair
    real = a.engine.runner.step

    def boom(*args, **kw):
        real(*args, **kw)  # the layers ran and pushed their pages: the room is opened
        raise RuntimeError("boom")

    async def scenario() -> tuple[list, list]:
        async with mv.loops(a, b) as (la, lb):
            qb = lb.open_stream("r")
            pages = await lb.call(lambda: lb.reserve("r", "room-boom", GOOD, PARAMS, 1, 30.0))
            a.engine.runner.step = boom
            qa = la.submit("r", GOOD, LEG, Transfer(room="room-boom", handles=[b.handle_json], dst_pages=pages))
            prefill = await mv.until(qa, (Done, Error))
            decode = await mv.until(qb, (Done, Error), timeout_s=5.0)  # the lease is 30 s
            lb.abort("r")
            await asyncio.sleep(1.2)
            await lb.call(lb._release_quarantine)
            return prefill, decode

    try:
        prefill, decode = asyncio.run(scenario())
    finally:
        a.engine.runner.step = real
    assert isinstance(prefill[-1], Error) and prefill[-1].status == 500 and "boom" in prefill[-1].message
    assert isinstance(decode[-1], Error) and "gave the room up" in decode[-1].message
    assert mv.idle(a) and mv.idle(b)


def test_a_dropped_rooms_pages_wait_until_its_writer_stops(pair, monkeypatch) -> None:
    """The decode side drops a room a sender has begun writing (the router aborted the request): its pages
    stay quarantined past HANDOFF_GRACE_S until the sender abandons the room, behind its writes; a sender
    that never says so holds them until HANDOFF_QUIET_MAX_S. One-sided writes may land until then."""
    import appliance.serve.engine_loop as engine_loop
    from nvshmem_kv import PoolHandle
    from tests.waiting import wait_until

    a, b = pair
    monkeypatch.setattr(engine_loop, "HANDOFF_GRACE_S", 0.2)
    monkeypatch.setattr(engine_loop, "HANDOFF_QUIET_MAX_S", 30.0)
    peer = a.transport.connect(PoolHandle.from_json(b.handle_json), a.handoff.sender.local)

    async def scenario(abandon: bool) -> tuple[int, int, int]:
        lb = EngineLoop(b.engine, asyncio.get_running_loop(), b.transport)
        lb.start()
        try:
            lb.open_stream("r")
            pages = await lb.call(lambda: lb.reserve("r", "room-r", GOOD, PARAMS, 1, 10.0))
            a.transport.write(peer, "room-r", 0, a.engine.pool.kv, [0, 1], pages[:2])  # the room is opened
            b.transport.expect("marker", 1, 10.0)  # frames arrive in order: once this signal is in, so is the Open
            a.transport.signal(peer, "marker")
            assert b.transport.wait("marker", 5.0).done
            b.transport.release("marker")
            lb.abort("r")
            await asyncio.sleep(0.5)  # past the grace
            await lb.call(lb._release_quarantine)
            held = lb.quarantined_pages
            if abandon:
                a.transport.abandon(peer, "room-r")
                wait_until(lambda: b.transport.quiet("room-r"), 5.0, 0.01, what="the abandon")
            else:
                await asyncio.sleep(engine_loop.HANDOFF_QUIET_MAX_S)  # past the cap
                assert not b.transport.quiet("room-r")
            await lb.call(lb._release_quarantine)
            return len(pages), held, lb.quarantined_pages
        finally:
            lb.stop()

    reserved, held, left = asyncio.run(scenario(abandon=True))
    assert held == reserved and left == 0 and mv.idle(b)
    monkeypatch.setattr(engine_loop, "HANDOFF_QUIET_MAX_S", 1.0)
    reserved, held, left = asyncio.run(scenario(abandon=False))
    assert held == reserved and left == 0 and mv.idle(b)
    a.transport.disconnect(peer)


def test_every_rank_of_a_tp2_prefill_abandons_an_aborted_room(tiny_model) -> None:
    """A TP 2 prefill leg aborted mid-prompt: rank 0 abandons its room and tells rank 1, which abandons its
    own writes; decode's pages leave quarantine after the grace, not after HANDOFF_QUIET_MAX_S."""
    import secrets
    import time

    from appliance.config import EngineConfig
    from appliance.serve.worker import Worker
    from appliance.serve.worker_config import WorkerConfig
    from tests.waiting import wait_until

    a = Worker(WorkerConfig(role="prefill", name="a", model=str(tiny_model), transport="shm",
                            run_id=f"tp2-{secrets.token_hex(4)}",
                            engine=EngineConfig(dtype="float32", page_size=4, num_pages=128, tp_size=2,
                                                max_prefill_tokens=8)))
    a.build_engine()
    b = mv.worker(str(tiny_model), "b")
    real = a.engine.runner.step

    def slow(*args, **kw):  # chunks of 8 tokens, 0.2 s each: the abort lands mid-prompt
        out = real(*args, **kw)
        time.sleep(0.2)
        return out

    a.engine.runner.step = slow
    prompt = [11 + (i * 7) % 230 for i in range(48)]

    async def scenario() -> tuple[int, float]:
        async with mv.loops(a, b) as (la, lb):
            lb.open_stream("r")
            pages = await lb.call(lambda: lb.reserve("r", "room-tp", prompt, PARAMS, 2, 30.0))
            la.submit("r", prompt, LEG, Transfer(room="room-tp", handles=[b.handle_json], dst_pages=pages))
            table = b.transport._rooms._rooms  # both ranks have opened the room: each has written
            wait_until(lambda: len(table["room-tp"].writers) == 2, 20.0, 0.02, what="both ranks writing")
            la.abort("r")
            lb.abort("r")
            start = time.monotonic()
            await lb.call(lambda: None)  # the decode side dropped the room: its pages are quarantined
            held = lb.quarantined_pages

            async def released() -> bool:
                await lb.call(lb._release_quarantine)
                return lb.quarantined_pages == 0

            while not await released() and time.monotonic() - start < 8.0:
                await asyncio.sleep(0.1)
            return held, time.monotonic() - start

    try:
        held, took = asyncio.run(scenario())
        assert held > 0 and took < 4.0, (held, took)  # the grace is 1 s; the cap 10 s
        assert b.transport.quiet("room-tp") and mv.idle(b)
    finally:
        a.handoff.close()
        a.engine.shutdown()
        b.handoff.close()
        b.engine.shutdown()


def test_a_leg_whose_room_decode_gave_up_computes_no_more_of_its_prompt(tiny_model) -> None:
    """Decode gives a room up while its prefill is chunks from done (the router aborted the request there, a
    lease ran out): the writer hears the Cancel at its next layer, and the leg ends after that step with a
    502 and its Close, rather than computing the rest of its prompt (seconds of a long prompt on a GPU)
    into pages it may no longer write, while decode keeps them out of use. Neither side leaks a page."""
    import secrets
    import time

    from appliance.config import EngineConfig
    from appliance.serve.worker import Worker
    from appliance.serve.worker_config import WorkerConfig
    from tests.waiting import wait_until

    prompt = [3 + (i * 7) % 250 for i in range(160)]  # 20 chunks of 8 tokens
    a, b = (Worker(WorkerConfig(role="auto", name=n, model=str(tiny_model), transport="shm",
                                run_id=f"cut-{secrets.token_hex(4)}",
                                engine=EngineConfig(dtype="float32", page_size=4, num_pages=128, max_prefill_tokens=8)))
            for n in ("a", "b"))
    for w in (a, b):
        w.build_engine()
    real, chunks = a.engine.runner.step, []

    def slow(sb, *args, **kw):  # a step long enough for the Cancel to come back between two of them
        chunks.append(sum(sb.extend_lens))
        time.sleep(0.15)
        return real(sb, *args, **kw)

    async def scenario() -> tuple[list, list, int]:
        async with mv.loops(a, b) as (la, lb):
            lb.open_stream("r")
            pages = await lb.call(lambda: lb.reserve("r", "room-cut", prompt, PARAMS, 1, 30.0))
            a.engine.runner.step = slow
            qa = la.submit("r", prompt, LEG, Transfer(room="room-cut", handles=[b.handle_json], dst_pages=pages))
            wait_until(lambda: len(chunks) >= 2, 10.0, 0.01, what="two chunks of the prompt")
            lb.abort("r")  # decode gives the room up: a Cancel to its writer
            prefill = await mv.until(qa, (Done, Error))
            computed = sum(chunks)
            await asyncio.sleep(1.2)  # the room's pages leave quarantine once its Close came
            await lb.call(lb._release_quarantine)
            return prefill, chunks, computed

    try:
        prefill, chunks, computed = asyncio.run(scenario())
    finally:
        a.engine.runner.step = real
    assert isinstance(prefill[-1], Error) and prefill[-1].status == 502, prefill
    assert computed < len(prompt) / 2, f"the leg computed {computed} of {len(prompt)} prompt tokens: {chunks}"
    assert mv.idle(a) and mv.idle(b)
    for w in (a, b):
        w.handoff.close()
        w.engine.shutdown()


def test_every_rank_of_a_tp2_prefill_asks_for_a_new_room_before_its_first_step(tiny_model) -> None:
    """A TP 2 prefill leg arrives: rank 0 asks the decode pool for its room at once and tells rank 1 to, so
    both ranks are the room's writers before the leg's first step (rank 1 learned of the room from that step
    and waited a round trip at layer 0 while rank 0 waited for it in the all-reduce). The leg then runs
    whole: its room completes, and neither side leaks a page."""
    import secrets
    import threading

    from appliance.config import EngineConfig
    from appliance.serve.worker import Worker
    from appliance.serve.worker_config import WorkerConfig
    from tests.waiting import wait_until

    a = Worker(WorkerConfig(role="prefill", name="a", model=str(tiny_model), transport="shm",
                            run_id=f"tp2-{secrets.token_hex(4)}",
                            engine=EngineConfig(dtype="float32", page_size=4, num_pages=128, tp_size=2)))
    a.build_engine()
    b = mv.worker(str(tiny_model), "b")
    real, go, steps = a.engine.runner.step, threading.Event(), []

    def held(*args, **kw):  # the leg's first step waits until the test saw the room's writers
        steps.append(len(b.transport._rooms._rooms["room-tp"].writers))
        assert go.wait(20)
        return real(*args, **kw)

    a.engine.runner.step = held

    async def scenario() -> tuple[list, list]:
        async with mv.loops(a, b) as (la, lb):
            qb = lb.open_stream("r")
            pages = await lb.call(lambda: lb.reserve("r", "room-tp", GOOD, PARAMS, 2, 30.0))
            qa = la.submit("r", GOOD, LEG, Transfer(room="room-tp", handles=[b.handle_json], dst_pages=pages))
            wait_until(lambda: steps, 20.0, 0.01, what="the leg's first step")
            table = b.transport._rooms._rooms  # both ranks asked: the pool answered each before any write
            wait_until(lambda: len(table["room-tp"].writers) == 2, 5.0, 0.01, what="rank 1's Open")
            go.set()
            return await mv.until(qa, (Done, Error)), await mv.until(qb, (Done, Error))

    try:
        prefill, decode = asyncio.run(scenario())
        assert isinstance(prefill[-1], Done) and isinstance(decode[-1], Done), (prefill, decode)
        assert mv.tokens(decode) == NaiveLlama(str(tiny_model)).greedy(GOOD, PARAMS.max_tokens)
        assert mv.idle(a) and mv.idle(b)
    finally:
        go.set()
        a.engine.runner.step = real
        a.handoff.close()
        a.engine.shutdown()
        b.handoff.close()
        b.engine.shutdown()
