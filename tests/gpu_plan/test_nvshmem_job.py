"""NVSHMEM wiring on CPU: PE numbering, the uid exchange through the run folder, and the nvshmem
backend's call signature, with a recording fake registered as the ``nvshmem`` backend."""

from __future__ import annotations

import inspect
import threading
import time

import pytest
import torch

from appliance import launcher
from appliance.engine_flags import EngineFlags
from appliance.launcher import UpConfig, plan_workers
from appliance.nvshmem_job import (
    NVSHMEM_ENV,
    PeJob,
    create_transport,
    plan_job,
    plan_pes,
    symmetric_allocator,
    wait_uid,
)
from nvshmem_kv import registry
from nvshmem_kv.backends.nvshmem import NvshmemTransport


def available(device) -> tuple[bool, str]:
    return True, "recording fake"


class RecordingNvshmem:
    """Stands in for NvshmemTransport: keeps its options and the pools it allocated."""

    def __init__(self, **opts) -> None:
        self.opts = opts
        self.pools: list = []

    def allocate_pool(self, desc, device):
        self.pools.append(desc)
        return torch.zeros(desc.shape, dtype=desc.torch_dtype())


@pytest.fixture
def fake_nvshmem(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "nvshmem", (__name__, "RecordingNvshmem"))


def test_every_prefill_and_decode_rank_is_a_pe() -> None:
    base, npes = plan_pes([("prefill-0", 4)] + [(f"decode-{k}", 1) for k in range(4)])
    assert base == {"prefill-0": 0, "decode-0": 4, "decode-1": 5, "decode-2": 6, "decode-3": 7} and npes == 8
    base, npes = plan_pes([("prefill-0", 2)] + [(f"decode-{k}", 1) for k in range(6)])
    assert base["prefill-0"] == 0 and [base[f"decode-{k}"] for k in range(6)] == [2, 3, 4, 5, 6, 7] and npes == 8
    assert plan_pes([("prefill-0", 1), ("decode-0", 1)]) == ({"prefill-0": 0, "decode-0": 1}, 2)  # one GPU, 2 PEs
    with pytest.raises(ValueError):
        plan_pes([("a", 1), ("a", 1)])


def test_pe_job_travels_in_the_env_and_bounds_its_ranks(tmp_path) -> None:
    jobs = plan_job([("prefill-0", 2), ("decode-0", 1)], tmp_path, "run-1", 1 << 20)
    job = PeJob.from_env(jobs["prefill-0"].to_env())
    assert job == jobs["prefill-0"] and job.pe(1) == 1
    assert jobs["decode-0"].pe(0) == 2
    with pytest.raises(ValueError, match="past the job"):
        jobs["decode-0"].pe(1)
    assert PeJob.from_env({}) is None
    assert job.uid_file.startswith(str(tmp_path))


def test_launcher_numbers_pes_and_puts_the_uid_file_in_the_run_folder(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = UpConfig(mode="disagg", prefill_gpus="0-1", decode_gpus="2-7", prefill_tp=2, transport="nvshmem",
                   engine=EngineFlags(kv_cache_mb=64))
    specs, transport = plan_workers(cfg, "token", "run-7", tmp_path)
    jobs = {s.name: PeJob.from_env(s.env) for s in specs}
    assert transport == "nvshmem"
    assert [jobs[s.name].pe_base for s in specs] == [0, 2, 3, 4, 5, 6, 7]
    assert {(j.npes, j.uid_file, j.symmetric_bytes) for j in jobs.values()} == {
        (8, str(tmp_path / "nvshmem-uid-run-7.bin"), 64 << 20)}
    assert all(s.env["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] == "lo" and s.env["NVSHMEM_REMOTE_TRANSPORT"] == "none"
               for s in specs)  # one node: loopback bootstrap, no InfiniBand probed
    monkeypatch.setenv("NVSHMEM_REMOTE_TRANSPORT", "ibrc")
    assert {s.env["NVSHMEM_REMOTE_TRANSPORT"] for s in plan_workers(cfg, "token", "run-7", tmp_path)[0]} == {"ibrc"}
    with pytest.raises(ValueError, match="run's folder"):
        plan_workers(cfg, "token", "run-7")
    plain, _ = plan_workers(UpConfig(mode="disagg", prefill_gpus="0", decode_gpus="1", transport="cuda_ipc"),
                            "token", "run-7", tmp_path)
    assert all(NVSHMEM_ENV not in s.env for s in plain)


def test_pe0_makes_the_uid_and_every_pe_joins_with_it(fake_nvshmem, tmp_path) -> None:
    """Three PEs (prefill TP 2, decode TP 1); the others wait before PE 0 publishes."""
    jobs = plan_job([("prefill-0", 2), ("decode-0", 1)], tmp_path, "run", 1 << 20)
    made: list[bytes] = []

    def make_uid() -> bytes:
        made.append(bytes(range(128)))
        return made[-1]

    got: dict[int, RecordingNvshmem] = {}

    def join(job: PeJob, rank: int) -> None:
        got[job.pe(rank)] = create_transport(job, rank, "cpu", {"run_id": "r"}, make_uid)

    waiters = [threading.Thread(target=join, args=a) for a in ((jobs["prefill-0"], 1), (jobs["decode-0"], 0))]
    for t in waiters:
        t.start()
    time.sleep(0.2)
    assert not got                                  # nobody joins before PE 0 published
    join(jobs["prefill-0"], 0)
    for t in waiters:
        t.join(10)
    assert len(made) == 1 and sorted(got) == [0, 1, 2]
    for pe, t in got.items():
        assert t.opts["pe"] == pe and t.opts["npes"] == 3 and t.opts["uid"] == made[0]
        assert t.opts["symmetric_bytes"] == 1 << 20 and t.opts["device"] == "cpu"
        inspect.signature(NvshmemTransport).bind(**t.opts)  # the real backend accepts exactly these


def test_symmetric_allocator_joins_then_allocates_the_pool(fake_nvshmem, tmp_path) -> None:
    job = plan_job([("decode-0", 1)], tmp_path, "run", 1 << 20)["decode-0"]
    joined: list = []
    alloc = symmetric_allocator(job, 0, {}, joined.append, make_uid=lambda: b"u" * 128)
    kv = alloc((2, 3, 5, 4, 2, 8), torch.float16, "cpu")
    assert kv.shape == (2, 3, 5, 4, 2, 8) and kv.dtype == torch.float16
    assert len(joined) == 1 and joined[0].pools[0].shape == (2, 3, 5, 4, 2, 8)


def test_uid_wait_times_out_naming_the_file(tmp_path) -> None:
    with pytest.raises(TimeoutError, match="PE 0"):
        wait_uid(str(tmp_path / "missing.bin"), 0.1)


def test_worker_refuses_nvshmem_without_a_pe_plan(monkeypatch, tmp_path) -> None:
    from appliance.serve.worker import Worker
    from appliance.serve.worker_config import WorkerConfig

    monkeypatch.delenv(NVSHMEM_ENV, raising=False)
    w = Worker(WorkerConfig(role="decode", name="decode-0", transport="nvshmem"))
    with pytest.raises(ValueError, match=NVSHMEM_ENV):
        w._nvshmem_job()
    job = plan_job([("decode-0", 1)], tmp_path, "run", 1 << 20)["decode-0"]
    monkeypatch.setenv(NVSHMEM_ENV, job.to_env()[NVSHMEM_ENV])
    assert w._nvshmem_job() == job
    assert Worker(WorkerConfig(role="decode", name="d", transport="shm"))._nvshmem_job() is None


def test_a_dead_nvshmem_pe_stops_the_appliance_instead_of_a_lone_restart(monkeypatch, tmp_path) -> None:
    """A restarted PE would wait in NVSHMEM's collective start-up forever (the job's other PEs never join
    again): the supervisor stops everything and says why, instead of restarting it alone."""
    import asyncio
    import io
    import subprocess
    import sys

    monkeypatch.setattr(launcher, "_cuda_count", lambda: 2)
    monkeypatch.setattr(launcher, "peer_access", lambda pairs: dict.fromkeys(pairs, True))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    said = io.StringIO()
    up = launcher.Launcher(UpConfig(mode="disagg", prefill_gpus="0", decode_gpus="1", transport="nvshmem",
                                    log_dir=str(tmp_path), engine=EngineFlags(kv_cache_mb=64)), err=said)
    assert up.transport == "nvshmem" and all(NVSHMEM_ENV in s.env and s.extra["nvshmem_pe"] for s in up.specs)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    dead.wait(10)
    up.specs[0].proc, up.specs[1].proc = alive, dead
    restarted: list = []
    up.start = restarted.append  # type: ignore[method-assign]

    async def run() -> bool:
        stop = asyncio.Event()
        await asyncio.wait_for(up.supervise(stop), 5)
        return stop.is_set()

    try:
        stopped = asyncio.run(run())
    finally:
        alive.kill()
        alive.wait()
    assert stopped and not restarted
    assert up.fatal and "decode-0 (an NVSHMEM PE) exited with code 7" in up.fatal and up.fatal in said.getvalue()
    monkeypatch.setenv(NVSHMEM_ENV, "{}")  # inherited by a cuda_ipc run's workers: they are no PEs
    plain = launcher.Launcher(UpConfig(mode="disagg", prefill_gpus="0", decode_gpus="1", transport="cuda_ipc",
                                       log_dir=str(tmp_path)), err=io.StringIO())
    assert not any(s.extra["nvshmem_pe"] for s in plain.specs)
