"""Which device each tensor-parallel rank of an engine runs on.

A worker sees the GPUs the launcher put in its ``CUDA_VISIBLE_DEVICES`` (its own first, then any
peer GPUs it pushes KV into, see :mod:`appliance.gpu_plan`); ``PDBOX_RANK_DEVICES`` names the local
index of each rank's own GPU. Without it, rank ``r`` takes local index ``r``. Each rank binds its
device (``torch.cuda.set_device``) before it joins the NCCL group: NCCL refuses two ranks on one GPU.
Gloo does not (it moves CUDA tensors through the host): with ``share_gpu`` every rank of an engine
runs on its one named GPU, which is how TP runs on a one-GPU machine's checks.
"""

from __future__ import annotations

import os

import torch

from appliance.config import RankInfo
from appliance.gpu_plan import RANK_DEVICES_ENV


def parse_rank_devices(text: str) -> tuple[int, ...]:
    """``"0,1,2,3"`` -> ``(0, 1, 2, 3)``; empty text -> ``()``."""
    out = tuple(int(p) for p in text.split(",") if p.strip())
    if any(i < 0 for i in out):
        raise ValueError(f"{RANK_DEVICES_ENV} must list local device indices >= 0, got {text!r}")
    return out


def rank_device(device: str, rank: int, world_size: int, rank_devices: tuple[int, ...] = (),
                share_gpu: bool = False) -> str:
    """The device string of ``rank``: unchanged off CUDA; ``cuda:<index>`` on CUDA.

    An explicit ``cuda:N`` is kept for a single-rank engine; a TP engine takes ``rank_devices[rank]``
    (or ``rank`` when none are planned). Ranks of one engine never share a GPU, unless ``share_gpu``
    (a gloo group): then, with no plan, every rank takes the one named GPU.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return device
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a TP group of {world_size}")
    if (world_size == 1 or share_gpu) and (dev.index is not None or not rank_devices):
        return f"cuda:{dev.index or 0}"
    if rank_devices:
        if len(rank_devices) < world_size:
            raise ValueError(f"{world_size} TP ranks but only {len(rank_devices)} planned devices {rank_devices}")
        if not share_gpu and len(set(rank_devices[:world_size])) != world_size:
            raise ValueError(f"TP ranks would share a GPU: planned devices {rank_devices[:world_size]}")
        return f"cuda:{rank_devices[rank]}"
    return f"cuda:{rank}"


def bind_device(device: str, rank: RankInfo, env: dict[str, str] | None = None,
                share_gpu: bool = False) -> torch.device:
    """This rank's device; on CUDA also made the current one (before any NCCL or CUDA state)."""
    chosen = torch.device(rank_device(device, rank.rank, rank.world_size, _planned(env), share_gpu))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return chosen


def lead_device(device: str, world_size: int, env: dict[str, str] | None = None,
                share_gpu: bool = False) -> str | None:
    """The GPU of an engine's TP rank 0, which drives it and copies its KV (``cuda:N``), without making it
    current; None off CUDA. A GPU transport built before the engine binds its device takes this, not
    the current device (a copy stream on another GPU would order nothing against the engine's work)."""
    if not device.startswith("cuda"):
        return None
    return rank_device(device, 0, world_size, _planned(env), share_gpu)


def enter_device(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device (nothing on CPU). The current device is a
    thread's own: a thread other than the one that bound it starts on cuda:0, where torch ops still go
    to their tensors' device but Triton launches on the current device and its stream."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _planned(env: dict[str, str] | None) -> tuple[int, ...]:
    """The launcher's plan of each TP rank's local device (``PDBOX_RANK_DEVICES``; ``env`` None: this process's)."""
    return parse_rank_devices((os.environ if env is None else env).get(RANK_DEVICES_ENV, ""))
