"""One background thread per peer that sends frames in FIFO order (hence ordered per room)."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nvshmem_kv.errors import TransportError
from nvshmem_kv.wire import Message, send_frame

_INLINE_BYTES = 64 << 10


@dataclass(frozen=True)
class Fence:
    """What a frame must wait for before it leaves (e.g. a CUDA event after earlier GPU writes):
    ``wait`` blocks until then; ``done`` says, without blocking, whether it has already passed."""

    wait: Callable[[], None]
    done: Callable[[], bool]


@dataclass
class Outgoing:
    """A frame to send. ``before`` is waited for on the sender thread first, unless it has passed
    when the frame is queued (see `SendQueue.put`)."""

    msg: Message
    payload: Sequence[memoryview | bytes] = ()
    before: Fence | None = None
    keepalive: object = None          # holds staging buffers alive until sent


class SendQueue:
    """Bounded FIFO drained by a daemon thread; the first send error fails the queue for good."""

    def __init__(self, sock: socket.socket, name: str, max_items: int = 64) -> None:
        self._sock = sock
        self._items: deque[Outgoing] = deque()
        self._cond = threading.Condition()
        self._max_items = max_items
        self._busy = False
        self._closing = False
        self.error: str | None = None
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{name}", daemon=True)
        self._thread.start()

    def put(self, item: Outgoing, timeout_s: float) -> None:
        """Queue ``item``; a small frame with nothing ahead of it and nothing left to wait for is sent
        on the caller's thread (same order, one thread handoff less on the signal path: on a GPU the
        copies have usually finished by the time prefill has sampled the first token)."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._raise_if_failed()
                if not self._items and not self._busy and _small(item) and (item.before is None
                                                                            or item.before.done()):
                    self._busy = True
                    break
                if len(self._items) < self._max_items:
                    self._items.append(item)
                    self._cond.notify_all()
                    return
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"send queue full for {timeout_s:.1f}s: the peer is not reading")
                self._cond.wait(remaining)
        if not self._send(item):
            raise TransportError(self.error or "peer connection is closed")

    def flush(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._items or self._busy:
                self._raise_if_failed()
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"flush timed out after {timeout_s:.1f}s")
                self._cond.wait(remaining)
            self._raise_if_failed()

    def fail(self, reason: str) -> None:
        """The connection is known gone (its reader saw it end, or an answer did not come): fail the queue
        and drop what it holds. The socket is shut down, not closed: another thread may be sending on
        it, and a closed descriptor's number may be reused; `close` closes it."""
        with self._cond:
            if self.error is None and not self._closing:
                self.error = reason
            self._items.clear()
            self._cond.notify_all()
        _shutdown(self._sock, close=False)

    def close(self, timeout_s: float) -> None:
        """Send what is queued (up to ``timeout_s``), then close the socket and join the thread."""
        try:
            self.flush(timeout_s)
        except TransportError:
            pass
        with self._cond:
            self._closing = True
            self._items.clear()
            self._cond.notify_all()
        _shutdown(self._sock)
        self._thread.join(timeout=max(0.1, timeout_s))

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise TransportError(self.error)
        if self._closing:
            raise TransportError("peer connection is closed")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                item = self._items.popleft()
                self._busy = True
                self._cond.notify_all()
            if not self._send(item):
                return

    def _send(self, item: Outgoing) -> bool:
        """Send one item (``_busy`` is set by the caller); False once the queue has failed."""
        try:
            if item.before is not None:
                item.before.wait()
            sent = send_frame(self._sock, item.msg, item.payload)
        except Exception as exc:  # any failure ends this peer
            with self._cond:
                self.error = f"connection to peer lost: {type(exc).__name__}: {exc}"
                self._items.clear()
                self._busy = False
                self._cond.notify_all()
            _shutdown(self._sock)
            return False
        with self._cond:
            self.bytes_sent += sent
            self._busy = False
            self._cond.notify_all()
        return True


def _small(item: Outgoing) -> bool:
    return sum(memoryview(p).nbytes for p in item.payload) <= _INLINE_BYTES


def _shutdown(sock: socket.socket, close: bool = True) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    if close:
        sock.close()
