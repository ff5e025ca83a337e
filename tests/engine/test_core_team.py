"""An engine alone on several cores (`appliance/engine/core_team.py`): its team keeps off a core that other work
keeps busy, fed a fake /proc/stat, and a unified worker on two cores gets such a team. The whole effect on a
running `pdbox up`: docs/bench/foreign-load/."""

from __future__ import annotations

import pytest

from appliance.engine.core_team import CoreTeam
from kernels.cpu.team import team_cores
from tests.engine.test_core_share import CORES, needs_two, on_thread


def test_a_team_needs_a_core() -> None:
    with pytest.raises(ValueError, match="at least one core"):
        CoreTeam(())


@needs_two
def test_an_engine_alone_leaves_a_core_other_work_keeps_busy(tmp_path, caplog) -> None:
    from appliance.engine.foreign_load import ForeignLoad

    a, b = CORES[0], CORES[1]
    stat = tmp_path / "stat"
    clock = {"now": 0.0, "cpu": 0.0}

    def write(busy_a: int, busy_b: int) -> None:  # jiffies (100 a second) each core was busy so far
        idle = [round(100 * clock["now"]) - busy for busy in (busy_a, busy_b)]
        stat.write_text(f"cpu{a} {busy_a} 0 0 {idle[0]} 0 0 0 0\ncpu{b} {busy_b} 0 0 {idle[1]} 0 0 0 0\n")

    def run():
        foreign = ForeignLoad((a, b), (), stat, clock=lambda: clock["now"], cpu_time=lambda: clock["cpu"])
        team = CoreTeam((a, b), (), foreign)
        team.set_busy(True)
        write(0, 0)
        team.fit()  # both cores; the reading starts
        seen = [team.team, team.threads]
        clock["now"], clock["cpu"] = 0.5, 0.7
        write(50, 50)  # both cores busy the whole 0.5 s; this engine ran 0.7 s of the 1.0: which core is it?
        team.fit()  # probing: one core
        seen += [foreign.probe, team.team, team_cores(1)]
        clock["now"], clock["cpu"] = 1.0, 1.2
        write(100, 100)  # core a all this engine's, core b someone else's
        team.fit()
        seen += [set(foreign.busy), team.team, team_cores(1)]
        clock["now"], clock["cpu"] = 1.5, 1.7
        write(150, 101)  # the other work left core b
        team.fit()
        seen += [set(foreign.busy), team.team, team.threads, team.borrowing]
        team.set_busy(False)
        team.close()
        return seen

    with caplog.at_level("INFO", logger="pdbox.engine"):
        seen = on_thread(run)
    assert seen == [((a, b), ()), 2, True, ((a,), ()), [(a,)], {b}, ((a,), ()), [(a,)],
                    set(), ((a, b), ()), 2, False]
    assert f"other work keeps busy: cpu {b}" in caplog.text and "other work keeps busy: none" in caplog.text


@needs_two
def test_a_unified_worker_on_two_cores_fits_its_team(tiny_model) -> None:
    from appliance.config import EngineConfig
    from appliance.serve.worker import Worker
    from appliance.serve.worker_config import WorkerConfig

    w = Worker(WorkerConfig(role="unified", name="u0", model=str(tiny_model), cpus=(CORES[0], CORES[1]),
                            engine=EngineConfig(threads=2, dtype="float32")))
    on_thread(w.build_engine)
    try:
        assert type(w.engine.cores) is CoreTeam and w.engine.cores.home == (CORES[0], CORES[1])
        assert w.engine.cores.foreign is not None and w.engine.cores.lent == ()
        from appliance.monitor.prom import Metrics
        from appliance.serve.worker_metrics import WorkerMetrics

        served = Metrics.from_text(WorkerMetrics(w).render())
        assert served.value("pdbox_cores_busy_elsewhere") == 0
        assert not served.has("pdbox_core_borrows_total")  # no partner: nothing to borrow
    finally:
        w.engine.shutdown()
    one = Worker(WorkerConfig(role="unified", name="u1", model=str(tiny_model), cpus=(CORES[0],),
                              engine=EngineConfig(threads=1, dtype="float32")))
    on_thread(one.build_engine)
    assert one.engine.cores is None  # one core: nothing to leave
    one.engine.shutdown()
