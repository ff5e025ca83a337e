"""cuda_ipc: decode exports its pool allocation with cudaIpcGetMemHandle (64 raw bytes + offset);
prefill opens it, views it as a tensor and copies page runs on a transfer stream. The Signal
leaves only after that stream's event completes, so the bytes are in decode's memory first.

Caveats (see notes/lowlevel.md §2): keep ``expandable_segments`` off in the decode process (VMM
allocations cannot be exported this way); the decode GPU must be visible to the prefill process.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from nvshmem_kv.backends._cuda import (
    allocation_base,
    check,
    cuda_device,
    cuda_reason,
    have_module,
    ipc_handle_bytes,
    ipc_handle_from_bytes,
    runtime,
    tensor_at,
)
from nvshmem_kv.copy_order import CopyOrder
from nvshmem_kv.descriptor import PoolDescriptor
from nvshmem_kv.errors import BackendUnavailable, TransportError
from nvshmem_kv.pages import PageRun
from nvshmem_kv.sender import Fence
from nvshmem_kv.transport import ChannelPeer, ChannelTransport


def available(device: str | torch.device = "cuda") -> tuple[bool, str]:
    problems = [p for p in (cuda_reason(device),) if p]
    if not have_module("cuda.bindings"):
        problems.append("cuda-bindings (cuda.bindings) is not installed")
    if problems:
        return False, "; ".join(problems)
    return True, "CUDA IPC: prefill maps the decode pool and copies over P2P (same node)"


class CudaIpcTransport(ChannelTransport):
    """Options: ``device`` (the GPU this rank copies from; default the current one), ``copy``
    ("kernel", the default: one `kernels.copy_pages` launch per layer, whole pages or this rank's heads
    of each token row; "torch": one ``copy_`` per contiguous run and head slice), plus the channel options.

    Why the kernel: a decode pool's free pages scatter with use, and the torch path issues one host call
    per run, per layer (an 8K-token prompt on scattered pages: ~15,000 calls, ~0.3 s of host time on
    the prefill's critical path, measured on an H200); the kernel path issues one launch per layer."""

    name = "cuda_ipc"

    def __init__(self, *, device: str | torch.device | None = None, copy: str = "kernel", **opts: Any) -> None:
        if copy not in ("kernel", "torch"):
            raise ValueError(f"copy must be 'kernel' or 'torch', got {copy!r}")
        ok, why = available(device or "cuda")
        if not ok:
            raise BackendUnavailable(f"cuda_ipc is unavailable: {why}")
        super().__init__(**opts)
        self._copy = copy
        self._rt = runtime()
        self._device = cuda_device(device)
        self._stream = torch.cuda.Stream(device=self._device)
        self._order = CopyOrder(self._stream)

    def allocate_pool(self, desc: PoolDescriptor, device: str | torch.device = "cuda") -> torch.Tensor:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise TransportError(f"cuda_ipc pools live on a GPU; got device {dev}")
        return torch.zeros(desc.shape, dtype=desc.torch_dtype(), device=dev)

    def _export_pool(self, kv: torch.Tensor, desc: PoolDescriptor) -> dict[str, Any]:
        if kv.device.type != "cuda":
            raise TransportError("cuda_ipc exports GPU pools only")
        with torch.cuda.device(kv.device):
            base, _ = allocation_base(kv.data_ptr())
            try:
                handle = check(self._rt.cudaIpcGetMemHandle(base), "cudaIpcGetMemHandle")
            except TransportError as exc:
                raise TransportError(f"{exc}; with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True the pool "
                                     "cannot be exported: leave it off in decode workers") from exc
            uuid = str(torch.cuda.get_device_properties(kv.device).uuid)
        return {"ipc_handle": base64.b64encode(ipc_handle_bytes(handle)).decode(),
                "ipc_offset": kv.data_ptr() - base, "device_uuid": uuid}

    def _open_peer(self, peer: ChannelPeer) -> None:
        h, d = peer.handle, peer.remote
        rt = self._rt
        with torch.cuda.device(self._device):
            ptr = int(check(rt.cudaIpcOpenMemHandle(ipc_handle_from_bytes(rt, h.ipc_bytes()),
                                                    rt.cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle"))
        peer.remote_pool = tensor_at(ptr + h.ipc_offset, d.pool_bytes, d.torch_dtype(), d.shape)
        peer.remote_base = ptr + h.ipc_offset

        def close() -> None:
            self._stream.synchronize()
            with torch.cuda.device(self._device):
                check(rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

        peer.closer = close

    def _write_runs(self, peer: ChannelPeer, room: str, layer: int, src_kv: torch.Tensor,
                    runs: list[PageRun]) -> int:
        dst = peer.remote_pool
        if dst is None:
            raise TransportError(f"{peer!r} is closed")
        src_l, dst_l = src_kv[:, layer], dst[:, layer]
        moved = 0
        with torch.cuda.stream(self._stream):
            for hs in peer.slices:
                for run in runs:
                    s = src_l[:, run.src:run.src + run.length, :, hs.src_start:hs.src_start + hs.count]
                    d = dst_l[:, run.dst:run.dst + run.length, :, hs.dst_start:hs.dst_start + hs.count]
                    d.copy_(s, non_blocking=True)
                    moved += s.numel() * s.element_size()
        return moved

    def _uses_kernel(self, peer: ChannelPeer) -> bool:
        return self._copy == "kernel"

    def _copy_context(self) -> Any:
        return torch.cuda.stream(self._stream)

    def warm(self, kv: torch.Tensor, local: PoolDescriptor) -> float:
        """The page-copy kernel's compile and autotuning, on the copy stream (unless ``copy="torch"``)."""
        return self._warm_kernel(kv, local) if self._copy == "kernel" else 0.0

    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self._device)

    def _signal_fence(self, peer: ChannelPeer) -> Fence | None:
        event = torch.cuda.Event()
        event.record(self._stream)
        return Fence(event.synchronize, event.query)

    def _sync_device(self, peer: ChannelPeer) -> None:
        self._stream.synchronize()
