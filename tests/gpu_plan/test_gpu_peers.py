"""Peer access between the GPUs that hand KV over, checked before a GPU transport is chosen (on CPU: the
pairs, the decision, and the child process that asks CUDA)."""

from __future__ import annotations

import pytest

from appliance import launcher
from appliance.gpu_peers import choose_transport, handoff_pairs, peer_access
from appliance.gpu_plan import GpuGroup
from appliance.launcher import UpConfig, plan_workers

PRE, DEC = GpuGroup("prefill-0", "prefill", (0, 1)), GpuGroup("decode-0", "decode", (2, 3))


def test_the_pairs_are_every_writer_and_pool_on_distinct_gpus() -> None:
    assert handoff_pairs("disagg", [PRE, DEC]) == ((0, 2), (0, 3), (1, 2), (1, 3))
    shared = [GpuGroup("prefill-0", "prefill", (0,)), GpuGroup("decode-0", "decode", (0,))]
    assert handoff_pairs("disagg", shared) == ()  # one GPU shared: no peer access needed
    auto = [GpuGroup("auto-0", "prefill", (0,)), GpuGroup("auto-1", "decode", (1,))]
    assert handoff_pairs("auto", auto) == ((0, 1), (1, 0))  # every engine may hand over to every other
    assert handoff_pairs("unified", [PRE, DEC]) == ()


def _never(pairs):
    raise AssertionError(f"asked about {pairs}")


def test_a_transport_is_kept_refused_or_replaced_by_tcp() -> None:
    pairs = ((0, 2), (1, 2))
    assert choose_transport("cuda_ipc", True, pairs, lambda ps: dict.fromkeys(ps, True)) == ("cuda_ipc", None)
    assert choose_transport("tcp", True, pairs, _never) == ("tcp", None)
    assert choose_transport("cuda_ipc", False, (), _never) == ("cuda_ipc", None)
    half = {(0, 2): True, (1, 2): False}
    with pytest.raises(ValueError, match=r"--transport cuda_ipc .* GPU 1 -> GPU 2 has none"):
        choose_transport("cuda_ipc", True, pairs, lambda ps: half)
    with pytest.raises(ValueError, match="--transport nvshmem"):
        choose_transport("nvshmem", True, pairs, lambda ps: half)
    got, line = choose_transport("cuda_ipc", False, pairs, lambda ps: half)  # the probe's pick: fall back
    assert got == "tcp" and "GPU 1 -> GPU 2" in line and "GPU 0 -> GPU 2" not in line

    def broken(ps):
        raise RuntimeError("no answer in 60 s")

    got, line = choose_transport("cuda_ipc", True, pairs, broken)
    assert got == "cuda_ipc" and line.startswith("warning") and "no answer" in line


def test_the_child_says_why_it_cannot_answer() -> None:
    assert peer_access(()) == {}
    with pytest.raises(RuntimeError) as err:  # no GPU 4096 anywhere (nor CUDA here): the child's error comes back
        peer_access(((0, 4096),), timeout_s=120)
    assert str(err.value)


def test_the_launcher_refuses_a_named_transport_without_peer_access(monkeypatch) -> None:
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = UpConfig(mode="disagg", prefill_gpus="0", decode_gpus="1", transport="cuda_ipc")
    asked: list = []
    lines: list[str] = []
    specs, transport = plan_workers(cfg, "t", "r", ask_peers=lambda ps: asked.append(ps) or dict.fromkeys(ps, True),
                                    say=lines.append)
    assert transport == "cuda_ipc" and asked == [((0, 1),)] and lines == []
    assert all("cuda_ipc" in s.argv for s in specs)
    with pytest.raises(ValueError, match="GPU 0 -> GPU 1 has none"):
        plan_workers(cfg, "t", "r", ask_peers=lambda ps: dict.fromkeys(ps, False), say=lines.append)
    shared = UpConfig(mode="disagg", prefill_gpus="0", decode_gpus="0", transport="cuda_ipc")
    assert plan_workers(shared, "t", "r", ask_peers=_never)[1] == "cuda_ipc"  # one GPU: nothing to ask
