"""Tensor parallelism across processes: rank 0 schedules and broadcasts each step's plan.

The plan travels as int64 tensors over torch.distributed (gloo on CPU, NCCL on CUDA); nothing is
pickled. Ranks > 0 run `tp_worker.tp_worker_main` in their own process until rank 0 says stop.
Each process joins its engine's group once (:func:`init_group`) and keeps the :class:`TpGroup` it gets.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from appliance.config import TP_BACKENDS, RankInfo
from appliance.engine.host_copy import to_device
from appliance.engine.rank_device import enter_device

CMD_STOP = 0
CMD_FORWARD = 1
CMD_ABANDON = 2  # a prefill engine's rooms that its ranks stop writing (JSON bytes)
CMD_PING = 3  # nothing to do: rank 0 is idle (`Keepalive`)
CMD_OPEN = 4  # a prefill engine's new rooms, which its ranks ask their decode pools for ahead (JSON bytes)

TP_JOIN_S = 600.0  # the rendezvous: every rank loads its checkpoint first (a large model takes minutes)
JOIN_POLL_S = 2.0  # how often rank 0, waiting at the rendezvous, asks whether a rank died loading
KEEPALIVE_S = 10.0  # rank 0 pings this often while it sends nothing else (at most a sixth of the timeout)
_JOINED, _ALL_JOINED = "pdbox/tp-joined", "pdbox/tp-all-joined"  # the rendezvous' store keys
log = logging.getLogger("pdbox.tp")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def group_backend(device: torch.device, nccl_available: bool, choice: str = "auto") -> str:
    """The collective backend: ``auto`` is NCCL on CUDA (where built) and gloo otherwise. Gloo also moves
    CUDA tensors (through the host), which lets the ranks of one engine share a GPU for checks."""
    if choice not in TP_BACKENDS:
        raise ValueError(f"tp_backend must be one of {', '.join(TP_BACKENDS)}, got {choice!r}")
    if choice == "nccl" and not (device.type == "cuda" and nccl_available):
        raise ValueError(f"tp_backend nccl needs CUDA and a torch built with NCCL (device {device}, "
                         f"NCCL {'available' if nccl_available else 'not available'})")
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" and nccl_available else "gloo"


def comm_device(backend: str, device: torch.device) -> torch.device:
    """The device command tensors are broadcast from: the rank's GPU under NCCL, else the CPU."""
    if backend == "nccl":
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"NCCL needs the rank's own CUDA device with its index, got {device}")
        return device
    return torch.device("cpu")


@dataclass(frozen=True)
class TpGroup:
    """This process's membership of its engine's TP group: the backend, and where commands travel."""

    backend: str
    comm_device: torch.device

    def broadcast_command(self, cmd: int, payload: torch.Tensor | None = None) -> None:
        """Rank 0: send a command header (and its int64 payload) to every other rank. Host values travel
        through pinned memory (`host_copy`): on NCCL a pageable copy would wait for the whole stream."""
        size = 0 if payload is None else int(payload.numel())
        dist.broadcast(to_device([cmd, size], self.comm_device, torch.int64), src=0)
        if payload is not None:
            dist.broadcast(to_device(payload, self.comm_device), src=0)

    def receive_command(self) -> tuple[int, torch.Tensor | None]:
        """Ranks > 0: the next command from rank 0 (blocks until it comes)."""
        header = torch.empty(2, dtype=torch.int64, device=self.comm_device)
        dist.broadcast(header, src=0)
        cmd, size = (int(x) for x in header.tolist())
        if size == 0:
            return cmd, None
        payload = torch.empty(size, dtype=torch.int64, device=self.comm_device)
        dist.broadcast(payload, src=0)
        return cmd, payload


def init_group(rank: RankInfo, device: torch.device, choice: str, timeout_s: float, join_s: float = TP_JOIN_S,
               store: dist.Store | None = None, ranks_failed: Callable[[], str | None] | None = None) -> TpGroup:
    """Join the engine's process group (once per process). ``device`` is this rank's bound device;
    ``choice`` the configured backend (`EngineConfig.tp_backend`); ``timeout_s`` bounds each collective
    (`EngineConfig.tp_timeout_s`), ``join_s`` the rendezvous, where rank 0 waits for ranks still loading;
    ``ranks_failed`` (rank 0): why a rank cannot come any more (its process exited), asked while it waits."""
    backend = group_backend(device, dist.is_nccl_available(), choice)
    group = TpGroup(backend, comm_device(backend, device))
    timeout = datetime.timedelta(seconds=timeout_s)
    url = urlparse(rank.dist_init)
    if store is None and url.scheme == "tcp" and url.hostname and url.port:
        store = dist.TCPStore(url.hostname, url.port, rank.world_size, is_master=rank.rank == 0,
                              timeout=datetime.timedelta(seconds=join_s))
    if store is not None:  # NOTE: meet first, under the join's deadline: the group's own set-up waits only timeout_s
        _meet(store, rank.world_size, join_s, ranks_failed)
    dist.init_process_group(
        backend, init_method=None if store else rank.dist_init, store=store, rank=rank.rank,
        world_size=rank.world_size, timeout=timeout,
        device_id=device if backend == "nccl" else None,  # NCCL binds this rank's own GPU
    )
    return group


def _meet(store: dist.Store, world_size: int, join_s: float, ranks_failed: Callable[[], str | None] | None) -> None:
    """Wait until every rank has come (a counter in the store), in slices: a rank whose process exited
    while loading ends the wait at once, not after ``join_s``."""
    if store.add(_JOINED, 1) == world_size:
        store.set(_ALL_JOINED, "1")
    end = time.monotonic() + join_s
    while True:
        try:
            store.wait([_ALL_JOINED], datetime.timedelta(seconds=max(0.1, min(JOIN_POLL_S, end - time.monotonic()))))
            return
        except dist.DistStoreError:
            why = ranks_failed() if ranks_failed is not None else None
            if why is not None:
                raise RuntimeError(f"the tensor-parallel group cannot form: {why}") from None
            if time.monotonic() >= end:
                raise


def master_store(world_size: int, join_s: float = TP_JOIN_S) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening from now on a port the OS picked: the ranks load their
    checkpoints before they meet (minutes for a large model), and a port picked free but bound only then
    could be taken meanwhile. The other ranks connect to ``tcp://127.0.0.1:<its port>``."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=join_s))


class Keepalive:
    """Rank 0's guard over its group's command stream. A follower waits for the next command inside a
    collective, which fails after the group's timeout: an engine idle that long (no requests; its own
    start-up after the group formed; a user's pause between ``LLM.generate`` calls) lost its followers.
    While rank 0 sends nothing, a thread pings them every ``every_s``. `step` holds the lock for a command
    and every collective of its step, so a ping never lands between them."""

    def __init__(self, group: TpGroup, device: torch.device, every_s: float = KEEPALIVE_S) -> None:
        self.group, self.device, self.every_s = group, device, every_s
        self.lock = threading.Lock()
        self.sent_at = time.monotonic()
        self.error: str | None = None  # why the group is broken (a step raised inside it; a ping failed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdbox-tp-keepalive", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around a command and its step's collectives (engine thread). One that raises leaves the group
        broken: the other ranks may be waiting inside a collective rank 0 will not join."""
        with self.lock:
            try:
                yield
            except BaseException as exc:
                self.error = self.error or f"a tensor-parallel step failed: {type(exc).__name__}: {exc}"
                raise
            finally:
                self.sent_at = time.monotonic()

    def _run(self) -> None:
        enter_device(self.device)  # NCCL: the ping goes out on this rank's GPU
        while not self._stop.wait(self.every_s / 4):
            if time.monotonic() - self.sent_at < self.every_s or not self.lock.acquire(blocking=False):
                continue
            try:
                if self._stop.is_set() or self.error is not None:  # a broken group takes no more commands
                    return
                self.group.broadcast_command(CMD_PING)
                self.sent_at = time.monotonic()
            except Exception as exc:  # gloo: a follower is gone (NCCL's ping is asynchronous: its watchdog says)
                self.error = self.error or f"a tensor-parallel rank stopped answering: {type(exc).__name__}: {exc}"
                log.error("TP keepalive: %s", self.error)
                return
            finally:
                self.lock.release()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)


def leave_group(group: TpGroup, broken: bool) -> None:
    """Tear this process's group down. A broken NCCL group is aborted (``ncclCommAbort``): a destroy
    finalizes the communicators, waiting for collectives the other ranks will never join."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # NOTE: private; torch >= 2.5
    if broken and group.backend == "nccl" and abort is not None:
        abort()
    else:
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> None:
    dist.all_reduce(x)


def attach_bytes(flat: torch.Tensor, extra: bytes) -> torch.Tensor:
    """Append ``extra`` bytes (one int64 each, then their count) to an int64 payload, in one copy from
    pinned host memory where ``flat`` is on a GPU (no wait for its stream)."""
    tail = torch.empty(len(extra) + 1, dtype=torch.int64)
    if extra:
        tail[:-1] = torch.frombuffer(bytearray(extra), dtype=torch.uint8)
    tail[-1] = len(extra)
    return torch.cat([flat, to_device(tail, flat.device)])


def detach_bytes(payload: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    n = int(payload[-1])
    body = payload[:-1]
    if n == 0:
        return body, b""
    return body[:-n], bytes(body[-n:].to("cpu", torch.uint8).tolist())


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so no rank outlives its engine."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
