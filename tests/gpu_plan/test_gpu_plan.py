"""GPU plans, on CPU: each worker's CUDA_VISIBLE_DEVICES, its TP ranks' devices, its peers' devices."""

from __future__ import annotations

import pytest

from appliance import launcher
from appliance.gpu_plan import GpuGroup, parse_visible, plan_gpus
from appliance.launcher import UpConfig, plan_workers


def _by_name(plans):
    return {p.name: p for p in plans}


def test_prefill_tp4_on_0_3_and_four_decodes_on_4_7() -> None:
    groups = [GpuGroup("prefill-0", "prefill", (0, 1, 2, 3))]
    groups += [GpuGroup(f"decode-{k}", "decode", (4 + k,)) for k in range(4)]
    plans = _by_name(plan_gpus(groups, "disagg"))
    pre = plans["prefill-0"]
    assert pre.cuda_visible_devices == "0,1,2,3,4,5,6,7"
    assert pre.rank_devices == (0, 1, 2, 3)
    assert [(p.name, p.local) for p in pre.peers] == [(f"decode-{k}", (4 + k,)) for k in range(4)]
    assert pre.peer_env() == "decode-0=4;decode-1=5;decode-2=6;decode-3=7"
    for k in range(4):
        dec = plans[f"decode-{k}"]
        assert dec.cuda_visible_devices == str(4 + k) and dec.rank_devices == (0,) and dec.peers == ()


def test_prefill_tp2_on_0_1_and_six_decodes_on_2_7() -> None:
    groups = [GpuGroup("prefill-0", "prefill", (0, 1))]
    groups += [GpuGroup(f"decode-{k}", "decode", (2 + k,)) for k in range(6)]
    pre = _by_name(plan_gpus(groups, "disagg"))["prefill-0"]
    assert pre.cuda_visible_devices == "0,1,2,3,4,5,6,7" and pre.rank_devices == (0, 1)
    assert {p.name: p.local for p in pre.peers} == {f"decode-{k}": (2 + k,) for k in range(6)}


def test_one_gpu_shared_by_prefill_and_decode() -> None:
    plans = _by_name(plan_gpus([GpuGroup("prefill-0", "prefill", (0,)), GpuGroup("decode-0", "decode", (0,))],
                               "disagg"))
    assert plans["prefill-0"].cuda_visible_devices == "0"       # the shared GPU appears once
    assert plans["prefill-0"].peers[0].local == (0,)
    assert plans["decode-0"].cuda_visible_devices == "0"


def test_own_gpus_come_first_even_when_a_peer_has_a_lower_id() -> None:
    plans = _by_name(plan_gpus([GpuGroup("decode-0", "decode", (0,)), GpuGroup("prefill-0", "prefill", (2, 3))],
                               "disagg"))
    assert plans["prefill-0"].cuda_visible_devices == "2,3,0"
    assert plans["prefill-0"].peers[0].local == (2,)


def test_auto_mode_every_engine_sees_every_other_and_unified_sees_only_its_own() -> None:
    groups = [GpuGroup("prefill-0", "prefill", (0,)), GpuGroup("decode-0", "decode", (1,)),
              GpuGroup("decode-1", "decode", (2,))]
    auto = _by_name(plan_gpus(groups, "auto"))
    assert auto["decode-1"].cuda_visible_devices == "2,0,1"      # decode moves go decode -> decode
    assert [p.name for p in auto["decode-1"].peers] == ["prefill-0", "decode-0"]
    uni = plan_gpus([GpuGroup("unified-0", "unified", (0, 1)), GpuGroup("unified-1", "unified", (2, 3))], "unified")
    assert [p.cuda_visible_devices for p in uni] == ["0,1", "2,3"]


def test_ids_index_into_the_launchers_own_visible_devices() -> None:
    parent = parse_visible("GPU-aaa,GPU-bbb, 7")
    assert parent == ("GPU-aaa", "GPU-bbb", "7")
    plans = _by_name(plan_gpus([GpuGroup("prefill-0", "prefill", (2,)), GpuGroup("decode-0", "decode", (0,))],
                               "disagg", parent))
    assert plans["prefill-0"].cuda_visible_devices == "7,GPU-aaa"
    with pytest.raises(ValueError, match="not among the 3 visible"):
        plan_gpus([GpuGroup("decode-0", "decode", (3,))], "disagg", parent)
    assert parse_visible(None) is None


def test_launcher_puts_the_plan_in_each_worker_env(monkeypatch) -> None:
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = UpConfig(mode="disagg", prefill_gpus="0-3", decode_gpus="4-7", prefill_tp=4, decode_tp=1,
                   transport="cuda_ipc")
    specs, transport = plan_workers(cfg, "token", "run")
    assert transport == "cuda_ipc"
    env = {s.name: s.env for s in specs}
    assert env["prefill-0"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert env["prefill-0"]["PDBOX_RANK_DEVICES"] == "0,1,2,3"
    assert env["prefill-0"]["PDBOX_PEER_DEVICES"] == "decode-0=4;decode-1=5;decode-2=6;decode-3=7"
    assert env["decode-2"]["CUDA_VISIBLE_DEVICES"] == "6" and env["decode-2"]["PDBOX_RANK_DEVICES"] == "0"
    assert {s.name: s.devices for s in specs}["prefill-0"] == "gpu:0,1,2,3"   # the label keeps its own GPUs


def test_one_side_named_the_other_takes_the_gpus_it_left(monkeypatch) -> None:
    """`--prefill-gpus 2-3` alone on 4 GPUs decodes on 0 and 1 (a fixed half had put decode on 2 and 3,
    beside the prefill ranks, with 0 and 1 idle); the same the other way round; one GPU is shared."""
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def devices(**flags: object) -> dict[str, str]:
        specs, _ = plan_workers(UpConfig(mode="disagg", transport="cuda_ipc", **flags), "token", "run")  # type: ignore[arg-type]
        return {s.name: s.devices for s in specs}

    assert devices(prefill_gpus="2-3", prefill_tp=2) == {"prefill-0": "gpu:2,3", "decode-0": "gpu:0",
                                                         "decode-1": "gpu:1"}
    assert devices(decode_gpus="0-1") == {"prefill-0": "gpu:2", "prefill-1": "gpu:3", "decode-0": "gpu:0",
                                          "decode-1": "gpu:1"}
    assert devices(prefill_gpus="0-3") == {f"prefill-{k}": f"gpu:{k}" for k in range(4)} | {
        f"decode-{k}": f"gpu:{k}" for k in range(4)}  # none left: decode shares them
    assert devices() == {"prefill-0": "gpu:0", "prefill-1": "gpu:1", "decode-0": "gpu:2", "decode-1": "gpu:3"}


def test_tp_sizes_a_worker_would_refuse_are_refused_by_pdbox_up() -> None:
    """A worker refusing its TP size crashed at start-up, was restarted and crashed again: say it up front."""
    with pytest.raises(ValueError, match="--decode-tp must be 1, got 2"):
        UpConfig(mode="disagg", decode_tp=2)
    with pytest.raises(ValueError, match="--mode auto needs --prefill-tp 1, got 2"):
        UpConfig(mode="auto", prefill_tp=2)
    assert UpConfig(mode="disagg", prefill_tp=2).prefill_tp == 2
