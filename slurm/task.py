"""What runs in each Slurm task of a pdbox pool: a thin supervisor around one worker process.

The supervisor
* derives the rank environment from Slurm's (`worker_env`): `SLURM_PROCID` -> `PDBOX_RANK`,
  `SLURM_LOCALID` -> `PDBOX_LOCAL_RANK`, ...; `CUDA_VISIBLE_DEVICES` is left as Slurm set it from the
  allocation (per task when the pool asks for GPUs per task);
* starts the worker (which registers itself with the router) and forwards its exit code;
* on SIGTERM / SIGINT / SIGUSR2 stops the worker (SIGTERM, then SIGKILL after `stop_grace_s`; the worker
  deregisters itself) and deregisters the rank on its behalf in case it could not.

The worker argv may name the task's variables, `$PDBOX_NODE` or `${SLURM_PROCID}` (any PDBOX_* or
SLURM_* name; see `expand_argv`): the argv is written once per pool on the submit host, but the node a
rank serves on is only known in the task.

`PoolTask` is the submitit form (checkpointable: on preemption submitit's USR2 handler requeues the job
and the requeued job starts a fresh worker); `python -m slurm.task -- ARGV...` is the plain form, used
by the sbatch script of `slurm.script`.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from slurm import register

ROUTER_URL_ENV = "PDBOX_ROUTER_URL"
TOKEN_ENV = "PDBOX_CLUSTER_TOKEN"
ROLE_ENV = "PDBOX_ROLE"

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The PDBOX_* rank variables, derived from the Slurm task environment `environ`.

    PDBOX_RANK (SLURM_PROCID), PDBOX_LOCAL_RANK (SLURM_LOCALID), PDBOX_WORLD_SIZE (SLURM_NTASKS),
    PDBOX_NODE (SLURMD_NODENAME: the Slurm node name, which resolves on the cluster),
    PDBOX_JOB_ID (SLURM_JOB_ID), PDBOX_RESTART (SLURM_RESTART_COUNT). PDBOX_TP defaults to the world size.
    """
    world = environ.get("SLURM_NTASKS", "1")
    return {
        "PDBOX_RANK": environ.get("SLURM_PROCID", "0"),
        "PDBOX_LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "PDBOX_WORLD_SIZE": world,
        "PDBOX_TP": environ.get("PDBOX_TP", world),
        "PDBOX_NODE": environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "PDBOX_JOB_ID": environ.get("SLURM_JOB_ID", ""),
        "PDBOX_RESTART": environ.get("SLURM_RESTART_COUNT", "0"),
    }


_VAR = re.compile(r"\$(\{)?((?:PDBOX|SLURM)_[A-Z0-9_]*[A-Z0-9])(?(1)\})")


def expand_argv(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Replace `$NAME` and `${NAME}` for PDBOX_* and SLURM_* names set in `env`; anything else (other
    names, unset ones) stays as written."""
    return [_VAR.sub(lambda m: env.get(m.group(2), m.group(0)), arg) for arg in argv]


def _die_with_parent() -> None:
    # The worker must not outlive its supervisor (a SIGKILLed supervisor would leave an orphan that
    # Slurm's proctrack/linuxproc no longer sees as part of the job).
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Runs one worker process; `run()` returns its exit code or the stop signal that ended it."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], stop_grace_s: float = 3.0) -> None:
        if not argv:
            raise ValueError("the worker command (argv) is empty")
        self.argv = list(argv)
        self.env = dict(env)
        self.stop_grace_s = stop_grace_s
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        self._wake = threading.Event()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only record it: the main loop does the work (no waitpid inside a signal handler).
        if self.stop_signal is None:
            self.stop_signal = signum
        self._wake.set()

    def start(self) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.child = subprocess.Popen(expand_argv(self.argv, self.env), env=self.env, preexec_fn=_die_with_parent)

    def wait(self) -> int | None:
        """Block until the worker exits (returns its code) or a stop signal arrives (returns None)."""
        assert self.child is not None, "start() first"
        while self.stop_signal is None:
            code = self.child.poll()
            if code is not None:
                # Slurm signals every process of the step, so a worker that just exited is often
                # answering a stop signal that is on its way to us too: linger briefly to tell apart.
                self._wake.wait(0.5)
                return None if self.stop_signal is not None else code
            self._wake.wait(0.2)
        return None

    def stop(self) -> int:
        """SIGTERM the worker, SIGKILL it after `stop_grace_s`; returns its exit code."""
        assert self.child is not None, "start() first"
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        return self.child.returncode

    def deregister_rank(self) -> None:
        """Best effort: remove this rank from the router even if the worker died before it could."""
        router, token = self.env.get(ROUTER_URL_ENV), self.env.get(TOKEN_ENV)
        role, job_id = self.env.get(ROLE_ENV), self.env.get("PDBOX_JOB_ID", "")
        if router and token and role in ("prefill", "decode", "unified") and job_id:
            register.deregister(
                router, token, role=role, job_id=job_id, rank=int(self.env["PDBOX_RANK"]), attempts=1
            )


def _task_env(env: Mapping[str, str]) -> dict[str, str]:
    full = dict(os.environ)
    full.update(env)
    full.update(worker_env(full))
    return full


def _hard_exit(code: int) -> None:
    # os._exit: no submitit result pickle is written. Written on a requeue, it would make the restarted
    # job look finished to submitit (`job.done()`), and a clean exit inside the preemption GraceTime
    # would end the job as COMPLETED instead of requeued.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class WorkerExited(RuntimeError):
    """The worker process ended by itself with a non-zero code."""

    def __init__(self, code: int, argv: Sequence[str]) -> None:
        super().__init__(f"worker exited with code {code}: {' '.join(argv)}")
        self.code = code


class PoolTask:
    """The submitit callable of a pool: one instance per task (rank), pickled into the job folder.

    Checkpointable in submitit's sense (it has `checkpoint`): on SIGUSR2 (preemption or the time-limit
    warning) every rank stops its worker; rank 0 then lets submitit requeue the job with a fresh
    `PoolTask`, and the requeued job starts new workers. SIGTERM (scancel, `scontrol requeue`) stops
    the worker and exits without a result. A worker exiting by itself ends the task: code 0 returns 0,
    another code raises `WorkerExited` (the job fails and submitit keeps the traceback).
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], stop_grace_s: float = 3.0) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.stop_grace_s = stop_grace_s

    def __call__(self) -> int:
        # submitit installed its handlers before calling us; keep its USR2 one (checkpoint + requeue).
        submitit_usr2: Callable[[int, Any], Any] | int | None = signal.getsignal(signal.SIGUSR2)
        sup = Supervisor(self.argv, _task_env(self.env), self.stop_grace_s)
        sup.start()
        code = sup.wait()
        if code is not None:
            sup.deregister_rank()
            if code != 0:
                raise WorkerExited(code, self.argv)
            return 0
        sup.stop()
        sup.deregister_rank()
        if sup.stop_signal == signal.SIGUSR2 and callable(submitit_usr2):
            # rank 0: calls self.checkpoint(), `scontrol requeue`, sys.exit; other ranks: returns at once
            submitit_usr2(signal.SIGUSR2, None)
            # wait for the requeue (or the end of the job) to deliver SIGTERM
            deadline = time.monotonic() + 120
            sup.stop_signal = None
            while sup.stop_signal is None and time.monotonic() < deadline:
                sup._wake.clear()
                sup._wake.wait(0.5)
        _hard_exit(128 + (sup.stop_signal or signal.SIGTERM))
        return 1  # unreachable

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit (rank 0, on SIGUSR2) once the worker is stopped: resubmit a fresh task."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(PoolTask(self.argv, self.env, self.stop_grace_s))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m slurm.task -- WORKER ARGV...`: supervise one worker under srun; exits with the
    worker's code, or 128+signal when stopped by a signal."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: python -m slurm.task -- WORKER_COMMAND [ARGS...]")
    sup = Supervisor(args, _task_env({}))
    sup.start()
    code = sup.wait()
    if code is None:
        sup.stop()
        code = 128 + (sup.stop_signal or signal.SIGTERM)
    sup.deregister_rank()
    sys.exit(code)


if __name__ == "__main__":
    main()
