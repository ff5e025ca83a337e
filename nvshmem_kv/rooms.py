"""Receiver-side bookkeeping of rooms: expected signals, deadlines, writer connections.

Thread-safe: connection reader threads report opens, signals, closes and lost connections; the engine
thread expects, polls, waits and releases. Every state change goes PENDING -> DONE | FAILED once.

A sender writes a room only after its Open was accepted here (`on_open`: the room was pending, and the
sender is now one of its writers), so every writer of a room's pages is known. A released room whose
writers had not all signalled or closed it stays *draining* until they have (or their connections are
gone): one-sided writes may still be landing in its pages until then; `release` names those writers, whom
the transport tells to stop (`Cancel`) and close the room. Limits: a lost connection counts as a writer
that stopped (a live sender whose socket dropped may still have copies queued: the receiver's grace
covers them); a room whose writer never answers drains until the bound on draining rooms evicts it (the
decode side frees the pages at its own cap; `pdbox up` kills a frozen worker before that cap, see
`HUNG_KILL_S` in appliance/launcher.py).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nvshmem_kv.base import PENDING, RoomState, RoomStatus
from nvshmem_kv.errors import TransportError


@dataclass
class _Room:
    expected: int
    deadline: float
    writers: set[int] = field(default_factory=set)                    # connection ids that opened it
    signals: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # conn id -> (src rank, payload)
    closed: set[int] = field(default_factory=set)                     # writers that gave it up (Close)
    status: RoomStatus = PENDING

    def busy_writers(self) -> set[int]:
        """Writers that may still be writing: opened, neither signalled nor closed."""
        return self.writers - self.closed - self.signals.keys()


class RoomTable:
    """All rooms one receiver knows about; unknown rooms are never stored."""

    def __init__(self, max_rooms: int = 65536, clock: Callable[[], float] = time.monotonic) -> None:
        self._rooms: dict[str, _Room] = {}
        self._deadlines: list[tuple[float, str]] = []     # heap; stale entries skipped lazily
        self._completed: dict[str, None] = {}             # ordered set of finished, undrained rooms
        self._draining: dict[str, set[int]] = {}          # released rooms -> writers not done with them
        self._cond = threading.Condition()
        self._clock = clock
        self.max_rooms = max_rooms
        self.signals_dropped = 0
        self.rooms_done = 0
        self.rooms_failed = 0
        self.on_finish: Callable[[], None] | None = None   # called (under the lock) as a room finishes

    # -- engine side -------------------------------------------------------------------------
    def expect(self, room: str, num_signals: int, deadline_s: float) -> None:
        if num_signals < 1:
            raise ValueError(f"num_signals must be >= 1, got {num_signals}")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        with self._cond:
            if room in self._rooms:
                raise TransportError(f"room {room!r} is already expected; release it first")
            if len(self._rooms) >= self.max_rooms:
                raise TransportError(f"too many rooms ({self.max_rooms}); release finished rooms")
            deadline = self._clock() + deadline_s
            self._rooms[room] = _Room(num_signals, deadline)
            heapq.heappush(self._deadlines, (deadline, room))

    def extend(self, room: str, deadline_s: float) -> bool:
        """Move a PENDING room's deadline to ``deadline_s`` from now (never earlier); False when the
        room is unknown or no longer pending."""
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        with self._cond:
            self._expire()
            r = self._rooms.get(room)
            if r is None or not r.status.pending:
                return False
            deadline = self._clock() + deadline_s
            if deadline > r.deadline:
                r.deadline = deadline
                heapq.heappush(self._deadlines, (deadline, room))  # the old entry goes stale
                self._cond.notify_all()
            return True

    def poll(self, room: str) -> RoomStatus:
        with self._cond:
            self._expire()
            return self._get(room).status

    def wait(self, room: str, timeout_s: float) -> RoomStatus:
        end = self._clock() + max(0.0, timeout_s)
        with self._cond:
            while True:
                self._expire()
                r = self._get(room)
                if not r.status.pending:
                    return r.status
                now = self._clock()
                if now >= r.deadline:
                    self._fail_expired(room, r)
                    return r.status
                if now >= end:
                    return r.status
                self._cond.wait(min(end, r.deadline) - now)

    def drain_completed(self) -> list[tuple[str, RoomStatus]]:
        with self._cond:
            self._expire()
            out = [(name, self._rooms[name].status) for name in self._completed]
            self._completed.clear()
            return out

    def release(self, room: str) -> set[int]:
        """Forget ``room``; returns its writers still busy with it (opened, neither signalled nor closed):
        the room drains until each is done, and they should be told to stop."""
        with self._cond:
            r = self._rooms.pop(room, None)
            self._completed.pop(room, None)
            busy = r.busy_writers() if r is not None else set()
            if busy:
                self._drain(room, busy)
            if len(self._deadlines) > 2 * len(self._rooms) + 1024:
                self._deadlines = [(d, n) for d, n in self._deadlines if n in self._rooms]
                heapq.heapify(self._deadlines)
            return busy

    def quiet(self, room: str) -> bool:
        """False while a released room still has writers that neither signalled nor closed it."""
        with self._cond:
            return room not in self._draining

    def draining_count(self) -> int:
        with self._cond:
            return len(self._draining)

    def pending_count(self) -> int:
        with self._cond:
            return sum(1 for r in self._rooms.values() if r.status.pending)

    # -- connection side ---------------------------------------------------------------------
    def is_live(self, room: str) -> bool:
        with self._cond:
            r = self._rooms.get(room)
            return r is not None and r.status.pending

    def on_open(self, room: str, conn_id: int) -> str:
        """A sender asks to write ``room``: "" when it may (the room is pending; it is recorded as a writer,
        so the room's pages stay out of circulation until it is done), else why not (unknown, released,
        finished): it then writes nothing."""
        with self._cond:
            self._expire()
            r = self._rooms.get(room)
            if r is None:
                return "the room is unknown here or was given up"
            if not r.status.pending:
                return f"the room already {'completed' if r.status.done else 'failed: ' + r.status.reason}"
            r.writers.add(conn_id)
            return ""

    def on_signal(self, room: str, conn_id: int, src_rank: int, payload: bytes) -> bool:
        """Record a signal; returns False (and counts it) when it was dropped."""
        with self._cond:
            self._expire()
            self._writer_done(room, conn_id)
            r = self._rooms.get(room)
            if r is not None and not r.status.pending and conn_id in r.writers:
                r.closed.add(conn_id)  # a late signal: dropped, but this writer's writes have landed
            if r is None or not r.status.pending or conn_id in r.signals:
                self.signals_dropped += 1
                return False
            r.signals[conn_id] = (src_rank, payload)
            if len(r.signals) >= r.expected:
                payloads = tuple(p for _, p in sorted(r.signals.values(), key=lambda s: s[0]))
                self._finish(room, r, RoomStatus(RoomState.DONE, payloads))
            return True

    def on_close(self, room: str, conn_id: int) -> None:
        """A writer gave ``room`` up, its writes landed: the room fails now (its signal will not come)."""
        with self._cond:
            self._writer_done(room, conn_id)
            r = self._rooms.get(room)
            if r is None or conn_id not in r.writers:
                return
            r.closed.add(conn_id)
            if r.status.pending:
                self._finish(room, r, RoomStatus(RoomState.FAILED, reason="the sender gave the room up"))

    def on_conn_lost(self, conn_id: int, reason: str) -> None:
        """Fail the rooms this connection opened and had not signalled yet; it writes no more."""
        with self._cond:
            for name, r in self._rooms.items():
                if r.status.pending and conn_id in r.writers and conn_id not in r.signals:
                    self._finish(name, r, RoomStatus(RoomState.FAILED, reason=reason))
                if conn_id in r.writers:
                    r.closed.add(conn_id)
            for name in [n for n, busy in self._draining.items() if conn_id in busy]:
                self._writer_done(name, conn_id)

    def fail_all(self, reason: str) -> None:
        with self._cond:
            for name, r in self._rooms.items():
                if r.status.pending:
                    self._finish(name, r, RoomStatus(RoomState.FAILED, reason=reason))

    # -- internals (lock held) ---------------------------------------------------------------
    def _drain(self, room: str, writers: set[int]) -> None:
        self._draining.setdefault(room, set()).update(writers)
        if len(self._draining) > self.max_rooms:  # bounded: the oldest is taken as quiet
            del self._draining[next(iter(self._draining))]

    def _writer_done(self, room: str, conn_id: int) -> None:
        busy = self._draining.get(room)
        if busy is not None:
            busy.discard(conn_id)
            if not busy:
                del self._draining[room]

    def _get(self, room: str) -> _Room:
        r = self._rooms.get(room)
        if r is None:
            raise TransportError(f"room {room!r} was never expected (or was released)")
        return r

    def _finish(self, name: str, r: _Room, status: RoomStatus) -> None:
        # NOTE: the only place a room leaves PENDING; callers checked r.status.pending.
        r.status = status
        if status.done:
            self.rooms_done += 1
        else:
            self.rooms_failed += 1
        self._completed[name] = None
        self._cond.notify_all()
        if self.on_finish is not None:
            self.on_finish()

    def _expire(self) -> None:
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, name = heapq.heappop(self._deadlines)
            r = self._rooms.get(name)
            if r is not None and r.deadline == deadline:
                self._fail_expired(name, r)

    def _fail_expired(self, name: str, r: _Room) -> None:
        if r.status.pending:
            reason = f"deadline passed with {len(r.signals)}/{r.expected} signals"
            self._finish(name, r, RoomStatus(RoomState.FAILED, reason=reason))
