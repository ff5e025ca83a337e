"""The prefill side of the KV handoff: push each layer's new pages into decode's pool, then signal.

Rank 0 (:class:`PrefillHandoff`) plans every step from the scheduled batch; the plan travels to the
other TP ranks with the batch, where :class:`FollowerHandoff` pushes their own head slices. Every
rank that owns heads for a decode rank signals it once the prompt is complete; rank 0's signal
carries the first sampled token. A rank writes a room only once its decode pool accepted it (the Open
goes out as the leg arrives on rank 0, as the step begins on the others; `nvshmem_kv.transport`), and
a room the pool refused or cancelled fails on this side instead.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import torch

from appliance.engine.request import Request
from appliance.engine.scheduler import ScheduledBatch
from nvshmem_kv import KVTransport, Peer, PoolDescriptor, PoolHandle, TransportError

_STARTED_MEMORY = 4096
COPY_WAIT_S = 10.0  # the longest a reservation waits for this engine's own copies to read freed pages
log = logging.getLogger("pdbox.handoff")


@dataclass
class Transfer:
    """Where one prefill request's KV goes. ``sent_pages`` full pages have been pushed."""

    room: str
    handles: list[str]
    dst_pages: list[int]
    sent_pages: int = 0
    error: str | None = None
    signalled: bool = False  # its signal left: the decode side has the room whole


class RoomRef(msgspec.Struct, frozen=True):
    """A room rank 0 tells the other ranks of its TP group about: new (they ask its pools ahead), or given
    up (they abandon it too)."""

    room: str
    handles: list[str]


class StepPlan(msgspec.Struct, frozen=True):
    room: str
    handles: list[str]
    src: list[int]
    dst: list[int]
    final: bool


class _Sender:
    """Connections from this rank to decode pools, opened once per handle and reused."""

    def __init__(self, transport: KVTransport, kv: torch.Tensor, total_kv_heads: int, tp_rank: int,
                 tp_size: int) -> None:
        self.transport = transport
        self.kv = kv
        self.local = PoolDescriptor.from_tensor(kv, total_kv_heads, tp_rank, tp_size)
        self.peers: dict[str, Peer] = {}
        # rooms with bytes on the wire -> the connection to each of their handles they began on (bounded)
        self.started: OrderedDict[str, tuple[Peer, ...]] = OrderedDict()
        self.warm_s = self._warm()

    def _warm(self) -> float:
        """The copy path's compiles and tuning now, not in the first handoff's TTFT (GPU backends)."""
        try:
            warm_s = self.transport.warm(self.kv, self.local)
        except Exception as exc:  # serving can go on: the first handoff then compiles, as without this
            log.warning("KV copy warm-up failed, the first handoff will compile it: %s", exc)
            return 0.0
        if warm_s:
            print(f"pdbox handoff: KV page copy compiled and tuned in {warm_s:.1f} s", file=sys.stderr, flush=True)
        return warm_s

    def peers_for(self, handles: list[str]) -> list[Peer]:
        out = []
        for h in handles:
            peer = self.peers.get(h)
            if peer is None:
                self.forget_broken([k for k in self.peers if not _alive(self.peers[k])])  # e.g. a restarted decode
                peer = self.peers[h] = self.transport.connect(PoolHandle.from_json(h), self.local)
            out.append(peer)
        return out

    def write(self, plans: list[StepPlan], layer: int, failed: dict[str, str]) -> None:
        if layer == 0:  # once a step: drop the connections the receivers closed (they failed those rooms)
            self.forget_broken(list(self.peers))
        for p in plans:
            if p.room in failed or not p.src:
                continue
            began = self.started.get(p.room)
            if began is not None and any(self.peers.get(h) is not peer for h, peer in zip(p.handles, began)):
                # NOTE: the receiver failed the room when that connection closed and reuses its pages after a
                # grace; the copies are one-sided, so on a new connection they would land there all the same
                failed[p.room] = "KV transfer failed: the decode side closed the connection"
                continue
            for attempt in (0, 1):
                try:
                    peers = self.peers_for(p.handles)
                    for peer in peers:
                        if peer.slices:
                            self.transport.write(peer, p.room, layer, self.kv, p.src, p.dst)
                except (TransportError, OSError) as exc:
                    dropped = self.forget_broken(p.handles)
                    if attempt == 0 and dropped and p.room not in self.started:
                        # nothing of it was written on the dead connection: try a new one (if its Open reached
                        # the receiver, the room failed with that connection and the new Open is refused)
                        continue
                    failed[p.room] = f"KV transfer failed: {exc}"
                    break
                if began is None:
                    self.started[p.room] = tuple(peers)
                    if len(self.started) > _STARTED_MEMORY:
                        self.started.popitem(last=False)
                break

    def open(self, rooms: list[tuple[str, list[str]]]) -> None:
        """Ask the pools of these (room, handles) ahead of their first write (`KVTransport.open`): the
        answers come back while the request queues or layer 0 computes, and the write waits only for what
        has not. A failure here is left to the write, which reconnects or fails the room."""
        self.forget_broken(list(self.peers))
        for room, handles in rooms:
            if room in self.started:
                continue
            try:
                for peer in self.peers_for(handles):
                    if peer.slices:
                        self.transport.open(peer, room)
            except (TransportError, OSError):
                pass

    def signal(self, handles: list[str], room: str, payload: bytes) -> None:
        self.started.pop(room, None)
        try:
            for peer in self.peers_for(handles):
                if peer.slices:
                    self.transport.signal(peer, room, payload)
        except (TransportError, OSError):
            self.forget_broken(handles)
            raise

    def abandon(self, handles: list[str], room: str) -> None:
        """Tell each pool this rank wrote part of ``room`` into that no more is coming (after the writes
        land): its pages are reusable. Never connects; a dead connection is left to the receiver, which
        saw it close."""
        self.started.pop(room, None)
        for h in handles:
            peer = self.peers.get(h)
            if peer is None:
                continue
            try:
                self.transport.abandon(peer, room)
            except (TransportError, OSError):
                self.forget_broken([h])

    def forget_broken(self, handles: list[str]) -> bool:
        """Drop connections that died, so the next room to that pool reconnects instead of failing too.

        NOTE: the rooms a dead connection had opened fail on the receiver (it saw the close); only
        they fail. A connection is dead once its send queue has failed (`SendQueue.error`)."""
        dropped = False
        for h in handles:
            peer = self.peers.get(h)
            if peer is not None and not _alive(peer):
                del self.peers[h]
                dropped = True
                try:
                    self.transport.disconnect(peer)
                except TransportError:
                    pass
        return dropped

    def close(self) -> None:
        for peer in self.peers.values():
            try:
                self.transport.disconnect(peer)
            except TransportError:
                pass
        self.transport.close()


def _alive(peer: Peer) -> bool:
    """False once a peer's connection is known dead: its send queue failed, or its answer reader saw the
    receiver close the control socket (a restarted decode) and failed the queue.

    NOTE: reads `ChannelPeer.queue` of nvshmem_kv; a backend without one counts as alive (its failures
    still surface on the next write)."""
    if not hasattr(peer, "queue"):
        return True
    return peer.queue is not None and peer.queue.error is None


class Followers(Protocol):
    """How rank 0 tells the other ranks of its TP group about rooms, between steps (`ModelRunner`'s)."""

    def open_on_followers(self, rooms: bytes) -> None: ...

    def abandon_on_followers(self, rooms: bytes) -> None: ...


class PrefillHandoff:
    """Step hooks of a prefill engine's rank 0 (see ``Engine.StepHooks``)."""

    def __init__(self, transport: KVTransport, kv: torch.Tensor, total_kv_heads: int, page_size: int,
                 tp_size: int = 1, followers: Followers | None = None) -> None:
        self.sender = _Sender(transport, kv, total_kv_heads, 0, tp_size)
        self.followers = followers  # TP > 1: the other ranks, told of new rooms and of those given up
        self.page_size = page_size
        self.tp_size = tp_size
        self.bytes_per_page_layer = 2 * int(kv[0, 0, 0].numel()) * kv.element_size()
        self.pages_sent = 0

    def before_forward(self, sb: ScheduledBatch) -> tuple[Callable[[int], None] | None, bytes]:
        # Pages freed since the last step (after a first token, an abort, a move) may be written by
        # this step's store_kv: the compute stream first waits for the copies that read them.
        self.sender.transport.fence_compute()
        plans: list[StepPlan] = []
        transfers: dict[str, Transfer] = {}
        for req, start, n in zip(sb.requests, sb.prefix_lens, sb.extend_lens):
            t: Transfer | None = req.transfer
            if t is None or t.error:
                continue
            end = start + n
            first, last = t.sent_pages, -(-end // self.page_size)
            if last > len(t.dst_pages):
                t.error = f"decode reserved {len(t.dst_pages)} pages but the prompt needs {last}"
                continue
            plans.append(StepPlan(t.room, t.handles, req.pages[first:last], t.dst_pages[first:last],
                                  end >= req.prompt_len))
            transfers[t.room] = t
            t.sent_pages = end // self.page_size
        if not plans:
            return None, b""
        self.sender.open([(p.room, p.handles) for p in plans if p.src])
        failed: dict[str, str] = {}

        def hook(layer: int) -> None:
            for room, t in transfers.items():  # aborted since the step began: stop writing into its pages
                if t.error and room not in failed:
                    failed[room] = t.error
            self.sender.write(plans, layer, failed)
            if layer == self.sender.local.num_layers - 1:
                for room, why in failed.items():
                    if transfers[room].error is None:
                        transfers[room].error = why
                self.pages_sent += sum(len(p.src) for p in plans if p.room not in failed)

        extra = msgspec.json.encode(plans) if self.tp_size > 1 else b""
        return hook, extra

    def open(self, t: Transfer) -> None:
        """A prefill leg arrived: ask its decode pools now, on this rank's connections and (TP) the other
        ranks' (`Followers.open_on_followers`), so the answers are back before the first write. Each rank
        asks again as the step begins, a no-op for a room it asked already."""
        self.sender.open([(t.room, t.handles)])
        if self.followers is not None:
            self.followers.open_on_followers(msgspec.json.encode([RoomRef(t.room, t.handles)]))

    def after_first_token(self, req: Request, token: int, logprob: dict | None) -> None:
        t: Transfer | None = req.transfer
        if t is None or t.error:
            return
        payload = msgspec.json.encode({"token": token, "logprob": logprob})
        try:
            self.sender.signal(t.handles, t.room, payload)
            t.signalled = True
        except (TransportError, OSError) as exc:
            t.error = f"KV transfer signal failed: {exc}"

    def abandon(self, t: Transfer) -> None:
        """``t``'s request ended without its signal (aborted, failed): tell the decode pools it wrote into,
        and have the other TP ranks do the same for their writes (unless the group is broken)."""
        if not t.signalled:
            self.sender.abandon(t.handles, t.room)
            if self.followers is not None:
                self.followers.abandon_on_followers(msgspec.json.encode([RoomRef(t.room, t.handles)]))

    def wait_copies(self) -> None:
        """Block until this rank's copies have read their pages: an engine that also receives (auto) may
        then reserve pages it freed for another engine to write into (the streams order only its own
        compute after its copies; a move queues a whole request's KV at once). Raises `TransportError`."""
        self.sender.transport.wait_copies(COPY_WAIT_S)

    def push_request(self, req: Request, room: str, handles: list[str], dst_pages: list[int],
                     payload: bytes) -> None:
        """Move a decoding request: push every page of its computed KV into ``dst_pages``, layer by
        layer, then signal ``room`` with ``payload``. Raises `TransportError` when a write failed."""
        n = -(-req.computed_len // self.page_size)
        if n > len(dst_pages):
            raise ValueError(f"the destination reserved {len(dst_pages)} pages but the request holds {n}")
        plan = StepPlan(room, handles, req.pages[:n], dst_pages[:n], True)
        failed: dict[str, str] = {}
        for layer in range(self.sender.local.num_layers):
            self.sender.write([plan], layer, failed)
            if failed:
                self.sender.abandon(handles, room)
                raise TransportError(failed[room])
        self.pages_sent += n
        self.sender.transport.fence_compute()  # the mover frees these pages next
        self.sender.signal(handles, room, payload)

    def close(self) -> None:
        self.sender.close()


class FollowerHandoff:
    """Runs on prefill TP ranks > 0: push this rank's heads as rank 0's plan says."""

    def __init__(self, backend: str, opts: dict[str, str], runner, transport: KVTransport | None = None) -> None:
        import nvshmem_kv

        transport = transport or nvshmem_kv.create(backend, **opts)  # nvshmem: joined when the pool was made
        cfg = runner.model_config
        self.sender = _Sender(transport, runner.pool.kv, cfg.num_kv_heads, runner.rank.rank,
                              runner.rank.world_size)

    def plan_step(self, extra: bytes, kv: torch.Tensor) -> tuple[Callable[[int], None], Callable[[], None]]:
        plans = msgspec.json.decode(extra, type=list[StepPlan])
        self.sender.open([(p.room, p.handles) for p in plans if p.src])
        failed: dict[str, str] = {}

        def hook(layer: int) -> None:
            self.sender.write(plans, layer, failed)

        def after() -> None:
            self.sender.transport.fence_compute()  # this rank's next step writes KV only after these copies
            for p in plans:
                if p.room in failed:  # refused, cancelled, timed out here alone: rank 0 may have signalled, so
                    self.sender.abandon(p.handles, p.room)  # no CMD_ABANDON comes; Close it behind its writes
                elif p.final:
                    try:
                        self.sender.signal(p.handles, p.room, b"")
                    except (TransportError, OSError):
                        pass  # the decode side fails the room on its deadline

        return hook, after

    def abandon_rooms(self, extra: bytes) -> None:
        """Rank 0 gave these rooms up: abandon this rank's part of them too (behind its copies). Best
        effort: a failure is logged (the decode side frees the pages at its cap), never ends this rank."""
        try:
            for a in msgspec.json.decode(extra, type=list[RoomRef]):
                self.sender.abandon(a.handles, a.room)
        except Exception:
            log.exception("abandoning rooms on a TP follower failed")

    def open_rooms(self, extra: bytes) -> None:
        """A prefill leg reached rank 0: ask this rank's decode pools for its rooms ahead of the step that
        writes them (`_Sender.open`: a failure is left to that step's write)."""
        self.sender.open([(r.room, r.handles) for r in msgspec.json.decode(extra, type=list[RoomRef])])

    def close(self) -> None:
        self.sender.close()
