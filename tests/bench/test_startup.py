"""bench.startup: the wall seconds until ``pdbox up`` serves, a real start-up each run."""

from __future__ import annotations

import json
import os

import pytest

from bench.startup import main, ready_s


def appliance_children() -> int:
    """This test process's `pdbox up` processes and their workers still alive."""
    me = os.getpid()
    alive = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"appliance.cli" in cmd and ppid == me:
            alive += 1
    return alive


def test_a_start_up_is_timed_and_stopped(tiny_model, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", str(tiny_model), "--mode", "unified", "--cpus", "0"]
    assert main(["--runs", "1", "--json", "--", *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["up_args"] == args and len(got["runs"]) == 1 and got["runs"][0] == got["ready_s_median"] > 0
    assert appliance_children() == 0  # stopped before the bench returned


def test_a_start_up_that_fails_says_why(tmp_path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(RuntimeError, match="exited with .* before serving"):
        ready_s(("--model", str(missing)), timeout_s=120, stop_timeout_s=10)


def test_the_port_is_the_bench_s(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--", "--port", "8000"]) == 2
    assert "leave --port out" in capsys.readouterr().err
