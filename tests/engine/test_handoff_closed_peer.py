"""A prefill rank stops writing a room whose decode connection is gone: the decode side failed the room
when it lost the connection and reuses its pages after a grace, and the copies are one-sided (cuda_ipc,
nvshmem, shm), so the writes would land in pages another request holds, on a new connection as well.
Real shm pools and sockets."""

from __future__ import annotations

import time

import torch

import nvshmem_kv as nk
from appliance.engine.handoff import PrefillHandoff, Transfer, _alive
from appliance.engine.request import Request, SamplingParams
from appliance.engine.scheduler import ScheduledBatch
from nvshmem_kv.sender import Outgoing
from nvshmem_kv.wire import Write

LAYERS, PAGES, PAGE, HEADS, DIM = 2, 16, 4, 2, 8
CLOSED = "KV transfer failed: the decode side closed the connection"


def _step(handoff: PrefillHandoff, reqs: list[Request], start: int, n: int) -> None:
    """One prefill step of ``n`` prompt tokens from ``start`` of each request: every layer's hook."""
    sb = ScheduledBatch(reqs, [start] * len(reqs), [n] * len(reqs), [start + n == r.prompt_len for r in reqs])
    hook, _ = handoff.before_forward(sb)
    assert hook is not None
    for layer in range(LAYERS):
        hook(layer)


def _request(room: str, handle: str, src: list[int], dst: list[int]) -> Request:
    req = Request(prompt_ids=list(range(16)), params=SamplingParams(max_tokens=1))
    req.pages, req.transfer = src, Transfer(room, [handle], dst)
    return req


def _wait_closed(handoff: PrefillHandoff, handle: str) -> None:
    peer, end = handoff.sender.peers[handle], time.monotonic() + 10
    while _alive(peer) and time.monotonic() < end:  # until the close reaches the sender's socket
        time.sleep(0.01)


def _setup() -> tuple[nk.KVTransport, nk.KVTransport, torch.Tensor, str, PrefillHandoff]:
    rx, tx = nk.create("shm"), nk.create("shm")
    kv = torch.ones(2, LAYERS, PAGES, PAGE, HEADS, DIM)
    desc = nk.PoolDescriptor.from_tensor(kv, HEADS)
    pool = rx.allocate_pool(desc)
    handle = rx.register_pool(pool, desc).to_json().decode()
    return rx, tx, pool, handle, PrefillHandoff(tx, kv, total_kv_heads=HEADS, page_size=PAGE)


def test_a_room_begun_on_a_closed_connection_fails_at_the_next_step() -> None:
    rx, tx, _, handle, handoff = _setup()
    try:
        rx.expect("room", 1, 30.0)
        req = _request("room", handle, [0, 1, 2, 3], [4, 5, 6, 7])
        _step(handoff, [req], 0, 8)  # the first chunk: pages 0-1 pushed, the room begun
        assert req.transfer.error is None and tx.stats().writes == LAYERS
        rx.close()  # the decode side goes away
        _wait_closed(handoff, handle)
        _step(handoff, [req], 8, 8)  # the last chunk
        assert req.transfer.error == CLOSED
        assert tx.stats().writes == LAYERS, "the second chunk was written into a room the receiver had dropped"
        assert handle not in handoff.sender.peers  # the next room to that pool connects afresh
    finally:
        tx.close()
        rx.close()


def test_rooms_begun_on_a_dropped_connection_never_go_out_on_a_new_one() -> None:
    """The receiver drops the connection (a bad frame ends it) while two rooms are half written; a step of
    the one, then a step of the other: neither is written again, though the pool is up and a new
    connection to it opens for a new room."""
    rx, tx, pool, handle, handoff = _setup()
    try:
        rx.expect("a", 1, 30.0)
        rx.expect("b", 1, 30.0)
        a = _request("a", handle, [0, 1, 2, 3], [4, 5, 6, 7])
        b = _request("b", handle, [8, 9, 10, 11], [12, 13, 14, 15])
        _step(handoff, [a, b], 0, 8)
        assert tx.stats().writes == 2 * LAYERS
        handoff.sender.peers[handle].send(Outgoing(Write("a", 0, 0, HEADS, [])), 5.0)  # shm takes no Write frame
        end = time.monotonic() + 10
        while rx.poll("a").state is nk.RoomState.PENDING and time.monotonic() < end:
            time.sleep(0.01)
        assert rx.poll("a").failed and rx.poll("b").failed  # both rooms failed with their connection
        _wait_closed(handoff, handle)
        pool[:, :, 6:8].zero_()  # their pages go to other requests
        pool[:, :, 14:16].zero_()
        _step(handoff, [b], 8, 8)
        _step(handoff, [a], 8, 8)  # after the step of b dropped the dead connection
        assert a.transfer.error == b.transfer.error == CLOSED
        assert tx.stats().writes == 2 * LAYERS and not pool[:, :, 6:8].any() and not pool[:, :, 14:16].any()
        rx.expect("c", 1, 30.0)
        c = _request("c", handle, [0, 1, 2, 3], [0, 1, 2, 3])
        _step(handoff, [c], 0, 16)  # a new room opens a new connection and completes
        handoff.after_first_token(c, 7, None)
        assert c.transfer.error is None and rx.wait("c", 10).done
    finally:
        tx.close()
        rx.close()


def test_a_leg_asks_for_its_room_on_arrival_and_writes_nothing_of_a_room_given_up() -> None:
    """`PrefillHandoff.open` on arrival (the engine loop calls it): from then on the decode pool counts this
    rank as the room's writer. A room the receiver gave up since is cancelled: the step writes none of it,
    and the leg's abandon (its Close) is what frees the pages. A room the receiver never had is refused."""
    rx, tx, pool, handle, handoff = _setup()
    try:
        rx.expect("room", 1, 30.0)
        req = _request("room", handle, [0, 1, 2, 3], [4, 5, 6, 7])
        handoff.open(req.transfer)
        peer = handoff.sender.peers[handle]
        peer.answers.wait_accepted("room", 10.0)
        rx.release("room")  # the decode side gives the room up (its lease, an abort) before the step
        assert not rx.quiet("room")  # the writer it accepted may be writing
        end = time.monotonic() + 10
        while not peer.answers.cancelled("room") and time.monotonic() < end:
            time.sleep(0.01)
        _step(handoff, [req], 0, 16)
        assert "gave room 'room' up" in req.transfer.error and tx.stats().writes == 0 and not pool.any()
        handoff.abandon(req.transfer)
        end = time.monotonic() + 10
        while not rx.quiet("room") and time.monotonic() < end:
            time.sleep(0.01)
        assert rx.quiet("room")
        ghost = _request("ghost", handle, [0, 1, 2, 3], [8, 9, 10, 11])
        _step(handoff, [ghost], 0, 16)
        assert "refused room 'ghost'" in ghost.transfer.error and tx.stats().writes == 0 and not pool.any()
    finally:
        tx.close()
        rx.close()


def test_a_tp_follower_closes_a_room_it_failed_alone() -> None:
    """Rank 0 may have signalled a room (no CMD_ABANDON then comes) that the decode pool cancelled on this
    follower mid-step: the follower writes no more of it and Closes it after the step, so the pool's pages
    wait for nobody."""
    from types import SimpleNamespace

    import msgspec

    from appliance.engine.handoff import FollowerHandoff, StepPlan

    rx, tx = nk.create("shm"), nk.create("shm")
    try:
        pool = rx.allocate_pool(nk.PoolDescriptor.from_tensor(torch.zeros(2, LAYERS, PAGES, PAGE, HEADS, DIM), HEADS))
        handle = rx.register_pool(pool, nk.PoolDescriptor.from_tensor(pool, HEADS)).to_json().decode()
        kv = torch.ones(2, LAYERS, PAGES, PAGE, HEADS // 2, DIM)  # rank 1 of 2: the second head
        runner = SimpleNamespace(model_config=SimpleNamespace(num_kv_heads=HEADS), pool=SimpleNamespace(kv=kv),
                                 rank=SimpleNamespace(rank=1, world_size=2))
        follower = FollowerHandoff("shm", {}, runner, transport=tx)
        rx.expect("room", 2, 30.0)
        hook, after = follower.plan_step(msgspec.json.encode([StepPlan("room", [handle], [0, 1], [4, 5], True)]), kv)
        peer = follower.sender.peers[handle]
        peer.answers.wait_accepted("room", 10.0)  # asked as the step began
        hook(0)
        assert pool[:, 0, 4:6, :, 1].all() and not pool[:, 0, 4:6, :, 0].any()
        rx.release("room")  # the pool gives the room up (rank 0's leg failed there)
        end = time.monotonic() + 10
        while not peer.answers.cancelled("room") and time.monotonic() < end:
            time.sleep(0.01)
        hook(1)
        assert not pool[:, 1].any()  # layer 1 never went out
        assert not rx.quiet("room")
        after()
        end = time.monotonic() + 10
        while not rx.quiet("room") and time.monotonic() < end:
            time.sleep(0.01)
        assert rx.quiet("room")
    finally:
        tx.close()
        rx.close()
