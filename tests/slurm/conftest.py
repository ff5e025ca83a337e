"""The `slurm_cluster` fixture: a real Slurm for tests marked `slurm`.

The session uses a Slurm that already answers `scontrol ping`; else it brings up
slurm/local-cluster.sh wherever it can (root, and apt-get to install the Debian packages when they are
missing) and always takes it down at the end, failed tests and SIGTERM included. CI=true or
PDBOX_SLURM=1 bring up its own cluster even when one answers; PDBOX_SLURM=0 skips the tier. Where it
cannot start one, each test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
STANDIN = Path(__file__).resolve().parent / "standin_worker.py"


def _forced() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PDBOX_SLURM") == "1"


def _why_not_start() -> str | None:
    """None when this machine can bring up local-cluster.sh, else why not."""
    if os.environ.get("PDBOX_SLURM") == "0":
        return "PDBOX_SLURM=0 turns the Slurm tier off"
    if os.geteuid() != 0:
        return "slurm/local-cluster.sh needs root (or run a Slurm that answers `scontrol ping`)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _ping() -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _cluster(action: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, float]]:
    """A running Slurm with nodes n1 and n2, partitions debug (default) and urgent (preempts debug).
    Yields timings: {"up_s": seconds the bring-up took (0 for a cluster that was already there)}."""
    if not _forced() and _ping():
        yield {"up_s": 0.0}
        return
    why = _why_not_start()
    if why:
        pytest.skip(f"no Slurm controller answers `scontrol ping`, and none can start here: {why}")
    # pytest tears fixtures down on KeyboardInterrupt, not on SIGTERM (a CI runner's timeout): convert.
    previous = signal.getsignal(signal.SIGTERM)

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        up = _cluster("up", timeout_s=600)
        if up.returncode != 0:
            pytest.fail(f"local-cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        env = _cluster("env", timeout_s=10).stdout.strip()  # "export SLURM_CONF=..."
        os.environ["SLURM_CONF"] = env.split("=", 1)[1]
        sys.stderr.write(f"\nlocal Slurm up in {time.monotonic() - t0:.1f}s\n")
        yield {"up_s": time.monotonic() - t0}
    finally:
        down = _cluster("down", timeout_s=120)
        if down.returncode != 0:
            sys.stderr.write(f"local-cluster.sh down failed:\n{down.stdout}\n{down.stderr}\n")
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    # pytest's tmp_path is on this host's disk, which the fake nodes share
    return tmp_path / "runs"
