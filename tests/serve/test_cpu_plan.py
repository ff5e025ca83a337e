"""`pdbox up` on CPU: how cores become engines (one per core, or one engine on several cores)."""

from __future__ import annotations

import pytest

from appliance.engine_flags import EngineFlags
from appliance.launcher import UpConfig, plan_workers


def engines(**kw) -> list[tuple[str, str, str]]:
    specs, _ = plan_workers(UpConfig(monitor=False, **kw), token="t", run_id="r")
    return [(s.name, s.devices, s.argv[s.argv.index("--tp") + 1]) for s in specs]


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

    on, _ = plan_workers(UpConfig(monitor=False, mode="disagg"), token="t", run_id="r")
    off, _ = plan_workers(UpConfig(monitor=False, mode="disagg", engine=EngineFlags(cuda_graphs=False)),
                          token="t", run_id="r")
    assert all("--no-cuda-graphs" not in s.argv for s in on)
    assert all("--no-cuda-graphs" in s.argv for s in off) and len(off) == 2
    assert worker_config(off[0].argv[3:])[0].engine.cuda_graphs is False
    assert worker_config(on[0].argv[3:])[0].engine.cuda_graphs is True
