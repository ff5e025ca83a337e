"""Tensor parallelism across processes: rank 0 schedules and broadcasts each step's plan.

The plan travels as int64 tensors over torch.distributed (gloo on CPU, NCCL on CUDA); nothing is
pickled. Ranks > 0 run `tp_worker.tp_worker_main` in their own process until rank 0 says stop.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from appliance.config import RankInfo

CMD_STOP = 0
CMD_FORWARD = 1

# Where command tensors live: NCCL moves only CUDA tensors (on the rank's own device), gloo CPU ones.
_comm_device = torch.device("cpu")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def group_backend(device: torch.device, nccl_available: bool) -> str:
    return "nccl" if device.type == "cuda" and nccl_available else "gloo"


def comm_device(backend: str, device: torch.device) -> torch.device:
    """The device command tensors are broadcast from: the rank's GPU under NCCL, else the CPU."""
    if backend == "nccl":
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"NCCL needs the rank's own CUDA device with its index, got {device}")
        return device
    return torch.device("cpu")


def init_group(rank: RankInfo, device: torch.device, timeout_s: float = 60.0) -> None:
    """Join the engine's process group (one per process). ``device`` is this rank's bound device."""
    import datetime

    global _comm_device
    backend = group_backend(device, dist.is_nccl_available())
    _comm_device = comm_device(backend, device)
    dist.init_process_group(
        backend, init_method=rank.dist_init, rank=rank.rank, world_size=rank.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,  # NCCL binds this rank's own GPU
    )


def all_reduce(x: torch.Tensor) -> None:
    dist.all_reduce(x)


def broadcast_command(cmd: int, payload: torch.Tensor | None = None) -> None:
    """Rank 0: send a command header (and its int64 payload) to every other rank."""
    size = 0 if payload is None else int(payload.numel())
    dist.broadcast(torch.tensor([cmd, size], dtype=torch.int64, device=_comm_device), src=0)
    if payload is not None:
        dist.broadcast(payload.to(_comm_device), src=0)


def attach_bytes(flat: torch.Tensor, extra: bytes) -> torch.Tensor:
    """Append ``extra`` bytes (one int64 each, then their count) to an int64 payload."""
    tail = torch.frombuffer(bytearray(extra), dtype=torch.uint8).to(flat.device, torch.int64) if extra else flat[:0]
    return torch.cat([flat, tail, torch.tensor([len(extra)], dtype=torch.int64, device=flat.device)])


def detach_bytes(payload: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    n = int(payload[-1])
    body = payload[:-1]
    if n == 0:
        return body, b""
    return body[:-n], bytes(body[-n:].to("cpu", torch.uint8).tolist())


def receive_command() -> tuple[int, torch.Tensor | None]:
    header = torch.empty(2, dtype=torch.int64, device=_comm_device)
    dist.broadcast(header, src=0)
    cmd, size = (int(x) for x in header.tolist())
    if size == 0:
        return cmd, None
    payload = torch.empty(size, dtype=torch.int64, device=_comm_device)
    dist.broadcast(payload, src=0)
    return cmd, payload


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so no rank outlives its engine."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
