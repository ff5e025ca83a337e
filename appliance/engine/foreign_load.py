"""Which of an engine's cores other work keeps busy, measured while it runs, and the team it should use.

A CPU engine's OpenMP team waits for its slowest thread at every parallel region, so a team with a thread
on a core that work outside pdbox keeps busy runs at that thread's pace: a busy loop on one core of a
2-core node made a lone chat's TTFT and TPOT 2.8x slower under `pdbox up` (auto), whichever core it was
on (`docs/bench/foreign-load/`). An engine sharing cores with a partner (`core_share`) therefore keeps
its team off such cores: it does not borrow a busy partner core, and when its own core is busy and the
partner is idle it moves its team onto the partner's core until either changes.

Measuring: `/proc/stat` gives each core's busy time, which includes this engine's own threads. Over an
interval in which the team's cores stay the same, this process's CPU time (`time.process_time`) ran on
them, so other work took the team's busy time less that; a core outside the team is all other work (a
partner core only while the partner stays idle). A team over several cores with other work among them
cannot say which core: the engine then runs one interval without the partner's cores (`probe`), which
measures those from outside.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.cpu_load import Times, parse_stat

BUSY = 0.5          # a core is flagged when other work took at least this share of an interval
IDLE = 0.2          # and cleared below this share
INTERVAL_S = 0.25   # the shortest interval measured


def plan_team(home: Sequence[int], lent: Sequence[int], partner_idle: bool, busy: set[int],
              probe: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The team's cores as (cores the first threads share, one core for each further thread): the engine's
    own cores not flagged busy, plus the idle partner's unflagged ones (none while probing); on its own
    busy cores only when nothing else is free."""
    free_home = tuple(c for c in home if c not in busy)
    free_lent = tuple(c for c in lent if c not in busy) if partner_idle and not probe else ()
    if free_home:
        return free_home, free_lent
    if free_lent:
        return free_lent[:1], free_lent[1:]
    return tuple(home), ()


@dataclass
class _Interval:
    team: tuple[int, ...]
    start: float
    stat: Times
    cpu_s: float
    partner_stayed_idle: bool = True


@dataclass
class ForeignLoad:
    """Flags the cores of ``home`` and ``lent`` that other work keeps busy (`busy`), from intervals of
    at least ``interval_s`` between `observe` calls made with an unchanged team."""

    home: tuple[int, ...]
    lent: tuple[int, ...]
    stat: Path = Path("/proc/stat")
    clock: Callable[[], float] = time.monotonic
    cpu_time: Callable[[], float] = time.process_time
    interval_s: float = INTERVAL_S
    busy: set[int] = field(default_factory=set)
    probe: bool = False     # the team's cores hold other work it cannot place: leave the partner's out once
    _iv: _Interval | None = None

    def reset(self) -> None:
        """End the interval without a reading (the engine went idle: its partner may borrow its cores)."""
        self._iv = None

    def observe(self, team: tuple[int, ...], partner_idle: bool) -> bool:
        """Called with the team's cores before each step and after each layer; returns True when the
        flags (or `probe`) changed, so the caller plans its team again."""
        now = self.clock()
        iv = self._iv
        if iv is None or iv.team != team:
            self._start(team, now)
            return False
        iv.partner_stayed_idle &= partner_idle
        if now - iv.start < self.interval_s:
            return False
        try:
            after = parse_stat(self.stat.read_text())
        except (OSError, ValueError):
            self._iv = None
            return False
        cpu_s = self.cpu_time()
        before = (frozenset(self.busy), self.probe)
        self._judge(iv, after, (cpu_s - iv.cpu_s) / (now - iv.start))
        self._iv = _Interval(team, now, after, cpu_s, partner_idle)
        return before != (frozenset(self.busy), self.probe)

    def _start(self, team: tuple[int, ...], now: float) -> None:
        try:
            stat = parse_stat(self.stat.read_text())
        except (OSError, ValueError):
            self._iv = None
            return
        self._iv = _Interval(team, now, stat, self.cpu_time())

    def _judge(self, iv: _Interval, after: Times, own_cores: float) -> None:
        def share(c: int) -> float | None:
            if c not in iv.stat or c not in after or after[c][1] <= iv.stat[c][1]:
                return None
            return (after[c][0] - iv.stat[c][0]) / (after[c][1] - iv.stat[c][1])

        for c in (*self.home, *self.lent):
            if c in iv.team or (c in self.lent and not iv.partner_stayed_idle):
                continue  # the team's cores are judged together below; an awake partner's core is its own
            s = share(c)
            if s is not None:
                self._flag(c, s)
        shares = [share(c) for c in iv.team]
        if None in shares:
            return
        other = sum(s for s in shares if s is not None) - own_cores  # in cores
        if len(iv.team) == 1:
            self._flag(iv.team[0], other)
            self.probe = False
        elif other < IDLE:
            for c in iv.team:
                self._flag(c, 0.0)
            self.probe = False
        elif other >= BUSY and any(c in self.lent for c in iv.team):
            self.probe = True  # somewhere among them: measure the partner's cores from outside next
        else:
            self.probe = False

    def _flag(self, core: int, share: float) -> None:
        if share >= BUSY:
            self.busy.add(core)
        elif share < IDLE:
            self.busy.discard(core)
