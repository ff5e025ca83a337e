"""`pdbox slurm script --cpu`: the single-allocation sbatch script with the real router and workers
(prefill on n1, decode on n2, KV over tcp) answers a chat request (see conftest.py for the cluster)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.test_cluster import _queue
from tests.slurm.test_serving import PARIS, Run, _pdbox
from tests.waiting import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_sbatch_script_serves_with_the_real_worker(slurm_cluster: dict, tmp_path: Path) -> None:
    path, root = tmp_path / "pdbox.sbatch", tmp_path / "runs"
    script = _pdbox("script", "--cpu", "--run-root", str(root), "-o", str(path))
    assert script.returncode == 0, script.stderr
    t0 = time.monotonic()
    job = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    job_dir = root / f"sbatch-{job}"
    try:
        url_file = wait_until(lambda: (job_dir / "router.url").exists() and job_dir / "router.url", 60, 0.25,
                              what=f"the router of job {job} (log: {root}/sbatch-{job}.out)")
        sbatch_run = Run(root=root, dir=job_dir, router=url_file.read_text().strip(),
                         token=(job_dir / "token").read_text().strip(), jobs={}, router_pid=0, up_s=0.0)
        wait_until(sbatch_run.healthy, 120, 0.25,
                   what=f"the router to route to both roles (log: {root}/sbatch-{job}.out)")
        ready_s = time.monotonic() - t0
        assert {(s.info.role, s.info.node) for s in sbatch_run.workers()} == {("prefill", "n1"), ("decode", "n2")}
        assert "Paris" in sbatch_run.chat(PARIS)
    finally:
        subprocess.run(["scancel", job], check=True)
    wait_until(lambda: job not in _queue(), 30, 0.25, what=f"job {job} to leave the queue")
    sys.stderr.write(f"\nsbatch script --cpu: serving {ready_s:.1f}s after sbatch\n")
