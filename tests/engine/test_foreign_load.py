"""Cores that work outside pdbox keeps busy (`appliance/engine/foreign_load.py`): the team's plan, and the
readings of /proc/stat less this process's own CPU time, on a fake /proc/stat and fake clocks. The whole
effect on a running `pdbox up`: docs/bench/foreign-load/."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engine.foreign_load import ForeignLoad, plan_team


def test_the_plan_keeps_the_team_off_busy_cores() -> None:
    home, lent = (0,), (1,)
    assert plan_team(home, lent, True, set()) == ((0,), (1,))        # the idle partner's core borrowed
    assert plan_team(home, lent, False, set()) == ((0,), ())         # the partner works: its core is its own
    assert plan_team(home, lent, True, {1}) == ((0,), ())            # the partner's core is busy: not borrowed
    assert plan_team(home, lent, True, {0}) == ((1,), ())            # own core busy: onto the partner's
    assert plan_team(home, lent, False, {0}) == ((0,), ())           # ... only while the partner idles
    assert plan_team(home, lent, True, {0, 1}) == ((0,), ())         # everything busy: stay home
    assert plan_team(home, lent, True, set(), probe=True) == ((0,), ())
    assert plan_team((0, 2), (1, 3), True, {2, 3}) == ((0,), (1,))
    assert plan_team((0, 2), (1, 3), True, {0, 2}) == ((1,), (3,))
    assert plan_team((0, 1), (), False, set()) == ((0, 1), ())      # an engine alone on two cores
    assert plan_team((0, 1), (), False, {0}) == ((1,), ())
    assert plan_team((0, 1), (), False, set(), probe=True) == ((0,), ())  # probing: one core, the rest read
    assert plan_team((0, 1), (), False, {0}, probe=True) == ((1,), ())


class Box:
    """A fake /proc/stat for cores 0 and 1 (busy and idle jiffies at 100 a second) and the two clocks."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "stat"
        self.now = 100.0
        self.own_cpu = 5.0
        self.jiffies = {0: [0, 0], 1: [0, 0]}  # core -> [busy, idle]
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0"] + [f"cpu{c} {b} 0 0 {i} 0 0 0 0" for c, (b, i) in self.jiffies.items()]
        self.path.write_text("\n".join(lines) + "\n")

    def run(self, seconds: float, busy: dict[int, float], own: float) -> None:
        """``seconds`` pass; core c is busy ``busy[c]`` of them; this process used ``own`` cores of CPU."""
        for c, (b, i) in self.jiffies.items():
            share = busy.get(c, 0.0)
            self.jiffies[c] = [b + round(100 * seconds * share), i + round(100 * seconds * (1 - share))]
        self.now += seconds
        self.own_cpu += own * seconds
        self.write()

    def load(self, home: tuple[int, ...] = (0,), lent: tuple[int, ...] = (1,)) -> ForeignLoad:
        return ForeignLoad(home, lent, self.path, clock=lambda: self.now, cpu_time=lambda: self.own_cpu, hz=100.0)


def test_a_busy_partner_core_is_flagged_and_cleared(tmp_path) -> None:
    box = Box(tmp_path)
    f = box.load()
    assert f.observe((0,), True) is False  # the first call opens a stretch
    box.run(0.03, {0: 1.0, 1: 0.9}, own=1.0)
    assert f.observe((0,), True) is False and f.busy == set()  # read at most every 50 ms
    box.run(0.1, {0: 1.0, 1: 0.9}, own=1.0)
    assert f.observe((0,), True) is False and f.busy == set()  # read, but 0.13 s is too short to judge
    box.run(0.2, {0: 1.0, 1: 0.9}, own=1.0)
    assert f.observe((0,), True) is True and f.busy == {1}  # core 0 was this engine; core 1 someone else
    box.run(0.3, {0: 1.0, 1: 0.3}, own=1.0)
    assert f.observe((0,), True) is False and f.busy == {1}  # between the thresholds: unchanged
    box.run(0.3, {0: 1.0, 1: 0.05}, own=1.0)
    assert f.observe((0,), True) is True and f.busy == set()


def test_short_working_stretches_add_up(tmp_path) -> None:
    """A short prompt's prefill works 0.1 s, then idles while its partner (decode) borrows its core: the
    idle time is never read, the working stretches add up to a judgement."""
    box = Box(tmp_path)
    f = box.load()
    changes = []
    for _ in range(3):
        f.observe((0,), True)
        box.run(0.1, {0: 1.0, 1: 1.0}, own=1.0)
        changes.append(f.pause())
        box.run(1.0, {0: 1.0, 1: 0.0}, own=0.0)  # idle: the partner runs on this engine's core, not its own
    assert changes == [False, False, True] and f.busy == {1}  # judged once 0.3 s were read


def test_an_awake_partners_core_is_not_read_as_other_work(tmp_path) -> None:
    box = Box(tmp_path)
    f = box.load()
    f.observe((0,), True)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.0)
    assert f.observe((0,), False) is False and f.busy == set()  # the partner woke: core 1 was its own


def test_own_core_busy_with_other_work_is_flagged(tmp_path) -> None:
    box = Box(tmp_path)
    f = box.load()
    f.observe((0,), False)
    box.run(0.3, {0: 1.0, 1: 0.0}, own=0.5)  # this engine got half of its core: a spinning process the rest
    assert f.observe((0,), False) is True and f.busy == {0}
    assert plan_team((0,), (1,), True, f.busy) == ((1,), ())
    f.switch((1,), True)  # the team moves onto the partner's core; core 0 is read from outside
    box.run(0.3, {0: 0.0, 1: 1.0}, own=1.0)
    assert f.observe((1,), True) is True and f.busy == set()  # the other work is gone: home again


def test_a_team_over_both_cores_probes_without_the_partners(tmp_path) -> None:
    box = Box(tmp_path)
    f = box.load()
    f.observe((0, 1), True)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.1)  # two cores busy, this engine used 1.1 of them: which one?
    assert f.observe((0, 1), True) is True and f.probe and f.busy == set()
    team = plan_team((0,), (1,), True, f.busy, f.probe)
    assert team == ((0,), ())
    f.switch((0,), True)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.0)  # from outside: core 1 is someone else's
    assert f.observe((0,), True) is True and f.busy == {1} and not f.probe
    box.run(0.3, {0: 1.0, 1: 0.0}, own=1.0)
    assert f.observe((0,), True) is True and plan_team((0,), (1,), True, f.busy, f.probe) == ((0,), (1,))
    f.switch((0, 1), True)  # free again: borrowed
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.9)  # both cores this engine's: nothing to flag
    assert f.observe((0, 1), True) is False and f.busy == set() and not f.probe


def test_an_engine_alone_on_two_cores_finds_the_busy_one(tmp_path) -> None:
    """No partner: a team over its own two cores with other work among them runs on one core while the
    other is read from outside, then keeps off the busy one until that work leaves."""
    box = Box(tmp_path)
    f = box.load((0, 1), ())
    f.observe((0, 1), False)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.4)  # two cores busy, this engine used 1.4 of them
    assert f.observe((0, 1), False) is True and f.probe and f.busy == set()
    team = plan_team((0, 1), (), False, f.busy, f.probe)
    assert team == ((0,), ())
    f.switch((0,), False)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.0)  # core 0 all this engine's, core 1 someone else's
    assert f.observe((0,), False) is True and f.busy == {1} and not f.probe
    assert plan_team((0, 1), (), False, f.busy, f.probe) == ((0,), ())
    box.run(0.3, {0: 1.0, 1: 0.02}, own=1.0)  # the other work left
    assert f.observe((0,), False) is True and f.busy == set()
    assert plan_team((0, 1), (), False, f.busy, f.probe) == ((0, 1), ())


def test_a_probe_that_finds_nothing_rests(tmp_path) -> None:
    """Other work the scheduler moves between cores shows on the whole team but on no core alone: after one
    probe, the team stays whole for PROBE_REST_S before it probes again."""
    from appliance.engine.foreign_load import PROBE_REST_S

    box = Box(tmp_path)
    f = box.load((0, 1), ())
    f.observe((0, 1), False)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.4)
    assert f.observe((0, 1), False) is True and f.probe
    f.switch((0,), False)
    box.run(0.3, {0: 1.0, 1: 0.3}, own=1.0)  # alone, neither core shows enough to flag
    assert f.observe((0,), False) is True and not f.probe and f.busy == set()
    f.switch((0, 1), False)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.4)
    assert f.observe((0, 1), False) is False and not f.probe  # resting
    box.run(PROBE_REST_S, {0: 1.0, 1: 1.0}, own=2.0)
    f.observe((0, 1), False)
    box.run(0.3, {0: 1.0, 1: 1.0}, own=1.4)
    assert f.observe((0, 1), False) is True and f.probe  # rested: probes again


@pytest.mark.parametrize("broken", ["missing", "garbage"])
def test_an_unreadable_stat_flags_nothing(tmp_path, broken) -> None:
    box = Box(tmp_path)
    f = box.load()
    f.observe((0,), True)
    box.run(0.3, {1: 1.0}, own=1.0)
    if broken == "missing":
        box.path.unlink()
    else:
        box.path.write_text("cpu1 x y\n")
    assert f.observe((0,), True) is False and f.busy == set()


def test_steal_is_not_other_work(tmp_path) -> None:
    """A hypervisor running other guests (steal) slows every core alike: no core is left for it."""
    path = tmp_path / "stat"
    now = {"t": 0.0}
    f = ForeignLoad((0,), (1,), path, clock=lambda: now["t"], cpu_time=lambda: now["t"], hz=100.0)
    path.write_text("cpu0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0\n")
    f.observe((0,), True)
    now["t"] = 0.5
    path.write_text("cpu0 50 0 0 0 0 0 0 0\ncpu1 0 0 0 25 0 0 0 25\n")  # cpu 1: half idle, half stolen
    f.observe((0,), True)
    assert f.busy == set()
