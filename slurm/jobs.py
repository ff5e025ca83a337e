"""submitit plumbing for pdbox pools: a `PoolSpec` becomes one Slurm job whose every task runs one
worker rank (see `slurm.task.PoolTask`), plus the few squeue/sacct/scancel calls the CLI needs.

    spec = PoolSpec(name="decode", role="decode", nodes=1, tasks_per_node=2, gpus_per_node=2)
    job = submit_pool(spec, argv, run_dir, router_url=url, token=token)   # a submitit.Job
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from slurm.task import ROLE_ENV, ROUTER_URL_ENV, TOKEN_ENV, PoolTask

if TYPE_CHECKING:
    import submitit

Role = Literal["prefill", "decode", "router"]

# squeue/sacct states of a job that may still serve (PREEMPTED and REQUEUED: it comes back)
LIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
     "SUSPENDED", "PREEMPTED", "STAGE_OUT", "SIGNALING"}
)


@dataclass(frozen=True)
class PoolSpec:
    """One pool of pdbox engine ranks, submitted as one Slurm job with one task per rank.

    `tp` (ranks per engine) defaults to all ranks of the pool. With several tasks per node and GPUs,
    the GPUs are split evenly between the node's tasks (Slurm's --gpus-per-task) and each task sees
    its own in CUDA_VISIBLE_DEVICES. `time_min` is Slurm's time limit in minutes; keep it above 10:
    submitit treats a preemption signal that comes after 80% of a limit (always, for limits under 10 min)
    as a time-out and requeues only `max_requeues` of those. `sbatch` adds raw options (`account`,
    `qos`, `nodelist`, `exclusive`: True, ...).
    """

    name: str
    role: Role
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    partition: str | None = None
    time_min: int = 24 * 60
    env: Mapping[str, str] = field(default_factory=dict)
    tp: int | None = None
    sbatch: Mapping[str, str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"pool name {self.name!r} must be non-empty letters, digits, '-' or '_'")
        if self.role not in ("prefill", "decode", "router"):
            raise ValueError(f"pool role must be prefill, decode or router, not {self.role!r}")
        for what in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, what) < 1:
                raise ValueError(f"{what} must be at least 1 (got {getattr(self, what)})")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0 (got {self.gpus_per_node})")
        if self.tasks_per_node > 1 and self.gpus_per_node % self.tasks_per_node:
            raise ValueError(
                f"gpus_per_node={self.gpus_per_node} does not split evenly between "
                f"tasks_per_node={self.tasks_per_node}; use a multiple of it"
            )
        if self.num_tasks % self.tp_size:
            raise ValueError(f"tp={self.tp} must divide the pool's {self.num_tasks} ranks")

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def tp_size(self) -> int:
        return self.tp if self.tp is not None else self.num_tasks

    @property
    def gpus_per_task(self) -> int | None:
        """GPUs bound to each task by Slurm, or None when every task sees all of its node's GPUs."""
        if self.tasks_per_node > 1 and self.gpus_per_node:
            return self.gpus_per_node // self.tasks_per_node
        return None


def make_executor(
    spec: PoolSpec, folder: Path, *, max_requeues: int = 3, python: str | None = None
) -> submitit.AutoExecutor:
    """A fresh submitit executor for `spec` (submitit parameters are sticky, so one per job shape)."""
    import submitit

    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues, slurm_python=python
    )
    params: dict[str, object] = {
        "name": f"pdbox-{spec.name}",
        "nodes": spec.nodes,
        "tasks_per_node": spec.tasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "timeout_min": spec.time_min,
        # JobRequeue=0 clusters would otherwise refuse `scontrol requeue` on preemption
        "slurm_additional_parameters": {"requeue": True, **spec.sbatch},
    }
    if spec.gpus_per_task:
        params["slurm_gpus_per_task"] = spec.gpus_per_task
    elif spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    if spec.partition:
        params["slurm_partition"] = spec.partition
    executor.update_parameters(**params)
    return executor


def pool_env(spec: PoolSpec, router_url: str, token: str) -> dict[str, str]:
    """The environment a pool's workers get on top of Slurm's (and the rank variables of slurm.task)."""
    return {**spec.env, ROLE_ENV: spec.role, ROUTER_URL_ENV: router_url, TOKEN_ENV: token,
            "PDBOX_TP": str(spec.tp_size), "PDBOX_POOL": spec.name}


def submit_pool(
    spec: PoolSpec,
    argv: Sequence[str],
    run_dir: Path,
    *,
    router_url: str,
    token: str,
    max_requeues: int = 3,
    stop_grace_s: float = 3.0,
) -> submitit.Job[int]:
    """Submit `spec` as one Slurm job running `argv` in every task; returns the submitit job.

    submitit's folder is `run_dir/submitit/<pool name>` (pickles, per-task logs %j_%t_log.out/.err).
    """
    folder = run_dir / "submitit" / spec.name
    executor = make_executor(spec, folder, max_requeues=max_requeues, python=sys.executable)
    task = PoolTask(argv, pool_env(spec, router_url, token), stop_grace_s=stop_grace_s)
    return executor.submit(task)


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # squeue/sacct state name: PENDING, RUNNING, ..., or UNKNOWN when Slurm forgot the job
    nodes: str = ""
    reason: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


class SlurmError(RuntimeError):
    """A Slurm client command failed."""


def _run(cmd: Sequence[str], *, check: bool = True, timeout_s: float = 30.0) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        if check:
            raise SlurmError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
        return ""
    return out.stdout


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """Current state of each job: squeue for jobs Slurm still holds, sacct for the others."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    states: dict[str, JobState] = {}
    # all of our jobs rather than `-j ids`: squeue fails outright when one id is no longer known
    for line in _run(["squeue", "-h", "--me", "-o", "%i|%T|%N|%r"]).splitlines():
        jid, state, nodes, reason = (line.split("|") + ["", "", ""])[:4]
        if jid in ids:
            states[jid] = JobState(jid, state, nodes, reason)
    missing = [j for j in ids if j not in states]
    if missing:
        out = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State,NodeList"],
                   check=False)
        for line in out.splitlines():
            jid, state, nodes = (line.split("|") + ["", ""])[:3]
            if jid in missing:  # "CANCELLED by 0" -> CANCELLED
                states[jid] = JobState(jid, state.split()[0] if state else "UNKNOWN", nodes)
    return {j: states.get(j, JobState(j, "UNKNOWN")) for j in ids}


def cancel(job_ids: Iterable[str]) -> None:
    """scancel the jobs (unknown or finished ids are ignored)."""
    ids = [str(j) for j in job_ids]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=30)


def queued(job_ids: Iterable[str]) -> list[str]:
    """The ids among `job_ids` that squeue still lists (pending, running or completing)."""
    ids = {str(j) for j in job_ids}
    if not ids:
        return []
    out = _run(["squeue", "-h", "--me", "-o", "%i"])
    return sorted({line.strip() for line in out.splitlines()} & ids)
