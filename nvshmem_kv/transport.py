"""`ChannelTransport`: what every backend shares — the control channel, room bookkeeping,
per-peer ordered send queues, argument checks and counters. A backend only says how pages move
(`_write_runs`, `_receive_write`) and how a pool is exported and opened.

Threading: the sending methods of one transport (connect/open/write/signal/flush) are called from one
thread at a time (the engine's); the receiving methods are thread-safe.

A sender writes nothing of a room before the receiver accepted its Open (`open` sends it ahead, `write`
waits for the answer; tcp, whose receiver drops data for rooms it does not hold, does not wait), and
stops writing a room the receiver cancelled (released while it was busy with it), so one-sided copies do
not land in pages the receiver gave to another request; the limits (a dropped connection's queued
copies, a sender stalled past the receiver's cap) are in `nvshmem_kv.rooms`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from nvshmem_kv.answers import Answers
from nvshmem_kv.base import KVTransport, Peer, RoomStatus, TransportStats
from nvshmem_kv.channel import ConnInfo, ControlServer, open_channel
from nvshmem_kv.copy_order import CopyOrder
from nvshmem_kv.descriptor import HeadSlice, PoolDescriptor, PoolHandle, plan_head_slices
from nvshmem_kv.errors import ProtocolError, TransportError
from nvshmem_kv.page_copy import KernelPlan, kernel_copy, make_plan, row_slice, warm_kernel_copy
from nvshmem_kv.pages import PageRun, as_page_tuple, check_layer, check_pages, check_pool, coalesce_runs
from nvshmem_kv.rooms import RoomTable
from nvshmem_kv.sender import Fence, Outgoing, SendQueue
from nvshmem_kv.wire import (
    MAX_SIGNAL_PAYLOAD,
    PROTOCOL_VERSION,
    Cancel,
    Close,
    Hello,
    Message,
    Open,
    Opened,
    Signal,
    Write,
    discard,
    recv_exact,
)

_OPENED_MEMORY = 4096        # rooms per peer whose Open was sent (bounded: aborted rooms age out)
# rooms per peer whose coalesced runs (and kernel plans) are kept across layers: more than one prefill step
# holds (its prompts, at most the engine's max_running), else a step's rooms evict each other layer by layer
# and every write rebuilds its plan; entries go when their room is signalled or abandoned
_RUN_CACHE = 512

log = logging.getLogger(__name__)


def safe_run_id(run_id: str) -> str:
    """A run id usable inside shm names and thread names; random when none is given."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "", run_id)[:24]
    return cleaned or secrets.token_hex(4)


class ChannelPeer(Peer):
    """A `Peer` plus the sender-side state every channel backend needs."""

    def __init__(self, handle: PoolHandle, local: PoolDescriptor, slices: Sequence[HeadSlice]) -> None:
        super().__init__(handle, local, slices)
        self.queue: SendQueue | None = None
        self.answers: Answers | None = None               # what the receiver says back (Opened, Cancel)
        self.remote_pool: torch.Tensor | None = None      # shm / cuda_ipc: the peer's pool, mapped here
        self.remote_base = 0                              # its address here, for the page-copy kernel (0: none)
        self.closer: Callable[[], None] | None = None     # releases what `_open_peer` mapped
        self.opened: OrderedDict[str, None] = OrderedDict()
        self.runs: OrderedDict[str, tuple[tuple[int, ...], tuple[int, ...], list[PageRun]]] = OrderedDict()
        self.kernel_plans: OrderedDict[str, KernelPlan] = OrderedDict()

    def send(self, item: Outgoing, timeout_s: float) -> None:
        if self.queue is None:
            raise TransportError(f"{self!r} is closed")
        self.queue.put(item, timeout_s)


class ChannelTransport(KVTransport):
    """Base of the shm, tcp, cuda_ipc, nvshmem and fake backends."""

    name: ClassVar[str] = "channel"
    accepts_data_frames: ClassVar[bool] = False

    def __init__(self, *, run_id: str = "", host: str = "127.0.0.1", advertise_host: str | None = None,
                 max_rooms: int = 65536, send_timeout_s: float = 30.0, max_queue: int = 64,
                 answer_timeout_s: float = 10.0) -> None:
        self.run_id = safe_run_id(run_id)
        self._answer_timeout_s = answer_timeout_s
        self._host = host
        self._advertise = advertise_host or (socket.getfqdn() if host in ("", "0.0.0.0", "::") else host)
        self._send_timeout_s = send_timeout_s
        self._max_queue = max_queue
        self._rooms = RoomTable(max_rooms)
        self._token = secrets.token_urlsafe(18)
        self._server: ControlServer | None = None
        self._pool: torch.Tensor | None = None
        self._desc: PoolDescriptor | None = None
        self._peers: list[ChannelPeer] = []
        self._lock = threading.Lock()
        self._counts = {"bytes_sent": 0, "bytes_received": 0, "writes": 0, "kernel_writes": 0, "signals_sent": 0,
                        "writes_dropped": 0}
        self._closed = False
        self._order: CopyOrder | None = None     # GPU backends: their copy stream against compute
        self._warm_pool: tuple[torch.Tensor, PoolDescriptor] | None = None  # what `warm` compiled the copy on
        self._warm_slices: set[Any] = set()      # the head slices (kernels.RowSlice) compiled since

    # -- backend hooks ----------------------------------------------------------------------
    def _export_pool(self, kv: torch.Tensor, desc: PoolDescriptor) -> dict[str, Any]:
        """Handle fields that let a sender open ``kv`` (shm name, IPC handle …)."""
        return {}

    def _open_peer(self, peer: ChannelPeer) -> None:
        """Map the peer's pool before the handshake (sets ``remote_pool`` / ``closer``)."""

    def _write_runs(self, peer: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor,
                    runs: list[PageRun]) -> int:
        """Move K and V of ``layer`` for ``runs`` and every head slice; return the bytes moved."""
        raise NotImplementedError

    def _uses_kernel(self, peer: ChannelPeer) -> bool:
        """Writes to ``peer`` go through the page-copy kernel at ``peer.remote_base`` (`_kernel_write`),
        not `_write_runs`."""
        return False

    def _copy_context(self) -> Any:
        """GPU backends: their copy stream, entered around kernel copies and their compiles."""
        return contextlib.nullcontext()

    def _signal_message(self, peer: ChannelPeer, room: str) -> Signal:
        return Signal(room)

    def _signal_fence(self, peer: ChannelPeer) -> Fence | None:
        """What a Signal waits for before it leaves: earlier writes landing (GPU backends)."""
        return None

    def _sync_device(self, peer: ChannelPeer) -> None:
        """GPU backends: wait for this peer's queued device copies (source pages reusable after)."""

    def _verify_signal(self, conn: ConnInfo, msg: Signal) -> None:
        """Receiver: last check before a signal counts (nvshmem compares the signal word)."""

    def _receive_write(self, conn: ConnInfo, msg: Write, payload_len: int, sock: socket.socket) -> int:
        raise ProtocolError(f"backend {self.name} does not carry page data on the control channel")

    def _release_pool(self) -> None:
        """Free what `allocate_pool` / `register_pool` created (shm unlink …)."""

    def _compute_stream(self) -> Any:
        """GPU backends: the engine's compute stream on this rank's device (see `CopyOrder`)."""
        raise NotImplementedError

    # -- pool (decode side) ---------------------------------------------------------------
    def allocate_pool(self, desc: PoolDescriptor, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(desc.shape, dtype=desc.torch_dtype(), device=device)

    def register_pool(self, kv: torch.Tensor, desc: PoolDescriptor) -> PoolHandle:
        self._check_open()
        if self._desc is not None:
            raise TransportError("register_pool was already called on this transport (one pool per rank)")
        check_pool(kv, desc)
        fields = self._export_pool(kv, desc)
        self._server = ControlServer(self._host, self, f"{self.name}-{self.run_id}-tp{desc.tp_rank}")
        self._pool, self._desc = kv, desc
        return PoolHandle(backend=self.name, descriptor=desc, host=self._advertise, port=self._server.port,
                          token=self._token, run_id=self.run_id, **fields)

    # -- sending (prefill side) -----------------------------------------------------------
    def connect(self, handle: PoolHandle, local: PoolDescriptor, timeout_s: float = 10.0) -> Peer:
        self._check_open()
        if handle.backend != self.name:
            raise TransportError(f"handle is for backend {handle.backend!r}, this transport is {self.name!r}")
        local.check_compatible(handle.descriptor)
        peer = ChannelPeer(handle, local, plan_head_slices(local, handle.descriptor))
        # NOTE: the first connect often happens inside an engine step (torch.inference_mode); a mapping
        # made there is an inference tensor, and every later write from outside that mode (a decode
        # move between steps) would fail with "Inplace update to inference tensor outside InferenceMode".
        with torch.inference_mode(False):
            self._open_peer(peer)
            self._warm_slice(peer)
        try:
            hello = Hello(PROTOCOL_VERSION, handle.token, self.name, local)
            sock = open_channel(handle.host, handle.port, hello, timeout_s, self._send_timeout_s)
        except BaseException:
            self._unmap(peer)
            raise
        peer.queue = SendQueue(sock, f"{self.name}-{self.run_id}", self._max_queue)
        peer.answers = Answers(sock, f"{self.name}-{self.run_id}", peer.queue.fail, _OPENED_MEMORY)
        with self._lock:
            self._peers.append(peer)
        return peer

    def open(self, peer: Peer, room: str) -> None:
        p = self._peer(peer)
        if room not in p.opened:
            if p.answers is not None:
                p.answers.asked(room)
            p.send(Outgoing(Open(room)), self._send_timeout_s)
            p.opened[room] = None
            if len(p.opened) > _OPENED_MEMORY:
                p.opened.popitem(last=False)

    def write(self, peer: Peer, room: str, layer: int, src_kv: torch.Tensor,
              src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
        p = self._peer(peer)
        check_layer(layer, p.local)
        check_pool(src_kv, p.local, "src_kv")
        runs = self._runs(p, room, src_pages, dst_pages)
        if not runs or not p.slices:
            return
        self.open(p, room)
        # NOTE: tcp's receiver applies a Write only to a pending room, in order behind its Open: no wait
        # (its Open may queue behind earlier rooms' data frames); a Cancel still stops the writes
        if p.answers is not None and not self.accepts_data_frames:
            p.answers.wait_accepted(room, self._answer_timeout_s)
        elif p.answers is not None and p.answers.cancelled(room):
            raise TransportError(f"the decode side gave room {room!r} up")
        if self._order is not None:
            self._order.before_copy(self._compute_stream())
        kernel = self._uses_kernel(p)
        if kernel:
            with self._copy_context():
                moved = self._kernel_write(p, room, layer, src_kv)
        else:
            moved = self._write_runs(p, room, layer, src_kv, runs)
        if self._order is not None:
            self._order.after_copy()
        with self._lock:
            self._counts["writes"] += 1
            self._counts["kernel_writes"] += kernel
            self._counts["bytes_sent"] += moved

    def signal(self, peer: Peer, room: str, payload: bytes = b"") -> None:
        p = self._peer(peer)
        if len(payload) > MAX_SIGNAL_PAYLOAD:
            raise TransportError(f"signal payload is {len(payload)} B; the limit is {MAX_SIGNAL_PAYLOAD} B")
        p.send(Outgoing(self._signal_message(p, room), [bytes(payload)], self._signal_fence(p)), self._send_timeout_s)
        self._forget(p, room)
        with self._lock:
            self._counts["signals_sent"] += 1

    def abandon(self, peer: Peer, room: str) -> None:
        p = self._peer(peer)
        opened = room in p.opened
        self._forget(p, room)
        if not opened:  # nothing of it went to this peer (or so long ago its Open aged out)
            return
        p.send(Outgoing(Close(room), (), self._signal_fence(p)), self._send_timeout_s)

    def fence_compute(self) -> None:
        if self._order is not None:
            self._order.fence(self._compute_stream())

    def wait_copies(self, timeout_s: float = 10.0) -> None:
        if self._order is None:
            return
        try:
            self._order.wait(timeout_s)
        except TimeoutError as exc:
            raise TransportError(str(exc)) from None

    def flush(self, peer: Peer, timeout_s: float = 10.0) -> None:
        p = self._peer(peer)
        if p.queue is None:
            raise TransportError(f"{p!r} is closed")
        p.queue.flush(timeout_s)
        self._sync_device(p)

    def disconnect(self, peer: Peer, timeout_s: float = 2.0) -> None:
        p = self._peer(peer, alive=False)
        with self._lock:
            if p in self._peers:
                self._peers.remove(p)
        end = time.monotonic() + timeout_s
        if p.queue is not None:
            p.queue.close(timeout_s)
            p.queue = None
        if p.answers is not None:  # the socket is shut down: the reader ends at once
            p.answers.stop(max(0.1, end - time.monotonic()))
        self._unmap(p)

    # -- receiving (decode side) ----------------------------------------------------------
    def expect(self, room: str, num_signals: int, deadline_s: float) -> None:
        self._check_open()
        self._rooms.expect(room, num_signals, deadline_s)

    def extend(self, room: str, deadline_s: float) -> bool:
        self._check_open()
        return self._rooms.extend(room, deadline_s)

    def poll(self, room: str) -> RoomStatus:
        return self._rooms.poll(room)

    def wait(self, room: str, timeout_s: float) -> RoomStatus:
        return self._rooms.wait(room, timeout_s)

    def drain_completed(self) -> list[tuple[str, RoomStatus]]:
        return self._rooms.drain_completed()

    def on_room_finished(self, fn: Callable[[], None] | None) -> None:
        self._rooms.on_finish = fn

    def release(self, room: str) -> None:
        busy = self._rooms.release(room)
        server = self._server
        for conn_id in busy if server is not None else ():  # stop writing; Close it behind what you wrote
            server.send(conn_id, Cancel(room))

    def quiet(self, room: str) -> bool:
        return self._rooms.quiet(room)

    # -- control-channel handler (reader threads) -----------------------------------------
    def accept_hello(self, hello: Hello) -> str | None:
        if hello.version != PROTOCOL_VERSION:
            return f"protocol version {hello.version} != {PROTOCOL_VERSION}"
        if not hmac.compare_digest(hello.token, self._token):
            return "bad token: the PoolHandle is stale or belongs to another pool"
        if hello.backend != self.name:
            return f"backend mismatch: sender uses {hello.backend!r}, receiver {self.name!r}"
        if self._desc is None:
            return "receiver has no registered pool"
        try:
            self._desc.check_compatible(hello.src)
        except TransportError as exc:
            return str(exc)
        return None

    def on_message(self, conn: ConnInfo, msg: Message, payload_len: int, sock: socket.socket) -> None:
        if isinstance(msg, Write):
            if not self.accepts_data_frames:
                raise ProtocolError(f"backend {self.name} does not carry page data on the control channel")
            if self._rooms.is_live(msg.room):
                got = self._receive_write(conn, msg, payload_len, sock)
                with self._lock:
                    self._counts["bytes_received"] += got
            else:
                discard(sock, payload_len)
                with self._lock:
                    self._counts["writes_dropped"] += 1
            return
        if isinstance(msg, Signal):
            if payload_len > MAX_SIGNAL_PAYLOAD:
                raise ProtocolError(f"signal payload of {payload_len} B is over the limit")
            payload = recv_exact(sock, payload_len)
            if self._rooms.is_live(msg.room):
                self._verify_signal(conn, msg)
            self._rooms.on_signal(msg.room, conn.id, conn.src.tp_rank, payload)
            return
        if payload_len:
            raise ProtocolError(f"{type(msg).__name__} frames carry no payload")
        if isinstance(msg, Open):
            why = self._rooms.on_open(msg.room, conn.id)
            server = self._server
            if server is not None:
                server.send(conn.id, Opened(msg.room, ok=not why, error=why))
            return
        if isinstance(msg, Close):
            self._rooms.on_close(msg.room, conn.id)
            return
        raise ProtocolError(f"unexpected {type(msg).__name__} frame")

    def on_closed(self, conn: ConnInfo, reason: str) -> None:
        self._rooms.on_conn_lost(conn.id, reason)

    # -- lifecycle ------------------------------------------------------------------------
    def stats(self) -> TransportStats:
        with self._lock:
            c = dict(self._counts)
        r = self._rooms
        return TransportStats(backend=self.name, rooms_pending=r.pending_count(), rooms_done=r.rooms_done,
                              rooms_failed=r.rooms_failed, signals_dropped=r.signals_dropped, **c)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        end = time.monotonic() + timeout_s
        with self._lock:
            peers = list(self._peers)
        for p in peers:
            self.disconnect(p, max(0.1, min(2.0, end - time.monotonic())))
        if self._server is not None:
            self._server.close(max(0.1, end - time.monotonic()))
            self._server = None
        self._rooms.fail_all("transport closed")
        self._pool = None
        self._release_pool()

    # -- helpers --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"{self.name} transport is closed")

    def _peer(self, peer: Peer, alive: bool = True) -> ChannelPeer:
        if not isinstance(peer, ChannelPeer) or peer.handle.backend != self.name:
            raise TransportError(f"{peer!r} was not opened by this {self.name} transport")
        if alive and peer.queue is not None and peer.queue.error is not None:
            raise TransportError(f"{peer!r}: {peer.queue.error}")
        return peer

    def _unmap(self, peer: ChannelPeer) -> None:
        peer.remote_pool = None
        peer.remote_base = 0
        if peer.closer is not None:
            closer, peer.closer = peer.closer, None
            closer()

    def _runs(self, p: ChannelPeer, room: str, src_pages: Sequence[int],
              dst_pages: Sequence[int]) -> list[PageRun]:
        src = tuple(src_pages) if isinstance(src_pages, (list, tuple)) else as_page_tuple(src_pages)
        dst = tuple(dst_pages) if isinstance(dst_pages, (list, tuple)) else as_page_tuple(dst_pages)
        cached = p.runs.get(room)
        if cached is not None and cached[0] == src and cached[1] == dst:
            return cached[2]
        src, dst = as_page_tuple(src), as_page_tuple(dst)
        check_pages(src, p.local.num_pages, "src_pages")
        check_pages(dst, p.remote.num_pages, "dst_pages")
        runs = coalesce_runs(src, dst)
        p.runs[room] = (src, dst, runs)
        if len(p.runs) > _RUN_CACHE:
            p.runs.popitem(last=False)
        return runs

    def _kernel_write(self, p: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor) -> int:
        """One `kernels.copy_pages` launch for the layer, whole pages or this rank's heads of them."""
        if not p.remote_base:
            raise TransportError(f"{p!r} is closed")
        if len(p.slices) != 1:
            raise TransportError(f"the page-copy kernel moves one head slice a peer, {p!r} has {len(p.slices)}")
        src, dst, runs = p.runs[room]
        plan = p.kernel_plans.get(room)
        if plan is None or plan.src_pages != src or plan.dst_pages != dst:
            plan = make_plan(p.local, p.remote, p.remote_base, src, dst, src_kv.device, runs, p.slices[0])
            p.kernel_plans[room] = plan
            if len(p.kernel_plans) > _RUN_CACHE:
                p.kernel_plans.popitem(last=False)
        return kernel_copy(src_kv, p.local, p.remote, plan, layer)

    def _warm_kernel(self, kv: torch.Tensor, local: PoolDescriptor) -> float:
        """`warm` where writes go through the page-copy kernel (the seconds it took): whole pages, and for a
        rank of a TP group its heads' slice of a pool that holds every head (a decode engine's: decode runs
        at TP 1), so a serving handoff compiles and tunes nothing. Any other peer's slice compiles at its
        connect (`_warm_slice`), on this pool."""
        t0 = time.perf_counter()
        with self._copy_context():
            warm_kernel_copy(kv, local)
        self._warm_pool = (kv, local)
        if local.tp_size > 1:
            whole = dataclasses.replace(local, kv_heads_local=local.total_kv_heads, tp_rank=0, tp_size=1)
            self._warm_rows(local, whole, plan_head_slices(local, whole))
        return time.perf_counter() - t0

    def _warm_slice(self, p: ChannelPeer) -> None:
        """Compile the copy of ``p``'s head slice at connect, out of the first write's forward pass, once
        per slice, where `warm` ran (a failure is left to the first write, which compiles it)."""
        if self._uses_kernel(p):
            self._warm_rows(p.local, p.remote, p.slices)

    def _warm_rows(self, local: PoolDescriptor, remote: PoolDescriptor, slices: Sequence[HeadSlice]) -> None:
        if self._warm_pool is None or len(slices) != 1 or local != self._warm_pool[1]:
            return
        kv = self._warm_pool[0]
        rows = row_slice(local, remote, slices[0])
        if rows is None or rows in self._warm_slices:
            return
        try:
            with self._copy_context():
                warm_kernel_copy(kv, local, rows=rows)
        except Exception as exc:  # serving goes on: the first write compiles it
            log.warning("the page copy's head-slice warm-up failed, the first write compiles it: %s", exc)
            return
        self._warm_slices.add(rows)

    @staticmethod
    def _forget(p: ChannelPeer, room: str) -> None:
        p.opened.pop(room, None)
        p.runs.pop(room, None)
        p.kernel_plans.pop(room, None)
        if p.answers is not None:
            p.answers.forget(room)
