"""Register a worker with a router (Slurm mode): the router health-checks and routes to it."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any


async def register_worker(router_url: str, worker: Any, url: str) -> None:
    from slurm.register import register

    info = _info(worker, url)
    await asyncio.to_thread(register, router_url, worker.cfg.token, info)


async def deregister_worker(router_url: str, worker: Any, url: str) -> None:
    from slurm.register import deregister

    try:
        await asyncio.to_thread(deregister, router_url, worker.cfg.token, url=url, role=worker.cfg.role)
    except Exception:  # the router may be gone already; it drops dead workers by health checks
        pass


def _info(worker: Any, url: str) -> Any:
    from slurm.messages import WorkerInfo

    return WorkerInfo(role=worker.cfg.role, url=url, rank=0, tp=worker.cfg.engine.tp_size,
                      job_id=os.environ.get("SLURM_JOB_ID", ""), node=socket.gethostname(), pid=os.getpid())
