"""GPU tier: cuda_ipc and nvshmem between two processes on ONE GPU (NVSHMEM then runs in limited
MPG mode: only put/signal/quiet/barrier_all are used). Skipped without CUDA."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.transport.helpers import desc_dict, make_desc, reply
from tests.transport.transport_workers import digest, global_kv, run_decode, run_prefill

# a test's timeout under the device check's 100 s step (pytest-transport, which starts no test after 70 s):
# each took 8-11 s on an H200, so a hang loses one test, not the step's JUnit XML
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(25)]
SpawnWorker = Callable[[Callable[..., None], dict[str, Any]], tuple[Any, Any]]


def _need(module: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def _rooms() -> list[dict[str, Any]]:
    return [{"room": "g1", "src": [0, 1, 2, 5], "dst": [7, 8, 9, 1]},
            {"room": "g2", "src": [3, 4], "dst": [2, 3]}]


def _check(results: dict[str, Any], src_desc: Any, seed: int, rooms: list[dict[str, Any]], h: tuple[int, int]) -> None:
    full = global_kv(src_desc, seed)
    for r in rooms:
        done, reason, got, payloads = results[r["room"]]
        assert done, reason
        assert got == digest(full[:, :, r["src"], :, h[0]:h[1]])
        assert json.loads(payloads[0])["sha"] == got


@pytest.mark.parametrize("copy", ["torch", "kernel"])
@pytest.mark.parametrize("dst_tp", [1, 2])
def test_cuda_ipc_one_gpu(spawn_worker: SpawnWorker, dst_tp: int, copy: str) -> None:
    """dst_tp=2 splits the heads: the kernel moves each decode rank's heads as a slice of each token row
    (compiled at connect, after the warm-up), the torch path one strided copy per run."""
    _need("cuda.bindings")
    dsts = [make_desc(12, heads=2, layers=3, tp_rank=r, tp_size=dst_tp) for r in range(dst_tp)]
    src = make_desc(8, heads=2, layers=3)
    rooms = _rooms()
    decoders = [spawn_worker(run_decode, {"backend": "cuda_ipc", "device": "cuda:0", "local": desc_dict(d),
                                          "rooms": rooms}) for d in dsts]
    handles = [reply(conn, 120)[1] for _, conn in decoders]
    _, pconn = spawn_worker(run_prefill, {"backend": "cuda_ipc", "device": "cuda:0", "local": desc_dict(src),
                                          "seed": 21, "handles": handles, "rooms": rooms, "opts": {"copy": copy},
                                          "warm": True})
    kind, done = reply(pconn, 120)
    assert kind == "done" and done["writes"] == 3 * len(rooms) * dst_tp
    assert done["kernel_writes"] == (done["writes"] if copy == "kernel" else 0)
    for (_, conn), d in zip(decoders, dsts):
        _check(reply(conn, 120)[1], src, 21, rooms, d.head_range)


@pytest.mark.parametrize("copy", ["auto", "put"])
def test_nvshmem_two_pes_one_gpu(spawn_worker: SpawnWorker, copy: str, record_property: Any) -> None:
    """"auto": the page-copy kernel through the address NVSHMEM maps the other PE's heap at, where it does
    (the test reports which); "put": putmem_signal, one put per run."""
    _need("nvshmem.core")
    desc = make_desc(16, heads=2, layers=3)           # same pool size on both PEs: one symmetric size
    rooms = _rooms()
    opts = {"npes": 2, "symmetric_bytes": desc.pool_bytes}
    _, pconn = spawn_worker(run_prefill, {"backend": "nvshmem", "device": "cuda:0", "local": desc_dict(desc),
                                          "seed": 33, "rooms": rooms, "opts": {**opts, "pe": 0, "copy": copy},
                                          "warm": True})
    kind, uid = reply(pconn, 120)
    assert kind == "uid"
    _, dconn = spawn_worker(run_decode, {"backend": "nvshmem", "device": "cuda:0", "local": desc_dict(desc),
                                         "rooms": rooms, "opts": {**opts, "pe": 1, "uid": uid}})
    kind, handle = reply(dconn, 180)
    assert kind == "handle"
    pconn.send(("handles", [handle]))
    kind, done = reply(pconn, 120)
    assert kind == "done" and done["writes"] == 3 * len(rooms)
    if copy == "put":
        assert done["kernel_writes"] == 0
    else:  # which path NVSHMEM allowed on this machine (two PEs on one GPU: limited MPG), in the JUnit XML
        record_property("kernel_writes", f"{done['kernel_writes']} of {done['writes']}")
    _check(reply(dconn, 120)[1], desc, 33, rooms, desc.head_range)
