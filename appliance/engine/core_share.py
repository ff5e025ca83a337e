"""Two CPU engines on one node lend each other their cores while idle.

Unified mode on a small CPU node runs one engine per core (a long prefill on one engine does not stall
the other's decodes), which leaves a lone prompt one core even while the other sits idle. Partners
fix that: each engine publishes whether it has work on a shared board (one byte per engine, a file in
the run's folder); before every step and between layers an engine reads its partner's byte and runs
its OpenMP team over its own cores plus, while the partner is idle, the partner's. The borrowed
threads are pinned to the partner's cores, so when the partner wakes it shares its core with them
for at most one layer, then has it back.

The partner's cores are used only while it has nothing to run, so each engine's own work never waits
on the other's; greedy answers may differ in near ties between a step at one thread and at two (the
GEMMs split their sums differently), as between any two thread counts. With a `ForeignLoad` (a worker's
engine has one), cores that work outside pdbox keeps busy stay out of the team where a free one can
stand in (`appliance.engine.core_team`).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from appliance.engine.core_team import CoreTeam
from appliance.engine.foreign_load import ForeignLoad


@dataclass(frozen=True)
class CoreShare:
    """An engine's place on the board: ``slot`` its byte, ``partner`` the partner's, ``home`` the cores it
    owns, ``lent`` the partner's cores it may borrow."""

    board: str
    slot: int
    partner: int
    home: tuple[int, ...]
    lent: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.board:
            raise ValueError("core sharing needs the board's path")
        if self.slot < 0 or self.partner < 0 or self.slot == self.partner:
            raise ValueError(f"core sharing: slot {self.slot} and partner {self.partner} must be distinct, >= 0")
        if not self.home or not self.lent:
            raise ValueError("core sharing: an engine needs its own cores and its partner's")
        if set(self.home) & set(self.lent):
            raise ValueError(f"core sharing: cores {sorted(set(self.home) & set(self.lent))} are both home and lent")


def make_board(path: Path, engines: int) -> None:
    """The board file for ``engines`` engines, every engine idle (the launcher, before any worker starts)."""
    path.write_bytes(bytes(max(1, engines)))


def mark_idle(path: Path, slot: int) -> None:
    """Clear ``slot``'s byte (the launcher, once that engine's process is gone): an engine that died
    with work would otherwise keep its partner off its cores until its restart had started."""
    with open(path, "r+b") as f:
        f.seek(slot)
        f.write(b"\0")


class SharedCores(CoreTeam):
    """One engine's side: publish busy or idle on the board, borrow the partner's cores while it is idle.

    Called only from the engine thread (the thread whose OpenMP team does the engine's work). ``foreign``:
    measure the cores for other work and keep the team off busy ones (None: the cores are taken as free).
    """

    def __init__(self, share: CoreShare, foreign: ForeignLoad | None = None) -> None:
        super().__init__(share.home, share.lent, foreign)
        self.share = share
        fd = os.open(share.board, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size <= max(share.slot, share.partner):
                raise ValueError(f"core board {share.board} holds {size} engines, slot {share.slot} and partner "
                                 f"{share.partner} need {max(share.slot, share.partner) + 1}")
            self._board = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._board[share.slot] = 0

    def partner_idle(self) -> bool:
        return not self._board[self.share.partner]

    def _publish(self, busy: bool) -> None:
        self._board[self.share.slot] = 1 if busy else 0

    def close(self) -> None:
        if not self._board.closed:
            self.set_busy(False)
            self._board.close()
