"""Two CPU engines lending each other their cores (`appliance/engine/core_share.py`): the board, the team's
size and where its threads run, the per-layer hook. The engines are stood in for by the board's bytes."""

from __future__ import annotations

import os
import threading

import pytest

from appliance.engine.core_share import CoreShare, SharedCores, make_board
from kernels.cpu.team import native, team_cores

CORES = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CORES) < 2 or native().lib is None, reason="needs two cores and the team library")


def on_thread(fn):
    """Run ``fn`` on its own thread (SharedCores sizes the calling thread's OpenMP team) and restore
    torch's thread count for the tests after this one."""
    import torch

    before = torch.get_num_threads()
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(60)
    torch.set_num_threads(before)
    assert out, "the thread failed or hung; see its traceback above"
    return out[0]


@pytest.mark.parametrize("kw,needle", [
    ({"board": ""}, "board"),
    ({"slot": 1, "partner": 1}, "distinct"),
    ({"slot": -1}, "distinct"),
    ({"lent": ()}, "partner's"),
    ({"lent": (0,)}, "both home and lent"),
])
def test_bad_shares_are_refused(kw, needle) -> None:
    base = {"board": "b", "slot": 0, "partner": 1, "home": (0,), "lent": (1,)}
    with pytest.raises(ValueError, match=needle):
        CoreShare(**{**base, **kw})


def test_a_board_too_small_for_the_slots_is_refused(tmp_path) -> None:
    board = tmp_path / "cores.board"
    make_board(board, 2)
    with pytest.raises(ValueError, match="holds 2 engines"):
        SharedCores(CoreShare(str(board), 0, 2, (0,), (1,)))


@needs_two
def test_borrows_while_the_partner_idles_and_gives_back_when_it_wakes(tmp_path) -> None:
    import torch

    board = tmp_path / "cores.board"
    make_board(board, 2)
    home, lent = CORES[0], CORES[1]

    def run():
        cores = SharedCores(CoreShare(str(board), 0, 1, (home,), (lent,)))
        seen = [cores.threads]
        cores.set_busy(True)
        busy_byte = board.read_bytes()[0]
        cores.fit()  # the partner is idle: borrow
        seen += [cores.threads, torch.get_num_threads(), team_cores(2)]
        with open(board, "r+b") as f:  # the partner wakes
            f.seek(1)
            f.write(b"\x01")
        hooked: list[int] = []
        cores.layer_hook(hooked.append)(7)  # after a layer: the handoff's hook runs, then the check
        seen += [hooked, cores.threads, torch.get_num_threads()]
        with open(board, "r+b") as f:  # idle again
            f.seek(1)
            f.write(b"\x00")
        cores.layer_hook(None)(0)
        seen += [cores.threads, cores.borrows, cores.borrowed_seconds() > 0]
        cores.set_busy(False)  # going idle gives the cores back and says so
        seen += [cores.threads, board.read_bytes()[0]]
        cores.close()
        return busy_byte, seen

    busy_byte, seen = on_thread(run)
    assert busy_byte == 1
    assert seen == [1, 2, 2, [(home,), (lent,)], [7], 1, 1, 2, 2, True, 1, 0]


def test_a_worker_that_cannot_share_serves_on_its_own_cores(tiny_model, tmp_path, caplog) -> None:
    from appliance.config import EngineConfig
    from appliance.serve.worker import Worker
    from appliance.serve.worker_config import WorkerConfig

    share = CoreShare(str(tmp_path / "no-board"), 0, 1, (0,), (1,))
    w = Worker(WorkerConfig(role="unified", name="u0", model=str(tiny_model), cpus=(0,), cores=share,
                            engine=EngineConfig(threads=1, dtype="float32")))
    with caplog.at_level("WARNING", logger="pdbox.worker"):
        on_thread(w.build_engine)
    assert w.engine.cores is None
    assert "core sharing is off" in caplog.text and "no-board" in caplog.text
    w.engine.shutdown()


@needs_two
def test_a_team_leaves_cores_other_work_keeps_busy(tmp_path, caplog) -> None:
    """With a `ForeignLoad` (fed a fake /proc/stat): the engine's own core busy with other work, the team
    runs on the idle partner's core instead; back home (its thread re-pinned) when the partner wakes."""
    from appliance.engine.foreign_load import ForeignLoad

    board = tmp_path / "cores.board"
    make_board(board, 2)
    home, lent = CORES[0], CORES[1]
    stat = tmp_path / "stat"
    clock = {"now": 0.0, "cpu": 0.0}

    def write(busy_home: int) -> None:  # jiffies (100 a second): the home core busy that many, the partner's idle
        stat.write_text(f"cpu{home} {busy_home} 0 0 1000 0 0 0 0\ncpu{lent} 0 0 0 {1000 + busy_home} 0 0 0 0\n")

    def run():
        foreign = ForeignLoad((home,), (lent,), stat, clock=lambda: clock["now"], cpu_time=lambda: clock["cpu"])
        cores = SharedCores(CoreShare(str(board), 0, 1, (home,), (lent,)), foreign)
        cores.set_busy(True)
        write(0)
        cores.fit()  # borrows the idle partner's core; the interval starts
        seen = [cores.team]
        with open(board, "r+b") as f:  # the partner wakes: measure this engine's core alone
            f.seek(1)
            f.write(b"\x01")
        cores.fit()  # gives the partner's core back
        cores.fit()  # a reading starts on the team as it now is (each change of team starts one afresh)
        clock["now"], clock["cpu"] = 0.5, 0.1
        write(50)  # its core was busy the whole 0.5 s (50 jiffies of 100 a second), this engine ran 0.1 s
        cores.fit()
        with open(board, "r+b") as f:  # the partner idles again: the team moves onto its core
            f.seek(1)
            f.write(b"\x00")
        cores.fit()
        seen += [foreign.busy, cores.team, team_cores(1), cores.borrowing]
        with open(board, "r+b") as f:
            f.seek(1)
            f.write(b"\x01")
        cores.fit()
        seen += [cores.team, team_cores(1)]
        cores.close()
        return seen

    with caplog.at_level("INFO", logger="pdbox.engine"):
        seen = on_thread(run)
    assert seen == [((home,), (lent,)), {home}, ((lent,), ()), [(lent,)], True, ((home,), ()), [(home,)]]
    assert f"other work keeps busy: cpu {home}" in caplog.text
