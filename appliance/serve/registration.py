"""A worker's registration with a router (Slurm mode, `slurm.registry`): the router health-checks the
worker and routes to it until it deregisters (or stops answering).

The rank identity comes from the environment `slurm.task` sets in every Slurm task: PDBOX_RANK,
PDBOX_TP (Slurm ranks per engine; 1: this task is a whole engine), PDBOX_JOB_ID, PDBOX_NODE,
PDBOX_RESTART and Slurm's CUDA_VISIBLE_DEVICES. Outside Slurm they default to one rank-0 engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.serve.worker_config import WorkerConfig
    from slurm.messages import WorkerInfo

log = logging.getLogger("pdbox.worker")


def worker_info(role: str, url: str, environ: Mapping[str, str] | None = None) -> WorkerInfo:
    """What this worker tells the router: its role, `url` and its Slurm rank identity."""
    from slurm.messages import WorkerInfo

    env = os.environ if environ is None else environ
    return WorkerInfo(
        role=role,  # type: ignore[arg-type]
        url=url,
        rank=int(env.get("PDBOX_RANK", "0")),
        tp=int(env.get("PDBOX_TP", "1")),
        job_id=env.get("PDBOX_JOB_ID") or env.get("SLURM_JOB_ID", ""),
        node=env.get("PDBOX_NODE") or socket.gethostname(),
        pid=os.getpid(),
        devices=env.get("CUDA_VISIBLE_DEVICES", ""),
        restart=int(env.get("PDBOX_RESTART") or env.get("SLURM_RESTART_COUNT") or "0"),
    )


async def register_worker(router_url: str, cfg: WorkerConfig, url: str) -> None:
    """Register with the router at `router_url`; retries for a minute, then raises
    `slurm.register.RegistrationError` (a worker that cannot reach its router should not linger)."""
    from slurm.register import register

    info = worker_info(cfg.role, url)
    await asyncio.to_thread(register, router_url, cfg.token, info)
    log.info("registered with %s as %s", router_url, info.key)


async def deregister_worker(router_url: str, cfg: WorkerConfig, url: str) -> None:
    """Best effort and quick: the router drops a silent worker by its health checks anyway."""
    from slurm.register import deregister

    if not await asyncio.to_thread(deregister, router_url, cfg.token, url=url):
        log.warning("the router at %s did not confirm the deregistration of %s", router_url, url)
