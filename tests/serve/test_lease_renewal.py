"""Decode's reservation is renewed while prefill's leg is open: a prompt queued behind others' prefills
(for however long no estimate predicted) is served, and a prefill that is down is not waited for."""

from __future__ import annotations

import asyncio

import pytest

from appliance.serve.dispatch import Dispatcher
from appliance.serve.policies import WorkerHandle
from appliance.serve.protocol import PrefillAnswer
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.worker_client import WorkerFailed

LEASE_S = 0.3


class RenewingClient:
    """The worker client's ``extend`` as decode answers it: True while it holds the room."""

    def __init__(self, holds: bool = True) -> None:
        self.holds = holds
        self.renewals: list[tuple[str, str, float]] = []

    async def extend(self, d: WorkerHandle, room: str, lease_s: float) -> bool:
        self.renewals.append((d.name, room, lease_s))
        return self.holds


def dispatcher(client: RenewingClient) -> Dispatcher:
    cfg = RouterConfig(connect_timeout_s=0.05)
    return Dispatcher(cfg, client, RouterMetrics(), eligible=lambda role: [])  # type: ignore[arg-type]


async def handoff(client: RenewingClient, prefill_healthy: bool, prefill_s: float) -> tuple[float, float]:
    d = dispatcher(client)
    p = WorkerHandle("prefill-0", "prefill", "http://p", healthy=prefill_healthy)
    dec = WorkerHandle("decode-0", "decode", "http://d", healthy=True)
    loop = asyncio.get_running_loop()
    ptask = asyncio.ensure_future(asyncio.sleep(prefill_s, result=PrefillAnswer(token_ids=[1])))
    dtask: asyncio.Future = loop.create_future()  # decode speaks only after the handoff
    t0 = loop.time()
    try:
        by = await d.await_handoff(p, dec, "room-1", LEASE_S, ptask, dtask, t0 + LEASE_S + 0.1, "late")
    finally:
        ptask.cancel()
        dtask.cancel()
    return loop.time() - t0, by - t0


def test_queued_prefill_outlives_many_leases() -> None:
    client = RenewingClient()
    waited, by = asyncio.run(handoff(client, prefill_healthy=True, prefill_s=6 * LEASE_S))
    assert waited >= 6 * LEASE_S
    assert len(client.renewals) >= 5, client.renewals          # about one per third of a lease
    assert {(n, r, s) for n, r, s in client.renewals} == {("decode-0", "room-1", LEASE_S)}
    assert by > waited                                          # the renewed deadline is ahead of now


def test_no_renewal_for_a_prefill_that_is_down() -> None:
    client = RenewingClient()
    with pytest.raises(WorkerFailed, match="late"):
        asyncio.run(handoff(client, prefill_healthy=False, prefill_s=10.0))
    assert client.renewals == []


def test_a_room_decode_let_go_is_not_waited_for() -> None:
    client = RenewingClient(holds=False)  # decode failed or released the room: renewals answer False
    with pytest.raises(WorkerFailed, match="late"):
        asyncio.run(handoff(client, prefill_healthy=True, prefill_s=10.0))
    assert 1 <= len(client.renewals) <= 6  # ~one per 0.1 s until the 0.4 s deadline; timers may fire a hair early
