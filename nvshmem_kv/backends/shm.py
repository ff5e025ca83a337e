"""shm: the decode pool lives in POSIX shared memory; prefill maps it and copies pages in place.

Zero extra copies: one ``copy_`` per contiguous page run (K and V together). The writes are done
by the time `write` returns, so a Signal queued after them is delivered after they are visible
(the socket send is a full memory barrier). Completion travels over the TCP control channel.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch

from nvshmem_kv.descriptor import PoolDescriptor
from nvshmem_kv.errors import TransportError
from nvshmem_kv.pages import PageRun
from nvshmem_kv.shm_segment import ShmSegment, shm_supported
from nvshmem_kv.transport import ChannelPeer, ChannelTransport


def available(device: str | torch.device = "cpu") -> tuple[bool, str]:
    ok, why = shm_supported()
    if not ok:
        return False, why
    if torch.device(device).type != "cpu":
        return False, f"the pool is on {device}; shm moves CPU pools (GPU pools use nvshmem/cuda_ipc)"
    try:
        seg = ShmSegment.create(f"pdbox-probe-{secrets.token_hex(6)}", 4096, track=False)
        seg.close()
    except TransportError as exc:
        return False, str(exc)
    return True, "POSIX shared memory works on this host (zero-copy, same host only)"


class ShmTransport(ChannelTransport):
    """Same-host CPU pools. Options: ``run_id`` (names the segments), ``host`` (control channel),
    ``copy`` ("torch": one ``copy_`` per run; "kernel": `kernels.copy_pages` through the pool's
    address, which on CPU needs ``TRITON_INTERPRET=1`` and exists to test that shared path)."""

    name = "shm"

    def __init__(self, *, copy: str = "torch", **opts: Any) -> None:
        if copy not in ("torch", "kernel"):
            raise ValueError(f"copy must be 'torch' or 'kernel', got {copy!r}")
        super().__init__(**opts)
        self._copy = copy
        self._segments: list[ShmSegment] = []

    def allocate_pool(self, desc: PoolDescriptor, device: str | torch.device = "cpu") -> torch.Tensor:
        """Zeroed pool backed by a fresh shared-memory segment (the engine's KV tensor)."""
        if torch.device(device).type != "cpu":
            raise TransportError(f"shm pools live in host memory; got device {device}")
        name = f"pdbox-{self.run_id}-kv{desc.tp_rank}-{secrets.token_hex(4)}"
        seg = ShmSegment.create(name, desc.pool_bytes)
        self._segments.append(seg)
        return seg.tensor(desc.torch_dtype(), desc.shape)

    def _export_pool(self, kv: torch.Tensor, desc: PoolDescriptor) -> dict[str, Any]:
        ptr = kv.data_ptr()
        for seg in self._segments:
            base = seg.tensor(torch.uint8, (seg.size,)).data_ptr()
            if base <= ptr and ptr + desc.pool_bytes <= base + seg.size:
                return {"shm_name": seg.name, "shm_offset": ptr - base}
        raise TransportError("the shm backend exports only pools made by its own allocate_pool()")

    def _open_peer(self, peer: ChannelPeer) -> None:
        h, d = peer.handle, peer.remote
        seg = ShmSegment.attach(h.shm_name, h.shm_offset + d.pool_bytes)
        peer.remote_pool = seg.tensor(d.torch_dtype(), d.shape, offset=h.shm_offset)
        peer.remote_base = peer.remote_pool.data_ptr()
        peer.closer = seg.close

    def _uses_kernel(self, peer: ChannelPeer) -> bool:
        return self._copy == "kernel"

    def warm(self, kv: torch.Tensor, local: PoolDescriptor) -> float:
        return self._warm_kernel(kv, local) if self._copy == "kernel" else 0.0

    def _write_runs(self, peer: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor,
                    runs: list[PageRun]) -> int:
        dst = peer.remote_pool
        if dst is None:
            raise TransportError(f"{peer!r} is closed")
        moved = 0
        for hs in peer.slices:
            full = hs.count == peer.local.kv_heads_local == peer.remote.kv_heads_local
            for run in runs:
                s = src_kv[:, layer, run.src:run.src + run.length]
                d = dst[:, layer, run.dst:run.dst + run.length]
                if not full:
                    s = s[..., hs.src_start:hs.src_start + hs.count, :]
                    d = d[..., hs.dst_start:hs.dst_start + hs.count, :]
                d.copy_(s)
                moved += s.numel() * s.element_size()
        return moved

    def _release_pool(self) -> None:
        for seg in self._segments:
            seg.close()
        self._segments.clear()
