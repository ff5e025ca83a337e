"""A worker joins the NVSHMEM job as the launcher planned, on CPU: a recording stand-in for the nvshmem
backend (the fake channel transport plus the nvshmem options) is registered under ``nvshmem``."""

from __future__ import annotations

import pytest

from appliance.config import EngineConfig
from appliance.nvshmem_job import NVSHMEM_ENV, plan_job, publish_uid
from appliance.serve.worker import Worker
from appliance.serve.worker_config import WorkerConfig
from nvshmem_kv import registry
from nvshmem_kv.backends import nvshmem as real_nvshmem
from nvshmem_kv.backends.fake import FakeTransport

UID = bytes(range(128))


def available(device) -> tuple[bool, str]:
    return True, "recording stand-in"


class JoinedNvshmem(FakeTransport):
    """Keeps the PE options it was built with and the pools it allocated (in the "symmetric heap")."""

    def __init__(self, *, pe: int, npes: int, uid: bytes, symmetric_bytes: int, device=None, **opts) -> None:
        super().__init__(**opts)
        self.joined = {"pe": pe, "npes": npes, "uid": uid, "symmetric_bytes": symmetric_bytes, "device": device}
        self.allocated: list = []

    def allocate_pool(self, desc, device="cpu"):
        pool = super().allocate_pool(desc, device)
        self.allocated.append(pool)
        return pool


@pytest.fixture
def nvshmem_job(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.BACKENDS, "nvshmem", (__name__, "JoinedNvshmem"))
    monkeypatch.setattr(real_nvshmem, "make_unique_id", lambda: UID)
    jobs = plan_job([("prefill-0", 1), ("decode-0", 1)], tmp_path, "run", 64 << 20)

    def use(name: str) -> None:
        monkeypatch.setenv(NVSHMEM_ENV, jobs[name].to_env()[NVSHMEM_ENV])

    return jobs, use


def _worker(role: str, name: str, model) -> Worker:
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=32, threads=1)
    return Worker(WorkerConfig(role=role, name=name, model=str(model), engine=cfg, transport="nvshmem", run_id="t"))


@pytest.mark.parametrize("role,name,pe", [("prefill", "prefill-0", 0), ("decode", "decode-0", 1)])
def test_worker_joins_as_its_planned_pe_with_its_pool_in_the_heap(role, name, pe, nvshmem_job, tiny_model) -> None:
    jobs, use = nvshmem_job
    use(name)
    if pe != 0:
        publish_uid(jobs[name].uid_file, UID)        # PE 0 (another worker) published it
    w = _worker(role, name, tiny_model)
    w.build_engine()
    try:
        t = w.transport
        assert isinstance(t, JoinedNvshmem)
        assert t.joined == {"pe": pe, "npes": 2, "uid": UID, "symmetric_bytes": 64 << 20,
                            "device": w.engine.runner.device}
        assert open(jobs[name].uid_file, "rb").read() == UID          # PE 0 published, others read
        assert len(t.allocated) == 1 and t.allocated[0] is w.engine.pool.kv   # the engine's pool is the heap's
        if role == "decode":
            assert '"backend":"fake"' in w.handle_json.replace(" ", "")
        else:
            assert w.handoff is not None and w.handoff.sender.transport is t
    finally:
        (w.handoff or t).close()
        w.engine.shutdown()
