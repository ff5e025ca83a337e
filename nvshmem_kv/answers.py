"""The sender's side of what a receiver says back on the control channel: whether it accepted a room's
`Open` (the sender writes nothing of a room before that) and which rooms it cancelled.

One daemon thread per connection reads the receiver's frames; the engine thread waits on them with a
deadline. Each room this sender asked for has one state, made when its Open is sent (`asked`) and
dropped when the sender is done with the room (`forget`): an answer for a room not asked for (a late
Cancel after the sender's own Close) is ignored, a Cancel is final, and a room whose state was dropped
(the bounded map's oldest) reads as unanswered, never as accepted.
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

_POLL_MS = 1000  # the reader's wait for a frame, in slices (it also stops when the socket is shut down)
_ASKED, _ACCEPTED, _CANCELLED = "asked", "accepted", "cancelled"  # else: the receiver's refusal


class Answers:
    """What one receiver has answered this sender, read from ``sock`` by a daemon thread. When the
    connection ends (EOF, reset, a frame that is not an answer) or an answer does not come in time,
    ``on_lost(reason)`` is called once (it fails the connection's send queue) before any waiter sees it."""

    def __init__(self, sock: socket.socket, name: str, on_lost: Callable[[str], None], memory: int = 4096) -> None:
        self._sock = sock
        self._on_lost = on_lost
        self._memory = memory
        self._cond = threading.Condition()
        self._rooms: OrderedDict[str, str] = OrderedDict()  # room -> _ASKED / _ACCEPTED / _CANCELLED / refusal
        self._stopping = False
        self._lost = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-answers-{name}", daemon=True)
        self._thread.start()

    def asked(self, room: str) -> None:
        """``room``'s Open is going out: its answer will be recorded."""
        with self._cond:
            self._rooms[room] = _ASKED
            if len(self._rooms) > self._memory:
                self._rooms.popitem(last=False)

    def wait_accepted(self, room: str, timeout_s: float) -> None:
        """Return once the receiver has accepted ``room``'s Open (at once when it already has). Raises
        `TransportError` when it refused or cancelled the room, the connection is gone, the room was never
        asked for (or so long ago its state was dropped), or no answer came within ``timeout_s``; the
        caller must then write nothing of the room. A receiver that does not answer in time is taken as
        gone: the connection is failed (its rooms fail there), so the next room reconnects, not waits."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                state = self._rooms.get(room)
                if state == _CANCELLED:
                    raise TransportError(f"the decode side gave room {room!r} up")
                if self.error is not None:
                    raise TransportError(self.error)
                if state == _ACCEPTED:
                    return
                if state is None:
                    raise TransportError(f"room {room!r} has no Open waiting for its answer")
                if state != _ASKED:
                    raise TransportError(f"the decode side refused room {room!r}: {state}")
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        reason = f"the decode side did not answer room {room!r}'s Open within {timeout_s:.1f} s"
        self._lose(reason)
        raise TransportError(reason)

    def cancelled(self, room: str) -> bool:
        with self._cond:
            return self._rooms.get(room) == _CANCELLED

    def forget(self, room: str) -> None:
        """``room`` is over on this side (signalled or closed): later answers for it are ignored."""
        with self._cond:
            self._rooms.pop(room, None)

    def stop(self, timeout_s: float) -> None:
        """Join the reader (after the socket was shut down, which wakes it at once)."""
        with self._cond:
            self._stopping = True
        self._thread.join(timeout=max(0.1, timeout_s))

    def _record(self, msg: Opened | Cancel) -> None:
        with self._cond:
            state = self._rooms.get(msg.room)
            if state is None or state == _CANCELLED:  # not asked for (or forgotten), or already final
                return
            if isinstance(msg, Cancel):
                self._rooms[msg.room] = _CANCELLED
            elif state == _ASKED:
                self._rooms[msg.room] = _ACCEPTED if msg.ok else (msg.error or "refused")
            self._cond.notify_all()

    def _lose(self, reason: str) -> None:
        """Fail the connection once: ``on_lost`` first (the send queue fails, so liveness checks see it
        before any waiter does), then every waiter wakes with ``reason``."""
        with self._cond:
            first, stopping = not self._lost, self._stopping
            self._lost = True
        if first and not stopping:
            self._on_lost(reason)
        with self._cond:
            if self.error is None:
                self.error = "the connection is closed" if stopping else reason
            self._cond.notify_all()

    def _run(self) -> None:
        reason = "the decode side closed the connection"
        try:
            while True:
                with self._cond:
                    if self._stopping or self._lost:
                        break
                poller = select.poll()
                poller.register(self._sock, select.POLLIN)
                if not poller.poll(_POLL_MS):
                    continue
                msg, payload_len = recv_header(self._sock, max_payload=0)
                if not isinstance(msg, (Opened, Cancel)):
                    raise ProtocolError(f"unexpected {type(msg).__name__} frame from the receiver")
                self._record(msg)
        except ProtocolError as exc:
            reason = f"the decode side sent a bad frame: {exc}"
        except ConnectionError:
            pass
        except Exception as exc:  # reset, a closed socket, anything else: the connection is over either way
            reason = f"connection to peer lost: {type(exc).__name__}: {exc}"
        self._lose(reason)
