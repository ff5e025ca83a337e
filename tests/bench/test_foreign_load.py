"""bench.foreign_load: a lone chat's TTFT and TPOT with the cores idle and with a process spinning on one,
each against a real `pdbox up`."""

from __future__ import annotations

import json
import os

import pytest

from bench.foreign_load import main
from tests.bench.test_startup import appliance_children


def spinners() -> int:
    """This test process's spinning children still alive."""
    me, alive = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        alive += ppid == me and b"while True" in cmd
    return alive


@pytest.mark.slow
def test_idle_and_busy_runs_are_measured_and_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    args = ["--mode", "unified", "--cpus", "0"]  # the embedded model: the chat workload's prompts fit its context
    assert main(["--requests", "2", "--rounds", "1", "--busy-cpu", str(cpu), "--json", "--", *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["up_args"] == args and got["busy_cpu"] == cpu
    assert [len(got["runs"][k]) for k in ("idle", "busy")] == [1, 1]
    for k in ("idle", "busy"):
        assert got["median"][k]["ttft_ms"] > 0 and got["median"][k]["tpot_ms"] > 0
    med = got["median"]
    assert got["busy_over_idle"]["ttft_ms"] == round(med["busy"]["ttft_ms"] / med["idle"]["ttft_ms"], 2)
    assert appliance_children() == 0 and spinners() == 0  # both stopped before the bench returned


def test_bad_options_say_what(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--", "--port", "8000"]) == 2
    assert "leave --port out" in capsys.readouterr().err
    assert main(["--busy-cpu", "4095"]) == 2
    assert "cpu 4095 is not one this process may use" in capsys.readouterr().err
