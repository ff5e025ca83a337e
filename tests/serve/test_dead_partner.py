"""An engine whose process dies while busy leaves its byte on the core board set; the launcher clears it,
so its partner can borrow the dead engine's cores until the restart is up (CPU core sharing)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

from appliance.engine.core_share import mark_idle
from appliance.launcher import Launcher, UpConfig


def test_mark_idle_clears_one_slot(tmp_path) -> None:
    board = tmp_path / "cores.board"
    board.write_bytes(b"\1\1\1")
    mark_idle(board, 1)
    assert board.read_bytes() == b"\1\0\1"


def test_supervise_clears_a_dead_engines_byte_before_its_restart(tmp_path) -> None:
    said = io.StringIO()
    launcher = Launcher(UpConfig(mode="unified", cpus="0-1", port=8000, log_dir=str(tmp_path)), err=said)
    board = tmp_path / "cores.board"
    assert [s.extra["core_slot"] for s in launcher.specs] == [(board, 0), (board, 1)]
    board.write_bytes(b"\1\1")  # both busy; engine 1 then dies mid-step
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
    dead.wait(10)
    launcher.specs[0].proc, launcher.specs[1].proc = alive, dead
    restarted = []
    launcher.start = restarted.append  # type: ignore[method-assign]  # no real worker: record the restart

    async def run() -> None:
        task = asyncio.ensure_future(launcher.supervise())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if restarted:
                break
        launcher.stopping = True
        await asyncio.wait_for(task, 5)

    try:
        asyncio.run(run())
    finally:
        alive.kill()
        alive.wait()
    assert restarted == [launcher.specs[1]]
    assert "unified-1" in said.getvalue() and "exited with code 9" in said.getvalue()
    assert board.read_bytes() == b"\1\0"  # the live engine's byte untouched, the dead one's cleared
