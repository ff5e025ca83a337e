"""What a KV pool looks like (`PoolDescriptor`), how TP ranks split its heads, and what a
decode rank publishes so that prefill ranks can write into it (`PoolHandle`).

Pool layout (one tensor per engine rank, contiguous):
    (2, num_layers, num_pages, page_size, kv_heads_local, head_dim)   index 0 = K, 1 = V

Head ownership for TP size ``t`` and ``H`` total KV heads:
    t <= H: rank r holds heads [r*H//t, (r+1)*H//t)
    t >  H: rank r holds the single head r*H//t (GQA replication: several ranks hold a copy)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from nvshmem_kv.errors import TransportError

if TYPE_CHECKING:
    import torch

# Element sizes of the dtypes a KV pool may use; keys are torch dtype names without "torch.".
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}

# Fields that must be equal on both ends of a transfer; num_pages and TP may differ.
COMPATIBLE_FIELDS: tuple[str, ...] = ("dtype", "page_size", "num_layers", "head_dim", "total_kv_heads")


def head_range(tp_rank: int, tp_size: int, total_kv_heads: int) -> tuple[int, int]:
    """Global KV heads ``[start, end)`` held by ``tp_rank`` of ``tp_size``."""
    if tp_size <= total_kv_heads:
        return tp_rank * total_kv_heads // tp_size, (tp_rank + 1) * total_kv_heads // tp_size
    head = tp_rank * total_kv_heads // tp_size
    return head, head + 1


def owns_heads(tp_rank: int, tp_size: int, total_kv_heads: int) -> bool:
    """Whether ``tp_rank`` is the one rank that writes its heads out.

    NOTE: with replication (tp_size > H) several ranks hold the same head; the LOWEST such rank
    is responsible for it, so every destination head is written exactly once.
    """
    if tp_size <= total_kv_heads or tp_rank == 0:
        return True
    return (tp_rank - 1) * total_kv_heads // tp_size != tp_rank * total_kv_heads // tp_size


@dataclass(frozen=True)
class PoolDescriptor:
    """Geometry of one engine rank's KV pool. Serializable with msgspec (JSON or msgpack)."""

    dtype: str
    num_layers: int
    num_pages: int
    page_size: int
    total_kv_heads: int
    kv_heads_local: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"dtype {self.dtype!r} is not a KV pool dtype; use one of {sorted(DTYPE_SIZES)}")
        for name in ("num_layers", "num_pages", "page_size", "total_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, tp_size={self.tp_size})")
        start, end = self.head_range
        if self.kv_heads_local != end - start:
            raise ValueError(
                f"kv_heads_local={self.kv_heads_local} but TP rank {self.tp_rank}/{self.tp_size} of "
                f"{self.total_kv_heads} KV heads holds {end - start} (heads [{start}, {end}))"
            )

    @classmethod
    def from_tensor(cls, kv: torch.Tensor, total_kv_heads: int, tp_rank: int = 0,
                    tp_size: int = 1) -> PoolDescriptor:
        """Describe an existing pool tensor of shape (2, layers, pages, page_size, heads, head_dim)."""
        if kv.dim() != 6 or kv.shape[0] != 2:
            raise ValueError("a KV pool has shape (2, layers, pages, page_size, heads, head_dim), "
                             f"got {tuple(kv.shape)}")
        _, layers, pages, page_size, heads, head_dim = (int(s) for s in kv.shape)
        return cls(str(kv.dtype).removeprefix("torch."), layers, pages, page_size, total_kv_heads, heads,
                   head_dim, tp_rank, tp_size)

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (2, self.num_layers, self.num_pages, self.page_size, self.kv_heads_local, self.head_dim)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer of K (or of V) for this rank's heads."""
        return self.page_size * self.kv_heads_local * self.head_dim * self.itemsize

    @property
    def pool_bytes(self) -> int:
        return 2 * self.num_layers * self.num_pages * self.page_bytes

    @property
    def head_range(self) -> tuple[int, int]:
        return head_range(self.tp_rank, self.tp_size, self.total_kv_heads)

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    def check_compatible(self, other: PoolDescriptor) -> None:
        """Raise `TransportError` naming every field that differs between two ends of a transfer."""
        bad = [f for f in COMPATIBLE_FIELDS if getattr(self, f) != getattr(other, f)]
        if bad:
            diffs = ", ".join(f"{f} (local={getattr(self, f)!r}, peer={getattr(other, f)!r})" for f in bad)
            raise TransportError(f"incompatible KV pools: {diffs} must match")


@dataclass(frozen=True)
class HeadSlice:
    """A run of heads that one source rank writes into one destination rank (local indices)."""

    src_start: int
    dst_start: int
    count: int


def _plan(src_rank: int, src_tp: int, dst_rank: int, dst_tp: int, total: int) -> list[HeadSlice]:
    if not owns_heads(src_rank, src_tp, total):
        return []
    s0, s1 = head_range(src_rank, src_tp, total)
    d0, d1 = head_range(dst_rank, dst_tp, total)
    lo, hi = max(s0, d0), min(s1, d1)
    return [HeadSlice(lo - s0, lo - d0, hi - lo)] if lo < hi else []


def plan_head_slices(src: PoolDescriptor, dst: PoolDescriptor) -> list[HeadSlice]:
    """Head slices that source rank ``src`` must write into destination rank ``dst`` (empty if none)."""
    if src.total_kv_heads != dst.total_kv_heads:
        src.check_compatible(dst)
    return _plan(src.tp_rank, src.tp_size, dst.tp_rank, dst.tp_size, src.total_kv_heads)


def writers_for(dst: PoolDescriptor, src_tp_size: int) -> list[int]:
    """Source TP ranks that write into (and signal) destination rank ``dst``.

    The decode rank passes ``len(writers_for(...))`` to ``expect``; a prefill rank connects to
    and signals exactly the decode ranks for which it appears here.
    """
    return [r for r in range(src_tp_size)
            if _plan(r, src_tp_size, dst.tp_rank, dst.tp_size, dst.total_kv_heads)]


class PoolHandle(msgspec.Struct, frozen=True, kw_only=True):
    """What a decode rank publishes so that prefill ranks can reach its pool.

    Plain data (JSON or msgpack through msgspec); never pickled. ``token`` is a per-pool secret
    that a sender must present on the control channel. Backend-specific fields stay at their
    defaults when unused.
    """

    backend: str
    descriptor: PoolDescriptor
    host: str
    port: int
    token: str
    run_id: str = ""
    shm_name: str = ""            # shm: POSIX shared-memory segment name (no leading "/")
    shm_offset: int = 0           # shm: byte offset of the pool inside the segment
    ipc_handle: str = ""          # cuda_ipc: base64 of the 64-byte cudaIpcMemHandle_t
    ipc_offset: int = 0           # cuda_ipc: byte offset of the pool inside the allocation
    device_uuid: str = ""         # cuda_ipc / nvshmem: GPU that owns the pool
    pe: int = -1                  # nvshmem: PE number of the decode rank
    heap_offset: int = 0          # nvshmem: byte offset of the pool inside the symmetric heap

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> PoolHandle:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.ValidationError as exc:
            raise TransportError(f"invalid PoolHandle: {exc}") from exc

    def ipc_bytes(self) -> bytes:
        return base64.b64decode(self.ipc_handle)
