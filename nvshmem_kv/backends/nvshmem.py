"""nvshmem: every engine rank (prefill and decode) is one PE of a single NVSHMEM job. Each PE
carves its KV pool out of one collective symmetric allocation made at start-up; prefill pushes
page runs with ``putmem_signal_nbi_on_stream`` on raw symmetric addresses (nvshmem4py's
high-level put rejects tensor views, notes/lowlevel.md §1.4). Each put adds 1 to the signal word
``sig[my_pe]`` on the destination PE; the Signal frame on the control channel leaves after
``quiet_on_stream`` + an event sync, and carries the put count, which the receiver checks
against its signal word before the room counts as done.

Where NVSHMEM maps the peer's heap into this process (``nvshmem_ptr``: a peer over NVLink/P2P, or
another PE on this GPU), the default ``copy="auto"`` writes instead with the page-copy kernel through
that address, as cuda_ipc does: one launch per layer, whatever the page order and head slices, where
puts cost one host call per contiguous run, and per token row where this rank holds part of a page's
heads. Those writes add nothing to the signal word; the Signal leaves after the copy stream's event.

Start-up (launcher's job): rank 0 calls `make_unique_id()`, ships the bytes to every rank, and
each rank builds ``create("nvshmem", pe=..., npes=..., uid=..., symmetric_bytes=...)`` and calls
`allocate_pool` (collective, same ``symmetric_bytes`` everywhere). `close` is collective too.
Only put/signal/quiet/barrier_all are used, so two PEs on ONE GPU (limited MPG) work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from nvshmem_kv.backends._cuda import cuda_device, cuda_reason, have_module
from nvshmem_kv.channel import ConnInfo
from nvshmem_kv.copy_order import CopyOrder
from nvshmem_kv.descriptor import HeadSlice, PoolDescriptor
from nvshmem_kv.errors import BackendUnavailable, ProtocolError, TransportError
from nvshmem_kv.pages import PageRun
from nvshmem_kv.sender import Fence
from nvshmem_kv.transport import ChannelPeer, ChannelTransport
from nvshmem_kv.wire import Signal

_VERIFY_TIMEOUT_S = 5.0


def available(device: str | torch.device = "cuda") -> tuple[bool, str]:
    problems = [p for p in (cuda_reason(device),) if p]
    if not have_module("nvshmem"):
        problems.append("nvshmem4py is not installed (pip install 'pdbox[gpu]')")
    if not have_module("cuda.core"):
        problems.append("cuda-core is not installed")
    if problems:
        return False, "; ".join(problems)
    return True, "NVSHMEM symmetric heap, putmem_signal_nbi_on_stream (NVLink/P2P or IB)"


def make_unique_id() -> bytes:
    """Rank 0's NVSHMEM unique id as raw bytes, to broadcast to every PE (no pickle needed)."""
    import numpy as np
    import nvshmem.core as nvs

    return bytes(nvs.get_unique_id()._data.view(np.uint8))


def put_list(loc: PoolDescriptor, rem: PoolDescriptor, layer: int, runs: list[PageRun],
             slices: Sequence[HeadSlice], src_base: int, dst_base: int) -> list[tuple[int, int, int]]:
    """(dst address, src address, bytes) of every put that moves K and V of ``layer``.

    Whole-head slices move one put per run; a partial head slice is strided, so it moves one put
    per token row of each page.
    """
    esz = loc.itemsize
    s_row, d_row = loc.kv_heads_local * loc.head_dim * esz, rem.kv_heads_local * rem.head_dim * esz
    s_page, d_page = loc.page_size * s_row, rem.page_size * d_row
    puts: list[tuple[int, int, int]] = []
    for kv in (0, 1):
        s_lay = src_base + (kv * loc.num_layers + layer) * loc.num_pages * s_page
        d_lay = dst_base + (kv * rem.num_layers + layer) * rem.num_pages * d_page
        for hs in slices:
            if hs.count == loc.kv_heads_local == rem.kv_heads_local:
                puts += [(d_lay + r.dst * d_page, s_lay + r.src * s_page, r.length * s_page) for r in runs]
                continue
            width = hs.count * loc.head_dim * esz
            s_off, d_off = hs.src_start * loc.head_dim * esz, hs.dst_start * rem.head_dim * esz
            for r in runs:
                for i in range(r.length):
                    for t in range(loc.page_size):
                        puts.append((d_lay + (r.dst + i) * d_page + t * d_row + d_off,
                                     s_lay + (r.src + i) * s_page + t * s_row + s_off, width))
    return puts


class NvshmemTransport(ChannelTransport):
    """Options: ``pe``, ``npes``, ``uid`` (bytes from `make_unique_id`), ``symmetric_bytes``
    (the per-PE pool allocation, equal on every PE), ``device``, ``copy`` ("auto", the default: the
    page-copy kernel where the peer's heap is mapped here, else puts; "kernel": refuse a peer that is not
    mapped; "put": always puts); plus the channel options."""

    name = "nvshmem"

    def __init__(self, *, pe: int, npes: int, uid: bytes, symmetric_bytes: int,
                 device: str | torch.device | None = None, copy: str = "auto", **opts: Any) -> None:
        if copy not in ("auto", "kernel", "put"):
            raise ValueError(f"copy must be 'auto', 'kernel' or 'put', got {copy!r}")
        ok, why = available(device or "cuda")
        if not ok:
            raise BackendUnavailable(f"nvshmem is unavailable: {why}")
        if not 0 <= pe < npes:
            raise ValueError(f"pe {pe} is outside [0, npes={npes})")
        super().__init__(**opts)
        import nvshmem.bindings as nb
        import nvshmem.core as nvs

        self._nvs, self._nb = nvs, nb
        self._copy = copy
        self.pe, self.npes = pe, npes
        self._symmetric_bytes = symmetric_bytes
        self._device = cuda_device(device)
        self._init(uid)
        self._stream = torch.cuda.Stream(device=self._device)
        self._poll_stream = torch.cuda.Stream(device=self._device)  # signal reads never queue behind compute
        # non-blocking puts have read their source only after a quiet: the fence drains them first
        self._order = CopyOrder(self._stream, lambda: self._nb.quiet_on_stream(int(self._stream.cuda_stream)))
        self._heap: torch.Tensor | None = None
        self._sig: torch.Tensor | None = None
        self._puts: dict[int, int] = {}           # destination PE -> puts issued there

    def _init(self, uid_bytes: bytes) -> None:
        import numpy as np
        from cuda.core import Device  # NOT cuda.core.experimental (removed in cuda-core 1.x)

        torch.cuda.set_device(self._device)
        dev = Device(self._device.index)
        dev.set_current()
        uid = self._nvs.get_unique_id(empty=True)
        raw = np.frombuffer(uid_bytes, dtype=np.uint8)
        view = uid._data.view(np.uint8)
        if raw.size != view.size:
            raise TransportError(f"NVSHMEM unique id must be {view.size} bytes, got {raw.size}")
        view[:] = raw
        self._nvs.init(device=dev, uid=uid, rank=self.pe, nranks=self.npes, initializer_method="uid")

    def allocate_pool(self, desc: PoolDescriptor, device: str | torch.device | None = None) -> torch.Tensor:
        """COLLECTIVE: every PE calls this once, in the same order, with the same ``symmetric_bytes``."""
        if self._heap is not None:
            raise TransportError("allocate_pool was already called (one symmetric pool per PE)")
        if desc.pool_bytes > self._symmetric_bytes:
            raise TransportError(f"the pool needs {desc.pool_bytes} B but symmetric_bytes is {self._symmetric_bytes}")
        with torch.cuda.device(self._device):
            self._heap = self._nvs.bytetensor((self._symmetric_bytes,))
            self._sig = self._nvs.tensor((self.npes,), dtype=torch.int64)
            self._heap.zero_()
            self._sig.zero_()
            stream = torch.cuda.current_stream()
            self._nb.barrier_all_on_stream(int(stream.cuda_stream))
            stream.synchronize()
        return self._heap[:desc.pool_bytes].view(desc.torch_dtype()).view(desc.shape)

    def _export_pool(self, kv: torch.Tensor, desc: PoolDescriptor) -> dict[str, Any]:
        if self._heap is None:
            raise TransportError("the nvshmem backend exports only the pool made by its allocate_pool()")
        offset = kv.data_ptr() - self._heap.data_ptr()
        if offset < 0 or offset + desc.pool_bytes > self._symmetric_bytes:
            raise TransportError("the pool is not inside this PE's symmetric allocation")
        return {"pe": self.pe, "heap_offset": offset,
                "device_uuid": str(torch.cuda.get_device_properties(self._device).uuid)}

    def _open_peer(self, peer: ChannelPeer) -> None:
        h, d = peer.handle, peer.remote
        if self._heap is None:
            raise TransportError("call allocate_pool (collective) before connect")
        if not 0 <= h.pe < self.npes or h.pe == self.pe:
            raise TransportError(f"handle names PE {h.pe}; this job has PEs 0..{self.npes - 1} and this is {self.pe}")
        if h.heap_offset + d.pool_bytes > self._symmetric_bytes:
            raise TransportError("the peer pool does not fit the symmetric allocation: symmetric_bytes differ?")
        if self._copy != "put":
            # the peer pool's address in this process where NVSHMEM maps that PE's heap here, else 0
            peer.remote_base = int(self._nb.ptr(self._heap.data_ptr() + h.heap_offset, h.pe))
            if not peer.remote_base and self._copy == "kernel":
                raise TransportError(f"NVSHMEM does not map PE {h.pe}'s heap here (no NVLink/P2P path): "
                                     "copy='kernel' needs it; 'auto' or 'put' would put instead")

    def _uses_kernel(self, peer: ChannelPeer) -> bool:
        return bool(peer.remote_base)

    def _copy_context(self) -> Any:
        return torch.cuda.stream(self._stream)

    def warm(self, kv: torch.Tensor, local: PoolDescriptor) -> float:
        """The page-copy kernel's compile and autotuning, on the copy stream (unless ``copy="put"``)."""
        return 0.0 if self._copy == "put" else self._warm_kernel(kv, local)

    def _write_runs(self, peer: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor,
                    runs: list[PageRun]) -> int:
        if self._heap is None or self._sig is None:
            raise TransportError("no symmetric pool")
        h = peer.handle
        if src_kv.device != self._device:
            raise TransportError(f"src_kv is on {src_kv.device}, this PE is bound to {self._device}")
        puts = put_list(peer.local, peer.remote, layer, runs, peer.slices, src_kv.data_ptr(),
                        self._heap.data_ptr() + h.heap_offset)     # symmetric address of the peer pool
        sig = self._sig.data_ptr() + 8 * self.pe
        op = int(self._nvs.SignalOp.SIGNAL_ADD)
        put = self._nb.putmem_signal_nbi_on_stream
        cs = int(self._stream.cuda_stream)
        for dst, src, nbytes in puts:
            put(dst, src, nbytes, sig, 1, op, h.pe, cs)
        self._puts[h.pe] = self._puts.get(h.pe, 0) + len(puts)
        return sum(n for _, _, n in puts)

    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self._device)

    def _signal_message(self, peer: ChannelPeer, room: str) -> Signal:
        return Signal(room, puts=self._puts.get(peer.handle.pe, 0), src_pe=self.pe)

    def _signal_fence(self, peer: ChannelPeer) -> Fence | None:
        self._nb.quiet_on_stream(int(self._stream.cuda_stream))
        event = torch.cuda.Event()
        event.record(self._stream)
        return Fence(event.synchronize, event.query)

    def _sync_device(self, peer: ChannelPeer) -> None:
        self._nb.quiet_on_stream(int(self._stream.cuda_stream))
        self._stream.synchronize()

    def _verify_signal(self, conn: ConnInfo, msg: Signal) -> None:
        """The signal word of the sender PE must show all its puts before the room completes."""
        if self._sig is None or not 0 <= msg.src_pe < self.npes:
            raise ProtocolError(f"signal names PE {msg.src_pe}")
        if msg.puts == 0:  # the page-copy kernel wrote through the mapped heap (ordered by the sender's fence)
            return
        end = time.monotonic() + _VERIFY_TIMEOUT_S
        # NOTE: `.item()` copies on the current stream and waits for it; on the default stream that is
        # behind the decode forward pass. A side stream (non-blocking, as torch makes them) is not.
        with torch.cuda.device(self._device), torch.cuda.stream(self._poll_stream):
            while int(self._sig[msg.src_pe].item()) < msg.puts:
                if time.monotonic() > end:
                    raise ProtocolError(f"PE {msg.src_pe} signalled {msg.room!r} after {msg.puts} puts, "
                                        f"but only {int(self._sig[msg.src_pe].item())} landed")
                time.sleep(0.0005)

    def _release_pool(self) -> None:
        """Collective: frees the symmetric allocations and finalizes NVSHMEM on every PE."""
        with torch.cuda.device(self._device):
            torch.cuda.synchronize(self._device)
            for t in (self._sig, self._heap):
                if t is not None:
                    self._nvs.free_tensor(t)
            self._sig = self._heap = None
            self._nvs.finalize()
