"""TP over NCCL, checked on CPU: each rank's device, where command tensors live, one-device packing.

The ``meta`` device stands in for a GPU: a CPU tensor concatenated with a meta tensor raises just as a
CPU/CUDA mix does, so a header built on the wrong device fails here too.
"""

from __future__ import annotations

import datetime

import pytest
import torch

from appliance.config import EngineConfig, RankInfo
from appliance.engine import tp
from appliance.engine.forward_batch import HEADER_LEN, ForwardBatch
from appliance.engine.rank_device import (
    RANK_DEVICES_ENV,
    bind_device,
    enter_device,
    lead_device,
    parse_rank_devices,
    rank_device,
)


def _batch(device: str) -> ForwardBatch:
    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    return ForwardBatch(input_ids=t([5, 6, 7]), positions=t([0, 1, 4]), slot_mapping=t([0, 1, 20]),
                        page_table=torch.tensor([[0, 0], [5, 1]], dtype=torch.int32, device=device),
                        prefix_lens=t([0, 4]), extend_lens=t([2, 1]), seq_lens=t([2, 5]), logit_rows=t([1, 2]),
                        decode_only=False)


def test_tp_ranks_take_distinct_planned_gpus() -> None:
    planned = parse_rank_devices("0,1,2,3")
    assert [rank_device("cuda", r, 4, planned) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device("cuda", r, 2) for r in range(2)] == ["cuda:0", "cuda:1"]  # no plan: rank r on index r
    assert rank_device("cuda", 1, 2, (2, 5)) == "cuda:5"


def test_single_rank_and_cpu_devices() -> None:
    assert rank_device("cpu", 3, 4) == "cpu"
    assert rank_device("cuda", 0, 1) == "cuda:0"
    assert rank_device("cuda:3", 0, 1) == "cuda:3"       # an explicit device of a one-rank engine is kept
    assert rank_device("cuda", 0, 1, (2,)) == "cuda:2"


def test_bad_rank_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="share a GPU"):
        rank_device("cuda", 0, 2, (1, 1))
    with pytest.raises(ValueError, match="only 1 planned"):
        rank_device("cuda", 1, 2, (0,))
    with pytest.raises(ValueError, match="outside"):
        rank_device("cuda", 2, 2)
    with pytest.raises(ValueError):
        parse_rank_devices("0,-1")


def test_bind_device_on_cpu_reads_the_plan_but_sets_no_gpu() -> None:
    assert bind_device("cpu", RankInfo(rank=1, world_size=2), {RANK_DEVICES_ENV: "0,1"}) == torch.device("cpu")


def test_a_gpu_transport_binds_to_the_engines_lead_gpu_not_the_current_one() -> None:
    """The worker builds its transport before the engine binds its device: it names the GPU itself."""
    assert lead_device("cpu", 1, {}) is None
    assert lead_device("cuda:3", 1, {}) == "cuda:3"
    assert lead_device("cuda", 1, {}) == "cuda:0"
    assert lead_device("cuda", 2, {RANK_DEVICES_ENV: "4,5"}) == "cuda:4"


def test_a_thread_enters_its_engines_gpu(monkeypatch) -> None:
    """The current CUDA device is per thread: the engine thread sets its own (Triton launches there)."""
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    enter_device(torch.device("cpu"))
    assert calls == []
    enter_device(torch.device("cuda", 2))
    assert calls == [torch.device("cuda", 2)]


def test_commands_travel_on_the_rank_gpu_under_nccl_and_on_cpu_under_gloo() -> None:
    assert tp.group_backend(torch.device("cuda", 1), True) == "nccl"
    assert tp.group_backend(torch.device("cuda", 1), False) == "gloo"
    assert tp.group_backend(torch.device("cpu"), True) == "gloo"
    assert tp.comm_device("nccl", torch.device("cuda", 2)) == torch.device("cuda", 2)
    assert tp.comm_device("gloo", torch.device("cuda", 2)) == torch.device("cpu")
    with pytest.raises(ValueError):
        tp.comm_device("nccl", torch.device("cuda"))  # an unbound device: every rank would land on cuda:0


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_pack_builds_its_header_on_the_batch_device(device: str) -> None:
    flat = tp.attach_bytes(_batch(device).pack(), b'{"room": "r"}')
    assert flat.device.type == device and flat.dtype == torch.int64


def test_pack_roundtrip_with_extra_bytes() -> None:
    b = _batch("cpu")
    body, extra = tp.detach_bytes(tp.attach_bytes(b.pack(), b"plan"))
    got = ForwardBatch.unpack(body)
    assert extra == b"plan"
    assert got.input_ids.tolist() == [5, 6, 7] and got.slot_mapping.tolist() == [0, 1, 20]
    assert got.page_table.tolist() == [[0, 0], [5, 1]] and got.logit_rows.tolist() == [1, 2]
    assert got.seq_lens.tolist() == [2, 5] and got.decode_only is False
    assert got.extend_start.tolist() == [0, 2] and got.max_extend is None  # left to the backend: unknown here
    assert got.pack() is body  # a follower's batch is the tensor it came in


def test_flat_values_lay_out_what_from_flat_reads() -> None:
    values = ForwardBatch.flat_values([5, 6, 7], [0, 1, 4], [0, 1, 20], [[0, 0], [5, 1]], [0, 4], [2, 1], [1, 2],
                                      False)
    got = ForwardBatch.from_flat(torch.tensor(values), values[:HEADER_LEN])
    want = _batch("cpu")
    for name in ("input_ids", "positions", "slot_mapping", "prefix_lens", "extend_lens", "seq_lens", "logit_rows"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
    assert got.page_table.tolist() == [[0, 0], [5, 1]] and got.extend_start.tolist() == [0, 2]
    assert got.max_extend == 2 and got.max_seq == 5 and got.decode_only is False and got.num_tokens == 3
    assert got.batch_size == 2
    assert torch.equal(ForwardBatch.unpack(got.pack()).extend_start, got.extend_start)


def test_every_field_of_the_flat_layout_starts_16_byte_aligned() -> None:
    """Triton specializes pointers on 16-byte alignment: a field at an offset that follows the step's token
    count would compile the prefill kernels again while serving. Odd counts everywhere here."""
    ids, pos, slots = [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [0, 1, 2, 3, 40]
    table = [[0, 0, 0], [9, 1, 2], [3, 0, 0]]
    values = ForwardBatch.flat_values(ids, pos, slots, table, [0, 4, 1], [2, 2, 1], [1, 3, 4], False)
    flat = torch.tensor(values)
    got = ForwardBatch.from_flat(flat, values[:HEADER_LEN])
    fields = ("input_ids", "positions", "slot_mapping", "page_table", "prefix_lens", "extend_lens", "seq_lens",
              "logit_rows", "extend_start")
    assert all((getattr(got, f).data_ptr() - flat.data_ptr()) % 16 == 0 for f in fields)
    assert got.input_ids.tolist() == ids and got.slot_mapping.tolist() == slots and got.page_table.tolist() == table
    assert got.seq_lens.tolist() == [2, 6, 2] and got.extend_start.tolist() == [0, 2, 4]
    fresh = ForwardBatch(**{f: getattr(got, f) for f in fields}, decode_only=False, max_extend=2, max_seq=6)
    assert fresh.pack().tolist() == values  # a batch built elsewhere packs to the same layout


def test_broadcast_and_receive_use_the_comm_device(monkeypatch) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(tp.dist, "broadcast", lambda t, src: seen.append(t.device))
    group = tp.TpGroup("nccl", torch.device("meta"))
    group.broadcast_command(tp.CMD_FORWARD, torch.arange(4))  # a CPU payload is moved, not refused
    assert seen == [torch.device("meta")] * 2


def test_init_group_binds_nccl_to_the_rank_gpu(monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(tp.dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(tp.dist, "init_process_group", lambda backend, **kw: calls.append(dict(kw, backend=backend)))
    stores: list[tuple] = []

    class Store:  # every rank has joined: the rendezvous' wait returns at once
        def add(self, key: str, n: int) -> int:
            return 2

        def set(self, key: str, value: str) -> None:
            pass

        def wait(self, keys: list[str], timeout: datetime.timedelta) -> None:
            stores.append(("wait", timeout))

    store = Store()
    monkeypatch.setattr(tp.dist, "TCPStore", lambda *a, **kw: stores.append((a, kw)) or store)
    rank = RankInfo(rank=1, world_size=2, dist_init="tcp://127.0.0.1:1")
    group = tp.init_group(rank, torch.device("cuda", 1), "auto", 30, join_s=900)
    assert calls[-1]["backend"] == "nccl" and calls[-1]["device_id"] == torch.device("cuda", 1)
    # the rendezvous waits for ranks still loading their checkpoint; each collective has the shorter timeout
    assert stores[0] == (("127.0.0.1", 1, 2), {"is_master": False, "timeout": datetime.timedelta(seconds=900)})
    assert stores[1] == ("wait", datetime.timedelta(seconds=tp.JOIN_POLL_S))  # the ranks meet, in slices
    assert calls[-1]["store"] is store and calls[-1]["init_method"] is None
    assert calls[-1]["timeout"] == datetime.timedelta(seconds=30)
    assert group == tp.TpGroup("nccl", torch.device("cuda", 1))
    given = Store()
    group = tp.init_group(rank, torch.device("cpu"), "auto", 30, store=given)  # type: ignore[arg-type]
    assert calls[-1]["store"] is given and len(stores) == 3  # rank 0's own, made before its followers: no new one
    assert calls[-1]["backend"] == "gloo" and calls[-1]["device_id"] is None
    assert group == tp.TpGroup("gloo", torch.device("cpu"))
    group = tp.init_group(rank, torch.device("cuda", 0), "gloo", 30)  # gloo on a GPU: commands through the host
    assert calls[-1]["backend"] == "gloo" and calls[-1]["device_id"] is None
    assert group == tp.TpGroup("gloo", torch.device("cpu"))


def test_the_configured_tp_backend_is_kept_or_refused_by_name() -> None:
    cuda = torch.device("cuda", 0)
    assert tp.group_backend(cuda, True, "gloo") == "gloo"
    assert tp.group_backend(cuda, True, "nccl") == "nccl"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        tp.group_backend(torch.device("cpu"), True, "nccl")
    with pytest.raises(ValueError, match="NCCL not available"):
        tp.group_backend(cuda, False, "nccl")
    with pytest.raises(ValueError, match="tp_backend must be one of auto, nccl, gloo, got 'mpi'"):
        tp.group_backend(cuda, True, "mpi")
    with pytest.raises(ValueError, match="tp_backend must be one of auto, nccl, gloo, got 'mpi'"):
        EngineConfig(tp_backend="mpi")


def test_a_gloo_group_may_put_every_rank_on_one_gpu() -> None:
    assert [rank_device("cuda:0", r, 2, share_gpu=True) for r in range(2)] == ["cuda:0", "cuda:0"]
    assert [rank_device("cuda", r, 4, share_gpu=True) for r in range(4)] == ["cuda:0"] * 4
    assert [rank_device("cuda", r, 2, (0, 0), share_gpu=True) for r in range(2)] == ["cuda:0", "cuda:0"]
    assert [rank_device("cuda", r, 2, (1, 3), share_gpu=True) for r in range(2)] == ["cuda:1", "cuda:3"]
    with pytest.raises(ValueError, match="outside"):
        rank_device("cuda:0", 2, 2, share_gpu=True)
    assert rank_device("cpu", 1, 2, share_gpu=True) == "cpu"



def test_rank_0_stops_waiting_at_the_rendezvous_once_a_rank_died_loading() -> None:
    """A follower whose process exited while loading its checkpoint never comes: rank 0 says so within a
    slice of its wait, not after the whole join deadline (600 s)."""
    asked: list[int] = []

    class Store:  # one rank of two has come
        def add(self, key: str, n: int) -> int:
            return 1

        def set(self, key: str, value: str) -> None:
            raise AssertionError("not every rank came")

        def wait(self, keys: list[str], timeout: datetime.timedelta) -> None:
            raise tp.dist.DistStoreError(f"wait timeout after {timeout}")

    def failed() -> str | None:
        asked.append(1)
        return "tensor-parallel rank process pdbox-tp1 (exit code 1) exited" if len(asked) > 2 else None

    with pytest.raises(RuntimeError, match="group cannot form: .*pdbox-tp1 .exit code 1. exited"):
        tp._meet(Store(), 2, 600.0, failed)  # type: ignore[arg-type]
    assert len(asked) == 3
    with pytest.raises(tp.dist.DistStoreError):  # nobody says why: the deadline ends it
        tp._meet(Store(), 2, 0.0, None)  # type: ignore[arg-type]
