"""tcp: page runs as length-prefixed frames on the control connection; the receiver's reader
thread lands them in its pool (straight into the pool when the destination slice is contiguous).

`write` stages the runs into one contiguous buffer (so the caller may reuse its pages at once)
and queues a single frame per head slice; the peer's send thread streams it in order.
"""

from __future__ import annotations

import socket

import torch

from nvshmem_kv.channel import ConnInfo
from nvshmem_kv.errors import ProtocolError
from nvshmem_kv.pages import PageRun, byte_view
from nvshmem_kv.sender import Outgoing
from nvshmem_kv.transport import ChannelPeer, ChannelTransport
from nvshmem_kv.wire import Write, recv_into_exact


def available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    return True, "TCP sockets work everywhere, across hosts too (one staging copy per side)"


class TcpTransport(ChannelTransport):
    """Options: ``host`` (bind address, default 127.0.0.1), ``advertise_host``, ``run_id``."""

    name = "tcp"
    accepts_data_frames = True

    def _write_runs(self, peer: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor,
                    runs: list[PageRun]) -> int:
        d = peer.local
        total = sum(r.length for r in runs)
        src_l = src_kv[:, layer]
        moved = 0
        for hs in peer.slices:
            staging = torch.empty((2, total, d.page_size, hs.count, d.head_dim), dtype=src_kv.dtype)
            off = 0
            for run in runs:
                part = src_l[:, run.src:run.src + run.length, :, hs.src_start:hs.src_start + hs.count]
                staging[:, off:off + run.length].copy_(part)
                off += run.length
            msg = Write(room, layer, hs.dst_start, hs.count, [(r.dst, r.length) for r in runs])
            peer.send(Outgoing(msg, [byte_view(staging)], keepalive=staging), self._send_timeout_s)
            moved += staging.numel() * staging.element_size()
        return moved

    def _receive_write(self, conn: ConnInfo, msg: Write, payload_len: int, sock: socket.socket) -> int:
        pool, desc = self._pool, self._desc
        if pool is None or desc is None:
            raise ProtocolError("no registered pool")
        if not 0 <= msg.layer < desc.num_layers:
            raise ProtocolError(f"layer {msg.layer} is outside [0, {desc.num_layers})")
        h0, hn = msg.head_start, msg.head_count
        if hn < 1 or h0 < 0 or h0 + hn > desc.kv_heads_local:
            raise ProtocolError(f"heads [{h0}, +{hn}) outside the {desc.kv_heads_local} local heads")
        pages = 0
        for start, count in msg.runs:
            if count < 1 or start < 0 or start + count > desc.num_pages:
                raise ProtocolError(f"page run [{start}, +{count}) outside [0, {desc.num_pages})")
            pages += count
        expected = 2 * pages * desc.page_size * msg.head_count * desc.head_dim * desc.itemsize
        if payload_len != expected:
            raise ProtocolError(f"write payload is {payload_len} B, its header implies {expected} B")
        full = hn == desc.kv_heads_local
        direct = full and pool.device.type == "cpu"
        for kv in (0, 1):
            for start, count in msg.runs:
                target = pool[kv, msg.layer, start:start + count, :, h0:h0 + hn]
                if direct:
                    recv_into_exact(sock, byte_view(target))
                else:
                    scratch = torch.empty(tuple(target.shape), dtype=pool.dtype)
                    recv_into_exact(sock, byte_view(scratch))
                    target.copy_(scratch)
        return payload_len
