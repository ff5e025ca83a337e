"""Backend registry with lazy imports: ``create("shm", run_id=...)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from nvshmem_kv.base import KVTransport
from nvshmem_kv.errors import BackendUnavailable

# name -> (module, class); probe order is nvshmem -> cuda_ipc -> shm -> tcp.
BACKENDS: dict[str, tuple[str, str]] = {
    "nvshmem": ("nvshmem_kv.backends.nvshmem", "NvshmemTransport"),
    "cuda_ipc": ("nvshmem_kv.backends.cuda_ipc", "CudaIpcTransport"),
    "shm": ("nvshmem_kv.backends.shm", "ShmTransport"),
    "tcp": ("nvshmem_kv.backends.tcp", "TcpTransport"),
    "fake": ("nvshmem_kv.backends.fake", "FakeTransport"),
}


DEVICE_BOUND = frozenset({"nvshmem", "cuda_ipc"})     # backends whose constructor takes ``device``


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def _module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown KV transport backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name][0])


def availability(name: str) -> Callable[[str | torch.device], tuple[bool, str]]:
    """The backend's ``available(device) -> (ok, reason)`` check (cheap, never initializes a GPU job)."""
    return _module(name).available


def create(name: str, *, device: str | torch.device | None = None, **opts: Any) -> KVTransport:
    """Build backend ``name``. With ``device`` given, refuse (`BackendUnavailable`, with the reason)
    a backend that cannot serve a pool on that device here; GPU backends also bind to it. ``opts``
    go to the backend (``run_id``, ``host``, ``advertise_host``, ``send_timeout_s``; nvshmem:
    ``pe``, ``npes``, ``uid``, ``symmetric_bytes``)."""
    module = _module(name)
    if device is not None:
        ok, why = module.available(device)
        if not ok:
            raise BackendUnavailable(f"{name} is unavailable: {why}")
        if name in DEVICE_BOUND:
            opts["device"] = device
    cls: type[KVTransport] = getattr(module, BACKENDS[name][1])
    return cls(**opts)
