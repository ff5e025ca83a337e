"""The run directory of one `pdbox slurm up` and its state file `run.json`.

    <runs root>/<run id>/
        run.json        RunState: router, submitted jobs, status (rewritten atomically)
        token           the cluster token (mode 600)
        router.log      router.port
        submitit/<pool>/   submitit's pickles and per-task logs (%j_%t_log.out / .err)
    <runs root>/latest -> <run id>

The runs root must be on a filesystem the Slurm nodes share (submitit's folder lives in it): by default
~/.pdbox/runs, or $PDBOX_RUN_ROOT.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Literal

import msgspec

RUN_ROOT_ENV = "PDBOX_RUN_ROOT"
STATE_FILE = "run.json"

RunStatus = Literal["starting", "ready", "failed", "down"]


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    pool: str
    role: str
    job_id: str
    num_tasks: int


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    created: float
    status: RunStatus = "starting"
    router_url: str = ""
    router_pid: int = 0
    jobs: tuple[JobRecord, ...] = ()

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]


def runs_root() -> Path:
    return Path(os.environ.get(RUN_ROOT_ENV) or Path.home() / ".pdbox" / "runs")


def new_run_dir(root: Path | None = None) -> Path:
    """Create an empty run directory (mode 700: it holds the token) and point `latest` at it."""
    root = root if root is not None else runs_root()
    root.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    run_dir = root / run_id
    run_dir.mkdir(mode=0o700)
    latest = root / "latest"
    tmp = root / f".latest-{run_id}"
    tmp.symlink_to(run_id)
    tmp.replace(latest)
    return run_dir


def resolve_run_dir(run: str | None, root: Path | None = None) -> Path:
    """`run` is a run id, a path to a run directory, or None for the latest run."""
    root = root if root is not None else runs_root()
    if run and Path(run).is_dir():
        return Path(run)
    run_dir = root / (run or "latest")
    if not (run_dir / STATE_FILE).exists():
        raise FileNotFoundError(f"no pdbox Slurm run at {run_dir} (is {RUN_ROOT_ENV} right?)")
    return run_dir.resolve()


def load(run_dir: Path) -> RunState:
    return msgspec.json.decode((run_dir / STATE_FILE).read_bytes(), type=RunState)


def save(run_dir: Path, state: RunState) -> None:
    tmp = run_dir / f".{STATE_FILE}.tmp"
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(state)) + b"\n")
    tmp.replace(run_dir / STATE_FILE)


def write_token(run_dir: Path) -> str:
    token = secrets.token_urlsafe(32)
    path = run_dir / "token"
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def read_token(run_dir: Path) -> str:
    return (run_dir / "token").read_text().strip()
