"""A worker whose process answers nothing to /health for HUNG_KILL_S (SIGSTOP, a frozen host) is killed by
the launcher's supervisor, then restarted like one that exited; a worker still loading, one heard lately,
one healthy and an NVSHMEM PE are left alone. (The whole path on a running appliance:
tests/chaos/test_faults.py::test_frozen_prefill_is_killed_before_decode_reuses_the_pages_it_was_writing.)"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from appliance.launcher import HUNG_KILL_S, Launcher, UpConfig
from appliance.serve.policies import WorkerHandle


@pytest.fixture()
def sleeper():
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_only_a_worker_silent_since_it_last_answered_is_killed(tmp_path, sleeper) -> None:
    said = io.StringIO()
    up = Launcher(UpConfig(mode="unified", cpus="0-1", port=8000, log_dir=str(tmp_path)), err=said)
    now = time.monotonic()
    spec = up.specs[0]
    w = WorkerHandle(name=spec.name, role="unified", url="http://127.0.0.1:1")
    up.router = SimpleNamespace(pool=SimpleNamespace(workers={spec.name: w}))  # the supervisor reads its pool
    spec.proc = sleeper()
    cases = [  # (healthy, last answer, started, NVSHMEM PE) -> left alone
        (True, now - 60, now - 120, False),               # healthy
        (False, now - 60, now - 30, False),               # not heard since its (re)start: loading
        (False, now - HUNG_KILL_S + 1, now - 120, False),  # marked down, but heard lately
        (False, now - 60, now - 120, True),               # an NVSHMEM PE: a job cannot take it back
    ]
    for healthy, heard, started, pe in cases:
        w.healthy, w.last_heard, spec.extra["started_at"] = healthy, heard, started
        spec.extra["nvshmem_pe"] = pe
        up._kill_if_frozen(spec, now)
        assert spec.proc.poll() is None, (healthy, heard, started, pe)
    assert said.getvalue() == ""
    w.healthy, w.last_heard, spec.extra["started_at"], spec.extra["nvshmem_pe"] = False, now - 8, now - 120, False
    up._kill_if_frozen(spec, now)
    assert spec.proc.wait(10) == -9
    assert f"{spec.name} (pid {spec.proc.pid}) has answered nothing for 8 s: killing it" in said.getvalue()
