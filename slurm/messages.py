"""Wire messages of the worker registration protocol (router side: `slurm.registry`, worker side:
`slurm.register`). One serializer: msgspec JSON.

    POST /internal/register     WorkerInfo             Authorization: Bearer <cluster token>
    POST /internal/deregister   Deregister             (DELETE with the same body is accepted too)
    GET  /internal/workers      list[WorkerStatus]
    GET  /internal/events       list[RegistryEvent]
"""

from __future__ import annotations

from typing import Literal

import msgspec

WorkerRole = Literal["prefill", "decode", "unified"]


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker rank tells the router about itself.

    `url` is where the rank serves (`url + /health` answers 200 when healthy); workers bind port 0 and
    publish the real port, because fake Slurm nodes share one host. `(role, job_id, rank)` identifies a
    rank across requeues: a re-registration replaces the stale entry.
    """

    role: WorkerRole
    url: str
    rank: int
    tp: int
    job_id: str
    node: str
    pid: int
    devices: str = ""  # the CUDA_VISIBLE_DEVICES the rank sees (from Slurm's allocation)
    restart: int = 0  # SLURM_RESTART_COUNT: how many times the job was requeued

    @property
    def key(self) -> str:
        return f"{self.role}/{self.job_id}/{self.rank}" if self.job_id else self.url


class Deregister(msgspec.Struct, frozen=True, kw_only=True):
    """Remove a worker, named by its url or by (role, job_id, rank). A job wrapper that outlives its
    worker uses the second form, since it does not know the worker's port."""

    url: str = ""
    role: WorkerRole | None = None
    job_id: str = ""
    rank: int = -1

    def matches(self, info: WorkerInfo) -> bool:
        if self.url:
            return info.url == self.url
        return (info.role, info.job_id, info.rank) == (self.role, self.job_id, self.rank)


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    info: WorkerInfo
    healthy: bool
    registered_s: float  # seconds since registration
    last_ok_s: float | None  # seconds since the last successful health check


class RegistryEvent(msgspec.Struct, frozen=True, kw_only=True):
    at: float  # time.time()
    kind: Literal["register", "deregister", "drop"]
    info: WorkerInfo
    reason: str = ""
