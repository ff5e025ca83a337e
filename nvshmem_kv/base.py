"""The `KVTransport` interface: one object per engine rank, used on both ends of a KV handoff.

Decode (receiver) side::

    kv = t.allocate_pool(desc, device)        # the engine's KV tensor (for shm: in shared memory)
    handle = t.register_pool(kv, desc)        # publish handle.to_json() to the prefill ranks
    t.expect(room, num_signals, deadline_s)   # BEFORE giving the room's page ids to prefill
    t.poll(room) / t.wait(room, timeout_s) / t.drain_completed()
    t.release(room)

Prefill (sender) side::

    peer = t.connect(handle, local_desc)      # once per decode rank; checks geometry
    t.write(peer, room, layer, kv, src_pages, dst_pages)   # per layer (or chunk), async
    t.signal(peer, room, payload)             # after the room's last write
    t.flush(peer, timeout_s)                  # optional: everything handed to the wire
    t.fence_compute()                         # before the next step may write pages the copies read

Invariants every backend keeps:
- writes and the signal of a room travel in order; the receiver sees the signal only after the
  room's bytes are visible in its pool;
- a room completes exactly once (DONE or FAILED), and never after its deadline has passed;
- signals for rooms that were not ``expect``-ed (or were released) are dropped and counted;
- a sender whose connection dies fails the rooms it had opened and not yet signalled;
- a sender writes a room only once the receiver accepted it (pending, the sender recorded as a
  writer; tcp's receiver instead drops data for rooms it does not hold), and stops when the
  receiver cancels it: a released room stays draining until every accepted writer signalled,
  closed or is gone (`quiet`).

NOTE: shm, cuda_ipc and nvshmem write one-sided, straight into the receiver's pages; only tcp
can refuse bytes for a room that is no longer expected. After a room FAILS on its deadline its
sender may still be writing, so keep those pages out of circulation until the sender is known to
be gone (its connection closed) or a grace period has passed.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from nvshmem_kv.descriptor import HeadSlice, PoolDescriptor, PoolHandle

if TYPE_CHECKING:
    import torch


class RoomState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RoomStatus:
    """State of one room on the receiver. ``payloads`` are the senders' signal payloads,
    ordered by sender TP rank; ``reason`` explains a failure."""

    state: RoomState
    payloads: tuple[bytes, ...] = ()
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.state is RoomState.DONE

    @property
    def failed(self) -> bool:
        return self.state is RoomState.FAILED

    @property
    def pending(self) -> bool:
        return self.state is RoomState.PENDING


PENDING = RoomStatus(RoomState.PENDING)


@dataclass(frozen=True)
class TransportStats:
    """Counters for metrics (``/metrics`` and the monitor)."""

    backend: str
    bytes_sent: int = 0
    bytes_received: int = 0
    writes: int = 0
    kernel_writes: int = 0      # of the writes, those that went through the page-copy kernel
    signals_sent: int = 0
    rooms_pending: int = 0
    rooms_done: int = 0
    rooms_failed: int = 0
    signals_dropped: int = 0
    writes_dropped: int = 0


class Peer:
    """A sender's open connection to one destination pool.

    ``slices`` are the head slices this rank writes there; empty means nothing to write (the
    rank should not be a writer for that destination, see `writers_for`).
    """

    def __init__(self, handle: PoolHandle, local: PoolDescriptor, slices: Sequence[HeadSlice]) -> None:
        self.handle = handle
        self.local = local
        self.slices: tuple[HeadSlice, ...] = tuple(slices)

    @property
    def remote(self) -> PoolDescriptor:
        return self.handle.descriptor

    def __repr__(self) -> str:
        d, h = self.remote, self.handle
        return f"Peer({h.backend} -> {h.host}:{h.port} tp{d.tp_rank}/{d.tp_size})"


class KVTransport(ABC):
    """One KV transfer endpoint per engine rank. See the module docstring for the call order."""

    name: ClassVar[str]

    # -- pool (decode side) ---------------------------------------------------------------
    @abstractmethod
    def allocate_pool(self, desc: PoolDescriptor, device: str | torch.device = "cpu") -> torch.Tensor:
        """Create a zeroed pool of ``desc.shape`` that this backend can export (shm: in shared memory)."""

    @abstractmethod
    def register_pool(self, kv: torch.Tensor, desc: PoolDescriptor) -> PoolHandle:
        """Export ``kv`` (from `allocate_pool`) and start accepting senders. Once per transport."""

    # -- sending (prefill side) -----------------------------------------------------------
    @abstractmethod
    def connect(self, handle: PoolHandle, local: PoolDescriptor, timeout_s: float = 10.0) -> Peer:
        """Open the pool behind ``handle`` for writing from a pool shaped like ``local``.

        Raises `TransportError` naming the field on a geometry mismatch, or when the peer does
        not answer within ``timeout_s``.
        """

    def open(self, peer: Peer, room: str) -> None:
        """Ask ``peer`` ahead to let this rank write ``room`` (the receiver records the writer and answers),
        so the first `write`, which waits for that answer, seldom waits. Sent once per room; optional."""
        return None

    @abstractmethod
    def write(self, peer: Peer, room: str, layer: int, src_kv: torch.Tensor,
              src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
        """Copy this rank's head slice of K and V of ``layer`` from ``src_pages`` of ``src_kv`` into
        ``dst_pages`` of the peer. May return before the bytes land; ordered per room. Writes nothing
        until the receiver accepted the room (`open`), and raises `TransportError` when it refused or
        cancelled it: the caller then abandons the room.

        Source pages may be reused as soon as this returns on CPU backends (shm copies in place,
        tcp stages); GPU backends copy on a transfer stream, ordered after the current stream, so
        keep the source pages until `flush` (or the room's completion on the receiver)."""

    @abstractmethod
    def signal(self, peer: Peer, room: str, payload: bytes = b"") -> None:
        """Complete this rank's part of ``room``; delivered after all its prior writes are visible."""

    def abandon(self, peer: Peer, room: str) -> None:
        """Stop writing ``room`` without signalling it (its request was aborted or failed): the receiver
        hears it after every earlier write to it has landed, and may then reuse its pages (`quiet`).
        Nothing is sent for a room never written to ``peer``; a dead peer raises `TransportError`."""
        return None

    def warm(self, kv: torch.Tensor, local: PoolDescriptor) -> float:
        """Before serving, on the sending side: compile (and tune) what the first write to a peer would,
        for a pool like ``kv``. Returns the seconds it took; 0 where there is nothing to compile."""
        return 0.0

    def fence_compute(self) -> None:
        """Make the current compute stream wait (on the device, not the host) for every copy this
        transport issued so far, so pages freed after the first token are overwritten only after
        their copies read them. Call before the next step writes KV. A no-op on CPU backends."""
        return None

    def wait_copies(self, timeout_s: float = 10.0) -> None:
        """Block until every device copy this transport issued has read its source pages, so freed pages
        may go to a writer no stream orders (a remote engine's one-sided copies into a room reserved
        here). Raises `TransportError` after ``timeout_s``. A no-op on CPU backends (they copy in place)."""
        return None

    @abstractmethod
    def flush(self, peer: Peer, timeout_s: float = 10.0) -> None:
        """Block until everything queued for ``peer`` has left (GPU: device copies finished too);
        raise `TransportError` on a dead peer or after ``timeout_s``."""

    @abstractmethod
    def disconnect(self, peer: Peer) -> None:
        """Close one peer; its unsignalled rooms fail on the receiver."""

    # -- receiving (decode side) ----------------------------------------------------------
    @abstractmethod
    def expect(self, room: str, num_signals: int, deadline_s: float) -> None:
        """Accept ``room``: it is DONE after ``num_signals`` signals, FAILED after ``deadline_s``."""

    @abstractmethod
    def extend(self, room: str, deadline_s: float) -> bool:
        """Push a PENDING room's deadline to ``deadline_s`` from now (never earlier): the sender is
        still coming, only late (its prompt queued). False when the room is not pending."""

    @abstractmethod
    def poll(self, room: str) -> RoomStatus:
        """Current state of an expected room (never blocks)."""

    @abstractmethod
    def wait(self, room: str, timeout_s: float) -> RoomStatus:
        """Block until the room is no longer PENDING, ``timeout_s`` passes, or its deadline does."""

    @abstractmethod
    def drain_completed(self) -> list[tuple[str, RoomStatus]]:
        """Rooms that became DONE or FAILED since the last call; each room appears exactly once."""

    @abstractmethod
    def release(self, room: str) -> None:
        """Forget a room; later signals for it are dropped."""

    def quiet(self, room: str) -> bool:
        """Whether a released room's pages are safe to reuse: every sender that began writing it has
        signalled it, abandoned it or is gone (one-sided writes land in the pool without asking).
        A room no sender began counts as quiet; so does every room on a backend that cannot tell."""
        return True

    @abstractmethod
    def on_room_finished(self, fn: Callable[[], None] | None) -> None:
        """Call ``fn()`` (from a transport thread, quickly, without blocking) each time a room leaves
        PENDING, so a loop that sleeps between `drain_completed` calls wakes at once. A deadline is
        noticed only when the rooms are polled; None removes the callback."""

    # -- lifecycle --------------------------------------------------------------------------
    @abstractmethod
    def stats(self) -> TransportStats:
        """Counters since creation."""

    @abstractmethod
    def close(self, timeout_s: float = 5.0) -> None:
        """Free everything: peers, listener and reader threads, shared memory, GPU mappings."""

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
