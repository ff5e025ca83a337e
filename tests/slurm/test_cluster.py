"""Slurm mode against a real Slurm (see conftest.py): `pdbox slurm up/status/down`, preemption and
requeue, and the single-allocation sbatch script, with the stand-in worker (standin_worker.py) and, for
`up`, the stand-in router (the registry alone). test_serving.py runs the real worker and router."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest

from slurm.messages import RegistryEvent, WorkerStatus
from tests.waiting import wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
WORKER = f"{{python}} {Path(__file__).resolve().parent / 'standin_worker.py'}"
REGISTRY_ROUTER = "{python} -m slurm.registry --host {host} --port {port} --port-file {port_file}"


def _cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slurm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def _get(url: str, token: str) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def _router(run_dir: Path) -> tuple[str, str]:
    return json.loads((run_dir / "run.json").read_text())["router_url"], (run_dir / "token").read_text().strip()


def _workers(router: str, token: str) -> list[WorkerStatus]:
    return msgspec.json.decode(_get(router + "/internal/workers", token), type=list[WorkerStatus])


def _events(router: str, token: str) -> list[RegistryEvent]:
    return msgspec.json.decode(_get(router + "/internal/events", token), type=list[RegistryEvent])




def _queue() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _up(run_root: Path, *args: str) -> Path:
    up = _cli("up", "--worker-cmd", WORKER, "--router-cmd", REGISTRY_ROUTER, "--timeout", "90",
              "--run-root", str(run_root), *args)
    assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
    assert "ready: http://" in up.stdout
    return (run_root / "latest").resolve()


def _healthy(router: str, token: str, want: int) -> list[WorkerStatus] | None:
    statuses = _workers(router, token)
    return statuses if len(statuses) == want and all(s.healthy for s in statuses) else None


def test_up_places_pools_on_two_nodes_and_down_cleans_up(slurm_cluster: dict, run_root: Path) -> None:
    t0 = time.monotonic()
    run_dir = _up(run_root, "--gpus-per-node", "2")  # 2 ranks per pool, one GPU each
    up_s = time.monotonic() - t0
    try:
        router, token = _router(run_dir)
        statuses = _healthy(router, token, want=4)
        assert statuses, _workers(router, token)
        by_role = {role: [s.info for s in statuses if s.info.role == role] for role in ("prefill", "decode")}
        assert {i.rank for i in by_role["prefill"]} == {i.rank for i in by_role["decode"]} == {0, 1}
        prefill_nodes = {i.node for i in by_role["prefill"]}
        decode_nodes = {i.node for i in by_role["decode"]}
        assert len(prefill_nodes) == len(decode_nodes) == 1 and prefill_nodes | decode_nodes == {"n1", "n2"}
        for infos in by_role.values():  # Slurm binds one GPU per rank
            assert sorted(i.devices for i in infos) == ["0", "1"] and {i.tp for i in infos} == {2}
        for s in statuses:  # the advertised url answers from here (n1/n2 resolve to this host)
            assert urllib.request.urlopen(s.info.url + "/health", timeout=5).status == 200

        status = _cli("status", "--run-root", str(run_root))
        assert status.returncode == 0 and status.stdout.count("RUNNING") == 2 and "workers: 4" in status.stdout
    finally:
        t1 = time.monotonic()
        down = _cli("down", "--run-root", str(run_root))
        down_s = time.monotonic() - t1
    assert down.returncode == 0, down.stderr
    job_ids = {j["job_id"] for j in json.loads((run_dir / "run.json").read_text())["jobs"]}
    assert not job_ids & _queue()
    pids = [s.info.pid for s in statuses] + [json.loads((run_dir / "run.json").read_text())["router_pid"]]
    wait_until(lambda: not any(_alive(p) for p in pids), 10, 0.25, what="every worker and the router to exit")
    sys.stderr.write(f"\nslurm up: {up_s:.1f}s to ready, down: {down_s:.1f}s\n")


def test_preemption_and_requeue_restart_workers(slurm_cluster: dict, run_root: Path) -> None:
    run_dir = _up(run_root, "--gpus-per-node", "2")  # 2 ranks per pool: rank 0 requeues, rank 1 follows
    try:
        router, token = _router(run_dir)
        jobs = {j["role"]: j["job_id"] for j in json.loads((run_dir / "run.json").read_text())["jobs"]}
        before = [s.info for s in _healthy(router, token, want=4) or []]
        assert len(before) == 4

        def cycle(role: str, what: str) -> float:
            """Wait until every `role` rank deregistered, then until all serve again after a restart."""
            t0 = time.monotonic()
            old = [i for i in before if i.role == role]
            wait_until(lambda: {e.info.rank for e in _events(router, token)
                            if e.kind == "deregister" and e.info in old} == {0, 1}, 15, 0.25,
                       what=f"{what}: deregistration")
            new = wait_until(lambda: (lambda n: n if len(n) == 2 else None)(
                [s.info for s in _workers(router, token) if s.healthy and s.info.role == role and s.info.restart]),
                60, 0.25, what=f"{what}: the requeued {role} ranks to serve again")
            assert {i.job_id for i in new} == {jobs[role]} and not {i.pid for i in new} & {i.pid for i in old}
            return time.monotonic() - t0

        # real preemption: an `urgent` job needs the decode node's GPUs; the decode job gets SIGUSR2,
        # its workers deregister, submitit requeues the job and fresh workers register again.
        decode_node = next(i.node for i in before if i.role == "decode")
        subprocess.run(["sbatch", "-p", "urgent", "-w", decode_node, "--gpus-per-node=2", "-o", "/dev/null",
                        "--wrap", "sleep 2"], capture_output=True, check=True)
        preempt_s = cycle("decode", "preemption")
        assert sorted(s.info.pid for s in _workers(router, token) if s.info.role == "prefill") == sorted(
            i.pid for i in before if i.role == "prefill"), "preempting decode must not touch prefill"

        # admin requeue: SIGTERM to every task, no USR2
        subprocess.run(["scontrol", "requeue", jobs["prefill"]], check=True, capture_output=True)
        requeue_s = cycle("prefill", "scontrol requeue")
        assert not any(e.kind == "drop" for e in _events(router, token)), "workers must deregister, not be dropped"
        sys.stderr.write(f"\npreemption -> serving again: {preempt_s:.1f}s, requeue -> serving: {requeue_s:.1f}s\n")
    finally:
        down = _cli("down", "--run-root", str(run_root))
    assert down.returncode == 0, down.stderr


def test_sbatch_script_runs_the_appliance(slurm_cluster: dict, run_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "pdbox.sbatch"
    script = _cli("script", "--gpus-per-node", "2", "--worker-cmd", WORKER, "--run-root", str(run_root),
                  "-o", str(path))
    assert script.returncode == 0, script.stderr
    test_only = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
    assert test_only.returncode == 0, test_only.stderr
    job = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    job_dir = run_root / f"sbatch-{job}"
    try:
        url_file = wait_until(lambda: (job_dir / "router.url").exists() and job_dir / "router.url", 30, 0.25,
                              what=f"the router of job {job} (log: {run_root}/sbatch-{job}.out)")
        router, token = url_file.read_text().strip(), (job_dir / "token").read_text().strip()
        statuses = wait_until(lambda: _healthy(router, token, want=4), 30, 0.25, what="4 healthy ranks")
        assert {(s.info.role, s.info.node) for s in statuses} == {("prefill", "n1"), ("decode", "n2")}
    finally:
        subprocess.run(["scancel", job], check=True)
    wait_until(lambda: job not in _queue(), 30, 0.25, what=f"job {job} to leave the queue")
