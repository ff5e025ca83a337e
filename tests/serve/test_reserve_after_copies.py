"""An engine that both sends and receives KV (auto mode) reserves pages for another engine's writes only
after its own copies have read them: its compute waits for its copies on the GPU, another engine's
one-sided writes do not, and a move queues a whole request's KV, then frees its pages at once."""

from __future__ import annotations

import asyncio

import pytest

import nvshmem_kv as nk
from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.handoff import PrefillHandoff
from appliance.engine.request import SamplingParams
from appliance.serve.engine_loop import EngineLoop


def test_a_reservation_waits_for_the_engines_own_copies_and_a_late_one_reserves_nothing(tiny_model) -> None:
    engine = Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=64))
    sender, receiver = nk.create("fake", run_id="send"), nk.create("fake", run_id="recv")
    engine.handoff = PrefillHandoff(sender, engine.pool.kv, engine.model_config.num_kv_heads, 4)
    seen: list[str] = []

    def wait_copies(timeout_s: float = 10.0) -> None:
        seen.append(f"wait {timeout_s:g} with {engine.pool.num_free} pages free")
        if len(seen) == 2:
            raise nk.TransportError("the KV copies did not finish within 10.0 s")

    sender.wait_copies = wait_copies  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=2)
    try:
        loop = EngineLoop(engine, asyncio.new_event_loop(), receiver)
        free = engine.pool.num_free
        pages = loop.reserve("r1", "room-1", [5, 6, 7, 8, 9], params, 1, 30.0)
        assert seen == [f"wait 10 with {free} pages free"] and pages and engine.pool.num_free == free - len(pages)
        with pytest.raises(nk.TransportError, match="did not finish"):
            loop.reserve("r2", "room-2", [5, 6, 7, 8, 9], params, 1, 30.0)
        assert engine.pool.num_free == free - len(pages) and "room-2" not in loop.rooms  # nothing reserved
        loop.aio.close()
    finally:
        engine.handoff.close()
        receiver.close()
        engine.shutdown()
    assert len(seen) == 2


def test_a_prefill_leg_asks_for_its_room_as_it_arrives(tiny_model) -> None:
    """The engine thread sends a leg's Open when it takes the request, before any step: the decode pool's
    answer is back while the request queues, and the pages count this writer from then on."""
    from appliance.engine.handoff import Transfer

    engine = Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=64))
    sender, receiver = nk.create("fake", run_id="send"), nk.create("fake", run_id="recv")
    engine.handoff = PrefillHandoff(sender, engine.pool.kv, engine.model_config.num_kv_heads, 4)
    desc = nk.PoolDescriptor.from_tensor(engine.pool.kv, engine.model_config.num_kv_heads)
    handle = receiver.register_pool(receiver.allocate_pool(desc), desc).to_json().decode()
    aio = asyncio.new_event_loop()
    try:
        loop = EngineLoop(engine, aio, None)
        receiver.expect("room", 1, 30.0)
        loop.submit("leg", [5, 6, 7, 8, 9], SamplingParams(max_tokens=1), Transfer("room", [handle], [1, 2]))
        loop.inbox.get_nowait()()  # the engine thread's command: add the request (no step runs)
        assert not engine.scheduler.running and engine.has_unfinished()
        peer = engine.handoff.sender.peers[handle]
        peer.answers.wait_accepted("room", 10.0)  # asked and accepted before any step
        receiver.release("room")
        assert not receiver.quiet("room")
    finally:
        aio.close()
        engine.handoff.close()
        receiver.close()
        engine.shutdown()
