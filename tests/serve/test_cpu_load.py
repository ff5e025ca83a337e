"""`pdbox up` names the cores other work keeps busy before its engines start (`appliance/cpu_load.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cpu_load import busy_cores_line, busy_fractions, parse_stat, worker_cpus

STAT = """cpu  500 0 100 1000 20 0 0 0 0 0
cpu0 200 0 50 500 10 0 0 0 0 0
cpu1 300 0 50 500 10 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_parse_stat_counts_all_but_idle_and_iowait_as_busy() -> None:
    assert parse_stat(STAT) == {0: (250, 760), 1: (350, 860)}
    assert parse_stat("\n" + STAT + "\n") == parse_stat(STAT)  # blank lines are skipped


def test_busy_fractions_over_an_interval() -> None:
    before = {0: (250, 760), 1: (350, 860)}
    after = {0: (340, 860), 1: (355, 960)}  # cpu 0 busy 90 of 100 ticks, cpu 1 5 of 100
    assert busy_fractions(before, after, [0, 1, 7]) == pytest.approx({0: 0.9, 1: 0.05})  # cpu 7 unknown: left out
    assert busy_fractions(before, before, [0]) == {0: 0.0}  # no ticks passed


def test_the_line_names_only_the_busy_cores(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)

    def sleep(_s: float) -> None:  # the interval passes: cpu 1 busy 80 of 100 ticks, cpu 0 idle
        stat.write_text(STAT.replace("cpu0 200 0 50 500", "cpu0 200 0 50 600").replace("cpu1 300 0 50 500",
                                                                                         "cpu1 380 0 50 520"))

    line = busy_cores_line([0, 1], stat=stat, sleep=sleep)
    assert line is not None and "cpu 1 80%" in line and "cpu 0" not in line and "--cpus" in line
    stat.write_text(STAT)
    assert busy_cores_line([0], stat=stat, sleep=sleep) is None  # cpu 0 was idle
    assert busy_cores_line([0, 1], stat=tmp_path / "missing", sleep=sleep) is None  # no /proc/stat: no line
    assert busy_cores_line([], stat=stat, sleep=lambda _s: pytest.fail("no cores: no sample")) is None


def test_worker_cpus_reads_the_workers_device_strings() -> None:
    assert worker_cpus(["cpu:0", "cpu:1,2", "cpu:2"]) == [0, 1, 2]
    assert worker_cpus(["gpu:0", "gpu:1"]) == []


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_a_core_spinning_in_another_process_is_named() -> None:
    core = sorted(os.sched_getaffinity(0))[-1]
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        line = busy_cores_line([core], sample_s=0.5)
    finally:
        hog.kill()
        hog.wait()
    assert line is not None and f"cpu {core} " in line, line
