"""The sender's side of what a receiver says back on the control channel: whether it accepted a room's
`Open` (the sender writes nothing of a room before that) and which rooms it cancelled.

One daemon thread per connection reads the receiver's frames; the engine thread waits on them with a
deadline. Both maps are bounded (oldest first out), like the sender's memory of opened rooms.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from nvshmem_kv.errors import ProtocolError, TransportError
from nvshmem_kv.wire import Cancel, Opened, recv_header

_POLL_MS = 1000  # the reader's wait for a frame, in slices (it also stops when the socket is closed)


class Answers:
    """What one receiver has answered this sender, read from ``sock`` by a daemon thread. When the
    connection ends (EOF, reset, a frame that is not an answer), ``on_lost(reason)`` is called once."""

    def __init__(self, sock: socket.socket, name: str, on_lost: Callable[[str], None], memory: int = 4096) -> None:
        self._sock = sock
        self._on_lost = on_lost
        self._memory = memory
        self._cond = threading.Condition()
        self._answers: OrderedDict[str, str] = OrderedDict()     # room -> "" (accepted) or why it was refused
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._stopping = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-answers-{name}", daemon=True)
        self._thread.start()

    def wait_accepted(self, room: str, timeout_s: float) -> None:
        """Return once the receiver has accepted ``room``'s Open (at once when it already has). Raises
        `TransportError` when it refused or cancelled the room, the connection is gone, or no answer
        came within ``timeout_s``: the caller must then write nothing of the room."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if room in self._cancelled:
                    raise TransportError(f"the decode side gave room {room!r} up")
                if self.error is not None:
                    raise TransportError(self.error)
                why = self._answers.get(room)
                if why is not None:
                    if why:
                        raise TransportError(f"the decode side refused room {room!r}: {why}")
                    return
                left = end - time.monotonic()
                if left <= 0:
                    raise TransportError(f"the decode side did not answer room {room!r}'s Open within "
                                         f"{timeout_s:.1f} s")
                self._cond.wait(left)

    def cancelled(self, room: str) -> bool:
        with self._cond:
            return room in self._cancelled

    def forget(self, room: str) -> None:
        """``room`` is over on this side (signalled or closed)."""
        with self._cond:
            self._answers.pop(room, None)
            self._cancelled.pop(room, None)

    def stop(self, timeout_s: float) -> None:
        """Join the reader (after the socket was shut down, which wakes it)."""
        with self._cond:
            self._stopping = True
        self._thread.join(timeout=max(0.1, timeout_s))

    def _record(self, msg: Opened | Cancel) -> None:
        with self._cond:
            if isinstance(msg, Opened):
                self._answers[msg.room] = "" if msg.ok else (msg.error or "refused")
                table: OrderedDict = self._answers
            else:
                self._cancelled[msg.room] = None
                table = self._cancelled
            if len(table) > self._memory:
                table.popitem(last=False)
            self._cond.notify_all()

    def _run(self) -> None:
        reason = "the decode side closed the connection"
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                poller = select.poll()
                poller.register(self._sock, select.POLLIN)
                if not poller.poll(_POLL_MS):
                    continue
                msg, payload_len = recv_header(self._sock, max_payload=0)
                if not isinstance(msg, (Opened, Cancel)):
                    raise ProtocolError(f"unexpected {type(msg).__name__} frame from the receiver")
                self._record(msg)
        except (OSError, ValueError, ProtocolError) as exc:  # EOF, reset, a closed socket, a bad frame
            if isinstance(exc, ProtocolError):
                reason = f"the decode side sent a bad frame: {exc}"
            elif not isinstance(exc, ConnectionError) and str(exc):
                reason = f"connection to peer lost: {type(exc).__name__}: {exc}"
        with self._cond:
            self.error = "the connection is closed" if self._stopping else reason
            stopping = self._stopping
            self._cond.notify_all()
        if not stopping:
            self._on_lost(reason)
