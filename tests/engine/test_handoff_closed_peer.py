"""A prefill rank stops writing a room whose decode connection is gone: the decode side failed the room
when it lost the connection and reuses its pages after a grace, and the copies are one-sided (cuda_ipc,
nvshmem, shm), so the writes would land in pages another request holds. Real shm pools and sockets."""

from __future__ import annotations

import time

import torch

import nvshmem_kv as nk
from appliance.engine.handoff import PrefillHandoff, Transfer, _alive
from appliance.engine.request import Request, SamplingParams
from appliance.engine.scheduler import ScheduledBatch

LAYERS, PAGES, PAGE, HEADS, DIM = 2, 8, 4, 2, 8


def _step(handoff: PrefillHandoff, req: Request, start: int, n: int) -> None:
    """One prefill step of ``n`` prompt tokens from ``start``: every layer's hook, as the forward pass calls them."""
    hook, _ = handoff.before_forward(ScheduledBatch([req], [start], [n], [start + n == req.prompt_len]))
    assert hook is not None
    for layer in range(LAYERS):
        hook(layer)


def test_a_room_begun_on_a_closed_connection_fails_at_the_next_step() -> None:
    rx, tx = nk.create("shm"), nk.create("shm")
    try:
        kv = torch.ones(2, LAYERS, PAGES, PAGE, HEADS, DIM)
        desc = nk.PoolDescriptor.from_tensor(kv, HEADS)
        handle = rx.register_pool(rx.allocate_pool(desc), desc).to_json().decode()
        rx.expect("room", 1, 30.0)
        handoff = PrefillHandoff(tx, kv, total_kv_heads=HEADS, page_size=PAGE)
        req = Request(prompt_ids=list(range(16)), params=SamplingParams(max_tokens=1))
        req.pages, req.transfer = [0, 1, 2, 3], Transfer("room", [handle], [4, 5, 6, 7])
        _step(handoff, req, 0, 8)  # the first chunk: pages 0-1 pushed, the room begun
        assert req.transfer.error is None and tx.stats().writes == LAYERS
        rx.close()  # the decode side goes away (or drops the connection: a bad frame ends it)
        peer, end = handoff.sender.peers[handle], time.monotonic() + 10
        while _alive(peer) and time.monotonic() < end:  # until the close reaches the sender's socket
            time.sleep(0.01)
        _step(handoff, req, 8, 8)  # the last chunk
        assert req.transfer.error == "KV transfer failed: the decode side closed the connection"
        assert tx.stats().writes == LAYERS, "the second chunk was written into a room the receiver had dropped"
        assert handle not in handoff.sender.peers  # the next room to that pool connects afresh
    finally:
        tx.close()
        rx.close()
