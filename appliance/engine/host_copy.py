"""Host values onto a device without waiting for it.

A CUDA tensor made from a Python list (``torch.tensor(values, device="cuda")``) or copied from pageable
host memory is a synchronous copy: the host first waits for every kernel queued on the stream, a
replayed decode step included, so the host work after it no longer overlaps the GPU's. Staged in pinned
memory, the copy is queued behind those kernels and the host goes on at once (torch's pinned-memory
allocator keeps the staging buffer until the copy has run). Off CUDA it is a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: torch.Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """``values`` (a host tensor or a list) as a tensor on ``device``, with no host-device sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    dev = torch.device(device)
    if dev.type != "cuda":
        return host.to(dev)
    if host.device.type != "cpu":
        return host.to(dev, non_blocking=True)
    return host.pin_memory().to(dev, non_blocking=True)
