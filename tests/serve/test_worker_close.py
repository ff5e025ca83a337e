"""A worker's shutdown closes its handoff transport and its engine: one after the other at TP 1, both at once
with TP followers, whose own transport close (nvshmem's is collective over every PE) waits for the stop
command that only the engine's shutdown sends."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from appliance.serve.worker import Worker


class _Collective:
    """A transport whose close returns only once the followers were told to stop (`Engine.shutdown`)."""

    def __init__(self, stopped: threading.Event) -> None:
        self.stopped, self.closed = stopped, False

    def close(self) -> None:
        self.closed = self.stopped.wait(3)  # else the followers never got their stop: the close would hang


def _worker(tp: int, order: list[str], transport) -> SimpleNamespace:
    stopped = threading.Event()

    def shutdown() -> None:
        order.append("shutdown")
        stopped.set()

    return SimpleNamespace(handoff=None, transport=transport(stopped), cfg=SimpleNamespace(engine=SimpleNamespace(
        tp_size=tp)), engine=SimpleNamespace(shutdown=shutdown))


def test_tp_followers_close_the_transport_beside_the_engine() -> None:
    order: list[str] = []
    w = _worker(2, order, _Collective)
    Worker._close_transport_and_engine(w)
    assert order == ["shutdown"] and w.transport.closed


def test_tp1_closes_the_transport_before_the_engine() -> None:
    order: list[str] = []

    class Plain:
        def __init__(self, _stopped) -> None:
            pass

        def close(self) -> None:
            order.append("close")

    Worker._close_transport_and_engine(_worker(1, order, Plain))
    assert order == ["close", "shutdown"]
    bare = _worker(1, order, lambda _s: None)  # no transport (unified mode): the engine alone
    order.clear()
    Worker._close_transport_and_engine(bare)
    assert order == ["shutdown"]
