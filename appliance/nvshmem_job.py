"""One NVSHMEM job across the appliance: every prefill and decode TP rank is a PE.

The launcher numbers the PEs (workers in start order, each worker's ranks back to back) and tells each
worker its first PE, the job size, the per-PE symmetric allocation and the unique-id file in the run's
own log folder (``PDBOX_NVSHMEM``). PE 0 makes the unique id and publishes it there; every other PE
waits for it. Each rank then builds ``create("nvshmem", pe=..., npes=..., uid=..., symmetric_bytes=...)``
and allocates its KV pool in the symmetric heap (a collective: every PE, same size).

NOTE: a PE cannot rejoin a running NVSHMEM job, so a restarted worker cannot either; the launcher's
probe therefore never picks nvshmem by itself (``--transport nvshmem`` asks for it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

NVSHMEM_ENV = "PDBOX_NVSHMEM"


def plan_pes(workers: Sequence[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """``[(name, tp), ...]`` -> (first PE of each worker, number of PEs)."""
    base: dict[str, int] = {}
    npes = 0
    for name, tp in workers:
        if tp < 1:
            raise ValueError(f"{name}: TP size must be >= 1, got {tp}")
        if name in base:
            raise ValueError(f"worker {name!r} is listed twice")
        base[name] = npes
        npes += tp
    return base, npes


@dataclass(frozen=True)
class PeJob:
    """What one worker needs to join the job: its ranks are PEs ``pe_base .. pe_base + tp - 1``."""

    pe_base: int
    npes: int
    uid_file: str
    symmetric_bytes: int

    def __post_init__(self) -> None:
        if not 0 <= self.pe_base < self.npes:
            raise ValueError(f"first PE {self.pe_base} is outside a job of {self.npes} PEs")
        if self.symmetric_bytes <= 0:
            raise ValueError(f"symmetric_bytes must be > 0, got {self.symmetric_bytes}")
        if not self.uid_file:
            raise ValueError("the unique-id file must be named")

    def pe(self, tp_rank: int) -> int:
        pe = self.pe_base + tp_rank
        if pe >= self.npes:
            raise ValueError(f"TP rank {tp_rank} of the worker at PE {self.pe_base} is past the job's {self.npes} PEs")
        return pe

    def to_env(self) -> dict[str, str]:
        return {NVSHMEM_ENV: json.dumps({"pe_base": self.pe_base, "npes": self.npes, "uid_file": self.uid_file,
                                         "symmetric_bytes": self.symmetric_bytes})}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PeJob | None:
        raw = env.get(NVSHMEM_ENV, "")
        return cls(**json.loads(raw)) if raw else None


def plan_job(workers: Sequence[tuple[str, int]], run_dir: Path, run_id: str, symmetric_bytes: int
             ) -> dict[str, PeJob]:
    """Each worker's `PeJob`; the unique id goes to a file named for this run in its own folder."""
    base, npes = plan_pes(workers)
    uid_file = str(Path(run_dir) / f"nvshmem-uid-{run_id}.bin")
    return {name: PeJob(b, npes, uid_file, symmetric_bytes) for name, b in base.items()}


def publish_uid(path: str, uid: bytes) -> None:
    """PE 0: write the unique id atomically (readers never see a partial file), owner-only."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, uid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def wait_uid(path: str, timeout_s: float, poll_s: float = 0.05) -> bytes:
    """Other PEs: the unique id once PE 0 has published it."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            data = Path(path).read_bytes()
            if data:
                return data
        except FileNotFoundError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"no NVSHMEM unique id at {path} after {timeout_s:.0f} s: did PE 0 start?")
        time.sleep(poll_s)


def transport_options(job: PeJob, tp_rank: int, make_uid: Callable[[], bytes], timeout_s: float = 300.0
                      ) -> dict[str, object]:
    """The nvshmem backend's options for one rank: PE 0 makes and publishes the uid, others read it."""
    pe = job.pe(tp_rank)
    if pe == 0:
        uid = make_uid()
        publish_uid(job.uid_file, uid)
    else:
        uid = wait_uid(job.uid_file, timeout_s)
    return {"pe": pe, "npes": job.npes, "uid": uid, "symmetric_bytes": job.symmetric_bytes}


def alloc_desc(shape: Sequence[int], dtype: object):
    """A descriptor with ``shape`` and ``dtype`` for the symmetric allocation alone (bytes and shape;
    the rank's real head slice is described where it connects or registers)."""
    from nvshmem_kv import PoolDescriptor

    _, layers, pages, page_size, heads, head_dim = (int(s) for s in shape)
    return PoolDescriptor(str(dtype).removeprefix("torch."), layers, pages, page_size, heads, heads, head_dim)


def create_transport(job: PeJob, tp_rank: int, device: object, opts: Mapping[str, object],
                     make_uid: Callable[[], bytes] | None = None):
    """Join the job as this rank's PE: ``nvshmem_kv.create("nvshmem", pe=, npes=, uid=, symmetric_bytes=)``.

    Call it after the rank's TP group has formed (NVSHMEM init blocks until every PE joins)."""
    import nvshmem_kv

    if make_uid is None:
        from nvshmem_kv.backends.nvshmem import make_unique_id as make_uid
    return nvshmem_kv.create("nvshmem", device=device, **dict(opts), **transport_options(job, tp_rank, make_uid))


def symmetric_allocator(job: PeJob, tp_rank: int, opts: Mapping[str, object], on_join: Callable[[object], None],
                        make_uid: Callable[[], bytes] | None = None):
    """A ``kv_allocator`` for `ModelRunner` that joins the job and allocates the pool in the symmetric
    heap (collective: every PE does, once); ``on_join`` receives the transport."""
    def allocate(shape, dtype, device):
        transport = create_transport(job, tp_rank, device, opts, make_uid)
        on_join(transport)
        return transport.allocate_pool(alloc_desc(shape, dtype), device)

    return allocate
