"""pdbox KV transfer: the one-time handoff of a prompt's KV pages from a prefill engine rank
into a decode engine rank's pool.

Backends: nvshmem, cuda_ipc (GPUs on one node), shm (CPU pools on one host), tcp (anywhere),
fake (moves nothing). `probe` picks one; `create` builds it. See `nvshmem_kv.base` for the
call order and the invariants.
"""

from __future__ import annotations

from nvshmem_kv.base import KVTransport, Peer, RoomState, RoomStatus, TransportStats
from nvshmem_kv.descriptor import (
    HeadSlice,
    PoolDescriptor,
    PoolHandle,
    head_range,
    owns_heads,
    plan_head_slices,
    writers_for,
)
from nvshmem_kv.errors import BackendUnavailable, ProtocolError, TransportError
from nvshmem_kv.probe import PROBE_ORDER, ProbeEntry, ProbeResult, probe
from nvshmem_kv.registry import availability, backend_names, create

__all__ = [
    "PROBE_ORDER",
    "BackendUnavailable",
    "HeadSlice",
    "KVTransport",
    "Peer",
    "PoolDescriptor",
    "PoolHandle",
    "ProbeEntry",
    "ProbeResult",
    "ProtocolError",
    "RoomState",
    "RoomStatus",
    "TransportError",
    "TransportStats",
    "availability",
    "backend_names",
    "create",
    "head_range",
    "owns_heads",
    "plan_head_slices",
    "probe",
    "writers_for",
]
