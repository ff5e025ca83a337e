"""`pdbox up` on CPU: how cores become engines (one per core, or one engine on several cores)."""

from __future__ import annotations

import pytest

from appliance.engine_flags import EngineFlags
from appliance.launcher import UpConfig, plan_workers


def engines(**kw) -> list[tuple[str, str, str]]:
    specs, _ = plan_workers(UpConfig(monitor=False, share_cores=False, **kw), token="t", run_id="r")
    return [(s.name, s.devices, s.argv[s.argv.index("--tp") + 1]) for s in specs]


def shares(run_dir, **kw) -> list:
    """Each worker's core share, as the worker itself reads its command line."""
    from appliance.serve.worker_config import worker_config

    specs, _ = plan_workers(UpConfig(monitor=False, **kw), token="t", run_id="r", run_dir=run_dir)
    return [worker_config(s.argv[3:])[0].cores for s in specs]


def test_cpu_engines_pair_up_to_share_cores(tmp_path) -> None:
    from appliance.engine.core_share import CoreShare

    board = str(tmp_path / "cores.board")
    assert shares(tmp_path, mode="unified", cpus="0-1") == [CoreShare(board, 0, 1, (0,), (1,)),
                                                            CoreShare(board, 1, 0, (1,), (0,))]
    assert (tmp_path / "cores.board").read_bytes() == b"\0\0"  # every engine idle
    three = shares(tmp_path, mode="unified", cpus="0-2")
    assert [c and (c.slot, c.partner) for c in three] == [(0, 1), (1, 0), None]  # the odd one out keeps its own
    assert [c.home for c in shares(tmp_path, mode="unified", cpus="0-3", cores_per_engine=2)] == [(0, 1), (2, 3)]
    assert [(c.home, c.lent) for c in shares(tmp_path, mode="disagg", prefill_cpus="0", decode_cpus="1")] == [
        ((0,), (1,)), ((1,), (0,))]
    assert shares(tmp_path, mode="disagg", prefill_cpus="0", decode_cpus="0") == [None, None]  # nothing to lend


@pytest.mark.parametrize("kw", [{"share_cores": False}, {"cores_per_engine": 2}, {"tp": 2}],
                         ids=["off", "one-engine", "tp"])
def test_no_sharing_when_off_alone_or_tp(tmp_path, kw) -> None:
    assert set(shares(tmp_path, mode="unified", cpus="0-1", **kw)) == {None}


def test_sharing_needs_the_run_folder() -> None:
    with pytest.raises(ValueError, match="--no-share-cores"):
        plan_workers(UpConfig(monitor=False, mode="unified", cpus="0-1"), token="t", run_id="r")


def test_unified_one_engine_per_core_by_default() -> None:
    assert engines(mode="unified", cpus="0-1") == [("unified-0", "cpu:0", "1"), ("unified-1", "cpu:1", "1")]


def test_unified_one_engine_on_both_cores() -> None:
    assert engines(mode="unified", cpus="0-1", cores_per_engine=2) == [("unified-0", "cpu:0,1", "1")]
    assert engines(mode="unified", cpus="0-3", cores_per_engine=2, tp=2) == [
        ("unified-0", "cpu:0,1", "2"), ("unified-1", "cpu:2,3", "2")]


@pytest.mark.parametrize("kw,needle", [
    ({"cores_per_engine": -1}, "--cores-per-engine"),
    ({"cores_per_engine": 3, "tp": 2}, "multiple of --tp"),
])
def test_bad_cores_per_engine(kw, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        UpConfig(mode="unified", **kw)


def test_cores_that_do_not_split_are_refused() -> None:
    with pytest.raises(ValueError, match="do not split"):
        engines(mode="unified", cpus="0-2", cores_per_engine=2)


def test_no_cuda_graphs_reaches_every_worker_and_its_engine_config() -> None:
    from appliance.serve.worker_config import worker_config

    on, _ = plan_workers(UpConfig(monitor=False, mode="disagg", share_cores=False), token="t", run_id="r")
    off, _ = plan_workers(UpConfig(monitor=False, mode="disagg", share_cores=False,
                                   engine=EngineFlags(cuda_graphs=False)), token="t", run_id="r")
    assert all("--no-cuda-graphs" not in s.argv for s in on)
    assert all("--no-cuda-graphs" in s.argv for s in off) and len(off) == 2
    assert worker_config(off[0].argv[3:])[0].engine.cuda_graphs is False
    assert worker_config(on[0].argv[3:])[0].engine.cuda_graphs is True
