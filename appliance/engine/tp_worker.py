"""The processes of tensor-parallel ranks > 0: how rank 0 starts them and what each runs.

Each builds its shard of the model (`ModelRunner`), follows rank 0's step commands (`tp`), and on a
prefill engine pushes its own KV head slices to the decode pools (`FollowerHandoff`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass

import torch

from appliance.config import EngineConfig, RankInfo
from appliance.engine.tp import die_with_parent, master_store


@dataclass(frozen=True)
class TPLaunch:
    """What a rank > 0 process needs to build its shard of the engine."""

    model: str | None
    config: EngineConfig
    rank: RankInfo
    transport: str = ""
    transport_opts: tuple[tuple[str, str], ...] = ()


def tp_worker_main(launch: TPLaunch) -> None:
    """Entry point of a rank > 0 process: build the runner, then follow rank 0's commands."""
    from appliance.engine.runner import ModelRunner  # in the spawned process only

    if launch.config.threads:
        torch.set_num_threads(launch.config.threads)
    die_with_parent()
    joined: list = []  # nvshmem: the transport this rank joined the job with, inside its pool allocation
    kv_allocator = None
    if launch.transport == "nvshmem":
        from appliance.nvshmem_job import NVSHMEM_ENV, PeJob, symmetric_allocator

        job = PeJob.from_env(os.environ)
        if job is None:
            raise ValueError(f"the nvshmem transport needs {NVSHMEM_ENV} from the launcher")
        kv_allocator = symmetric_allocator(job, launch.rank.rank, dict(launch.transport_opts), joined.append)
    runner = ModelRunner(launch.model, launch.config, launch.rank, kv_allocator=kv_allocator)
    sender = None
    if launch.transport:
        from appliance.engine.handoff import FollowerHandoff

        sender = FollowerHandoff(launch.transport, dict(launch.transport_opts), runner,
                                 transport=joined[0] if joined else None)
        runner.follower_hook = sender.plan_step
        runner.follower_abandon = sender.abandon_rooms
        runner.follower_open = sender.open_rooms
    try:
        runner.follow()
    finally:
        if sender is not None:
            sender.close()
        runner.close()


def spawn_tp_workers(model: str | None, cfg: EngineConfig, transport: str = "",
                     transport_opts: dict[str, str] | None = None
                     ) -> tuple[str, list[mp.process.BaseProcess], torch.distributed.TCPStore]:
    """Start ranks 1..tp-1 (spawn, not fork: torch state must not be inherited); also rank 0's rendezvous
    store, which they connect to (`tp.master_store`)."""
    store = master_store(cfg.tp_size)
    init = f"tcp://127.0.0.1:{store.port}"
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(1, cfg.tp_size):
        launch = TPLaunch(model, cfg, RankInfo(rank=r, world_size=cfg.tp_size, dist_init=init), transport,
                          tuple(sorted((transport_opts or {}).items())))
        p = ctx.Process(target=tp_worker_main, args=(launch,), name=f"pdbox-tp{r}", daemon=True)
        p.start()
        procs.append(p)
    return init, procs, store
