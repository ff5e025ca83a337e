"""The per-task supervisor (`python -m slurm.task`), PoolSpec and the sbatch script: no Slurm needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.jobs import PoolSpec
from slurm.script import ROUTER_URL, render_sbatch
from slurm.task import worker_env
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def _supervise(*child: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "slurm.task", "--", *child], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_forwards_the_worker_exit_code() -> None:
    proc = _supervise(sys.executable, "-c", "import sys; sys.exit(3)")
    assert proc.wait(timeout=30) == 3


def test_rank_environment_comes_from_slurm() -> None:
    code = "import os; print(os.environ['PDBOX_RANK'], os.environ['PDBOX_LOCAL_RANK'], os.environ['PDBOX_NODE'])"
    env = {**os.environ, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURMD_NODENAME": "n2"}
    out = subprocess.run([sys.executable, "-m", "slurm.task", "--", sys.executable, "-c", code], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["5", "1", "n2"]
    assert worker_env({"SLURM_NTASKS": "4", "SLURM_RESTART_COUNT": "2"})["PDBOX_TP"] == "4"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_stop_signal_stops_the_worker(sig: int) -> None:
    # the worker ignores SIGTERM, so the supervisor has to SIGKILL it after its grace period
    child = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "print(os.getpid(), flush=True); time.sleep(60)")
    proc = _supervise(sys.executable, "-c", child)
    assert proc.stdout is not None
    worker_pid = int(proc.stdout.readline())
    proc.send_signal(sig)
    assert proc.wait(timeout=15) == 128 + sig
    time.sleep(0.2)
    assert not _alive(worker_pid)


def test_worker_dies_with_a_killed_supervisor() -> None:
    proc = _supervise(sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)")
    assert proc.stdout is not None
    worker_pid = int(proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=10)
    wait_until(lambda: not _alive(worker_pid), 5, 0.05, what=f"worker {worker_pid} to die with its supervisor")


def test_poolspec_validation() -> None:
    spec = PoolSpec(name="decode", role="decode", nodes=2, tasks_per_node=4, gpus_per_node=8)
    assert (spec.num_tasks, spec.tp_size, spec.gpus_per_task) == (8, 8, 2)
    assert PoolSpec(name="p", role="prefill", gpus_per_node=4).gpus_per_task is None
    with pytest.raises(ValueError, match="split evenly"):
        PoolSpec(name="d", role="decode", tasks_per_node=3, gpus_per_node=4)
    with pytest.raises(ValueError, match="tp=3"):
        PoolSpec(name="d", role="decode", tasks_per_node=4, tp=3)
    with pytest.raises(ValueError, match="role"):
        PoolSpec(name="d", role="encode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nodes"):
        PoolSpec(name="d", role="decode", nodes=0)


def test_sbatch_script_is_valid_bash(tmp_path: Path) -> None:
    prefill = PoolSpec(name="prefill", role="prefill", nodes=1, tasks_per_node=2, gpus_per_node=2,
                       env={"A": "x y"})
    decode = PoolSpec(name="decode", role="decode", nodes=2, gpus_per_node=2)
    text = render_sbatch(prefill, decode, prefill_argv=["w", "--router", ROUTER_URL, "it's"],
                         decode_argv=["w", f"--url={ROUTER_URL}/x"], run_root=str(tmp_path))
    path = tmp_path / "pdbox.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --nodes=3" in text and "#SBATCH --gpus-per-node=2" in text
    assert '--router "${PDBOX_ROUTER_URL}" \'it\'"\'"\'s\'' in text
    assert '--url="${PDBOX_ROUTER_URL}"/x' in text
    assert "--gpus-per-task=1" in text and "A='x y'" in text
    with pytest.raises(ValueError, match="partition"):
        render_sbatch(prefill, PoolSpec(name="decode", role="decode", partition="gpu"),
                      prefill_argv=["w"], decode_argv=["w"], run_root="/x")
