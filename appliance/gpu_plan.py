"""Which GPUs each worker process sees, which one each of its TP ranks runs on, and where its peers are.

CUDA IPC and NVSHMEM over P2P need the destination GPU visible in the sending process, so a worker
that pushes KV sees its own GPUs first (TP rank ``r`` on local index ``r``), then the GPUs of every
pool it pushes into: in ``disagg`` mode a prefill worker pushes into every decode worker; in ``auto``
mode every engine may hand over (or move decodes) to every other one. A GPU shared by both sides
appears once. Pure: no CUDA call, so it is tested on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RANK_DEVICES_ENV = "PDBOX_RANK_DEVICES"      # local device index of each TP rank of the worker
PEER_DEVICES_ENV = "PDBOX_PEER_DEVICES"      # name=local indices of each pool the worker pushes into


@dataclass(frozen=True)
class GpuGroup:
    """One engine's GPUs as the user named them (``--prefill-gpus 0-3`` split by TP)."""

    name: str
    leaning: str          # prefill | decode | unified
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class PeerDevices:
    """A pool this worker pushes into: the peer worker and its GPUs' indices in this worker's view."""

    name: str
    local: tuple[int, ...]


@dataclass(frozen=True)
class WorkerGpus:
    name: str
    own: tuple[int, ...]            # the user's GPU ids, one per TP rank
    visible: tuple[str, ...]        # CUDA_VISIBLE_DEVICES, in order: own first, then peers' GPUs
    peers: tuple[PeerDevices, ...]

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.visible)

    @property
    def rank_devices(self) -> tuple[int, ...]:
        """Local device index of each TP rank (``PDBOX_RANK_DEVICES``)."""
        return tuple(range(len(self.own)))

    def peer_env(self) -> str:
        """``decode-0=4;decode-1=5`` (``PDBOX_PEER_DEVICES``): where each peer pool lives, locally."""
        return ";".join(f"{p.name}={','.join(map(str, p.local))}" for p in self.peers)


def pushes_to(mode: str, src: GpuGroup, dst: GpuGroup) -> bool:
    """Whether ``src`` writes KV into ``dst``'s pool in this mode."""
    if src.name == dst.name or mode == "unified":
        return False
    if mode == "auto":
        return True
    return src.leaning == "prefill" and dst.leaning == "decode"


def plan_gpus(groups: Sequence[GpuGroup], mode: str, parent_visible: Sequence[str] | None = None
              ) -> tuple[WorkerGpus, ...]:
    """Every worker's view. ``parent_visible`` is the launcher's own ``CUDA_VISIBLE_DEVICES`` (ids
    the user gives index into it, as CUDA does); None when it is unset."""
    def physical(i: int) -> str:
        if parent_visible is None:
            return str(i)
        if i >= len(parent_visible):
            raise ValueError(f"GPU {i} is not among the {len(parent_visible)} visible here "
                             f"(CUDA_VISIBLE_DEVICES={','.join(parent_visible)})")
        return parent_visible[i]

    plans = []
    for g in groups:
        order = list(g.gpus)
        peers = []
        for other in groups:
            if not pushes_to(mode, g, other):
                continue
            for gpu in other.gpus:
                if gpu not in order:
                    order.append(gpu)
            peers.append(PeerDevices(other.name, tuple(order.index(gpu) for gpu in other.gpus)))
        plans.append(WorkerGpus(g.name, tuple(g.gpus), tuple(physical(i) for i in order), tuple(peers)))
    return tuple(plans)


def parse_visible(value: str | None) -> tuple[str, ...] | None:
    """The launcher's ``CUDA_VISIBLE_DEVICES`` as a list (ids or UUIDs); None when unset."""
    if value is None:
        return None
    return tuple(p.strip() for p in value.split(",") if p.strip())
