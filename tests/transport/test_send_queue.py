"""The send queue's signal path: a frame whose fence has already passed leaves on the caller's thread;
one whose fence has not waits for it on the sender thread, and frames keep their order either way."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from nvshmem_kv.sender import Fence, Outgoing, SendQueue
from nvshmem_kv.wire import Open, Signal, recv_exact, recv_header

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[SendQueue, socket.socket]]:
    a, b = socket.socketpair()
    b.settimeout(10)
    queue = SendQueue(a, "test")
    yield queue, b
    queue.close(2.0)
    b.close()


def _received(sock: socket.socket, n: int) -> list[object]:
    out = []
    for _ in range(n):
        msg, size = recv_header(sock)
        recv_exact(sock, size)
        out.append(msg)
    return out


class _Gate:
    """A fence that passes when the test says so, recording the thread that waited on it."""

    def __init__(self, passed: bool) -> None:
        self.passed = threading.Event()
        if passed:
            self.passed.set()
        self.waited_on: list[str] = []

    def fence(self) -> Fence:
        def wait() -> None:
            self.waited_on.append(threading.current_thread().name)
            assert self.passed.wait(10)

        return Fence(wait, self.passed.is_set)


def test_a_passed_fence_sends_on_the_callers_thread(pair: tuple[SendQueue, socket.socket]) -> None:
    queue, rx = pair
    gate = _Gate(passed=True)
    queue.put(Outgoing(Signal("r"), [b"token"], gate.fence()), 5.0)
    assert gate.waited_on == [threading.current_thread().name]
    assert _received(rx, 1) == [Signal("r")]


def test_a_pending_fence_waits_on_the_sender_thread_and_keeps_order(pair: tuple[SendQueue, socket.socket]) -> None:
    queue, rx = pair
    gate = _Gate(passed=False)
    queue.put(Outgoing(Signal("first"), [b""], gate.fence()), 5.0)  # returns at once: queued
    queue.put(Outgoing(Open("second")), 5.0)                        # behind it, though it has no fence
    rx.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rx.recv(1, socket.MSG_PEEK)
    rx.settimeout(10)
    gate.passed.set()
    assert _received(rx, 2) == [Signal("first"), Open("second")]
    assert gate.waited_on == ["kv-send-test"]
