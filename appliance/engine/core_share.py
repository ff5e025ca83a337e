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
stand in (`appliance.engine.foreign_load`).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.engine.foreign_load import ForeignLoad, plan_team

log = logging.getLogger("pdbox.engine")


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


class SharedCores:
    """One engine's side: publish busy or idle, size the OpenMP team to what is free.

    Called only from the engine thread (the thread whose OpenMP team does the engine's work). ``foreign``:
    measure the cores for other work and keep the team off busy ones (None: the cores are taken as free).
    """

    def __init__(self, share: CoreShare, foreign: ForeignLoad | None = None) -> None:
        import torch

        from kernels.cpu.team import native, pin_team

        native().required("core sharing needs pdbox's team-pinning library")
        self.share = share
        self._torch, self._pin = torch, pin_team
        fd = os.open(share.board, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size <= max(share.slot, share.partner):
                raise ValueError(f"core board {share.board} holds {size} engines, slot {share.slot} and partner "
                                 f"{share.partner} need {max(share.slot, share.partner) + 1}")
            self._board = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.threads = len(share.home)
        self.team: tuple[tuple[int, ...], tuple[int, ...]] = (share.home, ())  # (shared cores, one a thread)
        self.foreign = foreign
        self._plan: tuple[bool, tuple[tuple[int, ...], tuple[int, ...]]] | None = None  # (partner idle, team)
        torch.set_num_threads(self.threads)
        self._busy = False
        self._board[share.slot] = 0
        self.borrowed_s = 0.0  # seconds run with the partner's cores
        self.borrows = 0  # times the team grew onto them
        self._since = 0.0

    @property
    def borrowing(self) -> bool:
        """The team runs on a partner core (beside its own, or instead of its own busy ones)."""
        return any(c in self.share.lent for cores in self.team for c in cores)

    def borrowed_seconds(self) -> float:
        """Seconds run with the partner's cores so far (the stretch under way included)."""
        return self.borrowed_s + (time.perf_counter() - self._since if self.borrowing else 0.0)

    def set_busy(self, busy: bool) -> None:
        """Tell the partner whether this engine has work (its cores are lent only while it has none)."""
        if busy != self._busy:
            self._board[self.share.slot] = 1 if busy else 0
            self._busy = busy
            if not busy:
                self.fit_to(self.share.home, ())
                if self.foreign is not None:  # idle, the partner may borrow this engine's cores: no reading
                    self._said(self.foreign.pause())
                    self._plan = None

    def fit(self, _layer: int = -1) -> None:
        """Before a step and after each layer: borrow the partner's cores if it is idle, else give them back
        (with a `ForeignLoad`, leaving out the cores other work keeps busy)."""
        idle = not self._board[self.share.partner]
        f = self.foreign
        if f is None:
            self.fit_to(self.share.home, self.share.lent if idle else ())
            return
        changed = f.observe(self.team[0] + self.team[1], idle)
        self._said(changed)
        if changed or self._plan is None or self._plan[0] != idle:  # planned again only when an input changed
            self._plan = (idle, plan_team(self.share.home, self.share.lent, idle, f.busy, f.probe))
        team = self._plan[1]
        if team != self.team:
            if f.switch(team[0] + team[1], idle):
                self._said(True)
                self._plan = None
            self.fit_to(*team)

    def _said(self, changed: bool) -> None:
        f = self.foreign
        if changed and f is not None and not f.probe:
            log.info("cores that other work keeps busy: %s", ", ".join(f"cpu {c}" for c in sorted(f.busy)) or "none")

    def fit_to(self, shared: tuple[int, ...], own: tuple[int, ...]) -> None:
        """Run the team with its first threads on ``shared`` and one more thread on each of ``own``."""
        if (shared, own) == self.team:
            return
        now, was = time.perf_counter(), self.borrowing
        threads = len(shared) + len(own)
        # libgomp may have let the extra threads go while the team was small: pin afresh each time; back to
        # its own cores alone, only where the first threads had moved (onto a partner's core)
        if (shared, own) != (self.share.home, ()) or self.team[0] != shared:
            self._pin(shared, own)
        self._torch.set_num_threads(threads)
        self.team, self.threads = (shared, own), threads
        if self.borrowing and not was:
            self.borrows += 1
            self._since = now
        elif was and not self.borrowing:
            self.borrowed_s += now - self._since

    def layer_hook(self, hook: Callable[[int], None] | None) -> Callable[[int], None]:
        """``hook`` (a handoff's, or none), then :meth:`fit`, after every layer."""
        if hook is None:
            return self.fit

        def both(layer: int) -> None:
            hook(layer)
            self.fit(layer)

        return both

    def close(self) -> None:
        if not self._board.closed:
            self.set_busy(False)
            self._board.close()
