"""Pinning an OpenMP team (`kernels/cpu/team.c`): the threads an engine borrows run on the lent core only.

Each test pins a team in a thread of its own: libgomp gives every master thread its own team, and
it ends with the thread, so pytest's own team keeps its cores.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from kernels.cpu.team import native, pin_team, team_cores

CORES = sorted(os.sched_getaffinity(0))
pytestmark = [
    pytest.mark.skipif(native().lib is None, reason=f"no team library: {native().reason}"),
    pytest.mark.skipif(len(CORES) < 2, reason="needs two cores"),
]


def in_thread(fn):
    """``fn()`` on a new thread (its own OpenMP team); its result or its exception."""
    out: list = []

    def run() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # handed to the test's thread
            out.append(("err", exc))

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out, "the thread did not finish in 60 s"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


def test_a_pinned_team_keeps_its_cores_through_torch_ops() -> None:
    home, lent = CORES[0], CORES[1]

    def run():
        torch.set_num_threads(2)
        pin_team([home], [lent])
        a = torch.randn(256, 256)
        for _ in range(3):
            a = torch.tanh(a @ a)  # torch's parallel regions reuse the team
        return team_cores(2)

    assert in_thread(run) == [(home,), (lent,)]


def test_home_threads_may_run_on_every_home_core() -> None:
    if len(CORES) < 3:
        pytest.skip("needs three cores")
    assert in_thread(lambda: (pin_team(CORES[:2], CORES[2:3]), team_cores(3))[1]) == [
        tuple(CORES[:2]), tuple(CORES[:2]), (CORES[2],)]


def test_a_core_the_machine_lacks_is_refused() -> None:
    with pytest.raises(OSError, match="sched_setaffinity refused"):
        in_thread(lambda: pin_team([CORES[0]], [1023]))
    with pytest.raises(ValueError, match="home"):
        pin_team([], [CORES[1]])
