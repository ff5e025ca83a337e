"""The OpenMP team of a CPU engine: which cores its threads run on, fitted before every step and after each layer.

An engine owns its cores (``home``) and may run on a partner engine's (``lent``) while that partner is idle
(`appliance.engine.core_share`). With a `ForeignLoad`, the cores that work outside pdbox keeps busy stay out of
the team where a free one can stand in: the team waits for its slowest thread at every parallel region, so a
thread on a core some other process spins on runs the whole team at that thread's pace. This holds for an engine
alone on several cores too (``pdbox up --mode unified --cpus 0-1 --cores-per-engine 2``): it drops to its free
cores until the other work leaves (`docs/design.md` §4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from appliance.engine.foreign_load import ForeignLoad, plan_team

log = logging.getLogger("pdbox.engine")

Team = tuple[tuple[int, ...], tuple[int, ...]]  # (cores the first threads share, one core for each further thread)


class CoreTeam:
    """Sizes and pins the calling thread's OpenMP team. Called only from the engine thread.

    ``home``: the engine's own cores; ``lent``: a partner's, used while `partner_idle` (a subclass says when);
    ``foreign``: measure the cores for other work and keep the team off busy ones (None: all taken as free).
    """

    def __init__(self, home: tuple[int, ...], lent: tuple[int, ...] = (), foreign: ForeignLoad | None = None) -> None:
        import torch

        from kernels.cpu.team import native, pin_team

        if not home:
            raise ValueError("an engine's team needs at least one core of its own")
        native().required("fitting the team to its cores needs pdbox's team-pinning library")
        self.home, self.lent = tuple(home), tuple(lent)
        self._torch, self._pin = torch, pin_team
        self.team: Team = (self.home, ())
        self.foreign = foreign
        self._plan: tuple[bool, Team] | None = None  # (partner idle, team), planned again when an input changes
        torch.set_num_threads(self.threads)
        self.borrowed_s = 0.0  # seconds run with the partner's cores
        self.borrows = 0  # times the team grew onto them
        self._since = 0.0
        self._busy = False

    def partner_idle(self) -> bool:
        """Whether the partner's cores are free to borrow now (an engine alone has none)."""
        return False

    @property
    def threads(self) -> int:
        """The team's size: one thread for each core of its own shared ones, one for each further core."""
        return len(self.team[0]) + len(self.team[1])

    @property
    def borrowing(self) -> bool:
        """The team runs on a partner core (beside its own, or instead of its own busy ones)."""
        return any(c in self.lent for cores in self.team for c in cores)

    def borrowed_seconds(self) -> float:
        """Seconds run with the partner's cores so far (the stretch under way included)."""
        return self.borrowed_s + (time.perf_counter() - self._since if self.borrowing else 0.0)

    def fit(self, _layer: int = -1) -> None:
        """Before a step and after each layer: borrow the partner's cores if it is idle, else give them back
        (with a `ForeignLoad`, leaving out the cores other work keeps busy)."""
        idle = self.partner_idle()
        f = self.foreign
        if f is None:
            self.fit_to(self.home, self.lent if idle else ())
            return
        changed = f.observe(self.team[0] + self.team[1], idle)
        self._said(changed)
        if changed or self._plan is None or self._plan[0] != idle:
            self._plan = (idle, plan_team(self.home, self.lent, idle, f.busy, f.probe))
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
        # libgomp may have let the extra threads go while the team was small: pin afresh each time; back to
        # its own cores alone, only where the first threads had moved
        if (shared, own) != (self.home, ()) or self.team[0] != shared:
            self._pin(shared, own)
        self.team = (shared, own)
        self._torch.set_num_threads(self.threads)
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

    def set_busy(self, busy: bool) -> None:
        """Whether the engine has work: idle, its team goes home and nothing is read until it works again."""
        if busy == self._busy:
            return
        self._busy = busy
        self._publish(busy)
        if not busy:
            self.fit_to(self.home, ())
            if self.foreign is not None:  # idle, a partner may borrow this engine's cores: no reading
                self._said(self.foreign.pause())
                self._plan = None

    def _publish(self, busy: bool) -> None:
        """Tell the partner (an engine alone has none)."""

    def close(self) -> None:
        """Release what the team holds (an engine alone, nothing)."""
