"""Which of an engine's cores other work keeps busy, measured while it runs, and the team it should use.

A CPU engine's OpenMP team waits for its slowest thread at every parallel region, so a team with a thread
on a core that work outside pdbox keeps busy runs at that thread's pace: a process spinning on one core of
a 2-core node made a lone chat's TTFT and TPOT about 2x slower under `pdbox up` (auto), whichever core it
was on (`docs/bench/foreign-load/`). An engine sharing cores with a partner (`core_share`) therefore keeps
its team off such cores: it does not borrow a busy partner core, and when its own core is busy and the
partner is idle it moves its team onto the partner's core until either changes.

Measuring: `/proc/stat` gives each core's busy time (steal left out: a hypervisor's other guests slow every
core alike, and leaving a core would not help), which includes this engine's own threads. While the
team's cores stay the same, this process's CPU time (`time.process_time`) ran on them, so other work took
the team's busy time less that; a core outside the team is all other work (a partner core only while the
partner stays idle). Readings are taken while the engine works: at most every ``read_every_s``, when the
team changes, and when the engine goes idle (its partner may then borrow its cores, which would read as
other work); a core is judged once ``interval_s`` of readings add up, however short each working stretch
(a short prompt's prefill). A team over several cores with other work among them cannot say which core:
the engine then works on one core until the others are judged from outside (`probe`); a probe that finds
no core to flag is not tried again for ``PROBE_REST_S`` (other work that the scheduler moves between cores).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.cpu_load import Times, parse_stat

BUSY = 0.4          # other work took at least this share of a core: flagged (a spinning process sharing
IDLE = 0.15         # the core with one engine thread takes half); cleared below this share
INTERVAL_S = 0.25   # a core is judged over at least this much time
READ_EVERY_S = 0.05
PROBE_REST_S = 5.0  # after a probe that flagged no core, none for this long


def plan_team(home: Sequence[int], lent: Sequence[int], partner_idle: bool, busy: set[int],
              probe: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The team's cores as (cores the first threads share, one core for each further thread): the engine's
    own cores not flagged busy, plus the idle partner's unflagged ones; on its own busy cores only when
    nothing else is free. While probing, one of its own cores alone (the others are read from outside)."""
    free_home = tuple(c for c in home if c not in busy)
    if probe:
        return (free_home or tuple(home))[:1], ()
    free_lent = tuple(c for c in lent if c not in busy) if partner_idle else ()
    if free_home:
        return free_home, free_lent
    if free_lent:
        return free_lent[:1], free_lent[1:]
    return tuple(home), ()


@dataclass
class _Stretch:
    """Since the last reading: the team then, the reading, this process's CPU seconds, the partner."""

    team: tuple[int, ...]
    stat: Times
    cpu_s: float
    partner_stayed_idle: bool


@dataclass
class ForeignLoad:
    """Flags the cores of ``home`` and ``lent`` that other work keeps busy (`busy`). The engine calls
    `observe` before each step and after each layer, `switch` when its team changes, `pause` when it goes
    idle; each returns True when the flags (or `probe`) changed."""

    home: tuple[int, ...]
    lent: tuple[int, ...]
    stat: Path = Path("/proc/stat")
    clock: Callable[[], float] = time.monotonic
    cpu_time: Callable[[], float] = time.process_time
    hz: float = float(os.sysconf("SC_CLK_TCK"))  # /proc/stat's unit, jiffies a second
    interval_s: float = INTERVAL_S
    read_every_s: float = READ_EVERY_S
    busy: set[int] = field(default_factory=set)
    probe: bool = False     # the team's cores hold other work it cannot place: it runs on one core meanwhile
    _open: _Stretch | None = None
    _probe_from: frozenset[int] = frozenset()  # the flags when the probe began
    _probe_rest_until: float = float("-inf")
    _last_read: float = float("-inf")
    _acc: dict[int | tuple[int, ...], list[float]] = field(default_factory=dict)  # other, all (jiffies)

    def observe(self, team: tuple[int, ...], partner_idle: bool) -> bool:
        s = self._open
        if s is not None and s.team == team:
            s.partner_stayed_idle &= partner_idle
            if self.clock() - self._last_read < self.read_every_s:
                return False
        return self._read(team, partner_idle)

    def switch(self, team: tuple[int, ...], partner_idle: bool) -> bool:
        """The team moves to ``team`` now: what ran until now ran on the old one."""
        return self._read(team, partner_idle)

    def pause(self) -> bool:
        """The engine goes idle: read what it ran, and nothing until it works again."""
        return self._read(None, True) if self._open is not None else False

    def _read(self, team: tuple[int, ...] | None, partner_idle: bool) -> bool:
        try:
            stat = parse_stat(self.stat.read_text(), steal_busy=False)
        except (OSError, ValueError):
            self._open = None
            return False
        cpu_s, before = self.cpu_time(), (frozenset(self.busy), self.probe)
        self._last_read = self.clock()
        if self._open is not None:
            self._add(self._open, stat, cpu_s)
            self._judge()
        self._open = None if team is None else _Stretch(team, stat, cpu_s, partner_idle)
        return before != (frozenset(self.busy), self.probe)

    def _add(self, s: _Stretch, after: Times, cpu_s: float) -> None:
        def delta(c: int) -> tuple[float, float] | None:
            if c not in s.stat or c not in after:
                return None
            return after[c][0] - s.stat[c][0], after[c][1] - s.stat[c][1]

        for c in (*self.home, *self.lent):
            d = delta(c)
            if d is None or c in s.team or (c in self.lent and not s.partner_stayed_idle):
                continue  # the team's cores are read together below; an awake partner's core is its own
            self._acc.setdefault(c, [0.0, 0.0])
            self._acc[c][0] += d[0]
            self._acc[c][1] += d[1]
        ds = [delta(c) for c in s.team]
        if any(d is None for d in ds) or not ds:
            return
        key: int | tuple[int, ...] = s.team[0] if len(s.team) == 1 else s.team
        acc = self._acc.setdefault(key, [0.0, 0.0])
        acc[0] += sum(d[0] for d in ds if d) - (cpu_s - s.cpu_s) * self.hz  # other work, in core-jiffies
        acc[1] += sum(d[1] for d in ds if d) / len(ds)

    def _judge(self) -> None:
        for key, (other, total) in list(self._acc.items()):
            if total < self.interval_s * self.hz:
                continue
            del self._acc[key]
            share = other / total
            if isinstance(key, int):
                if share >= BUSY:
                    self.busy.add(key)
                elif share < IDLE:
                    self.busy.discard(key)
                if self.probe:  # the cores were read one by one: over
                    self.probe = False
                    if self.busy <= self._probe_from:  # nothing found: other work that moves about
                        self._probe_rest_until = self.clock() + PROBE_REST_S
            elif share < IDLE:
                self.busy.difference_update(key)
            elif share >= BUSY and not self.probe and self.clock() >= self._probe_rest_until:
                self.probe, self._probe_from = True, frozenset(self.busy)
                for c in (*self.home, *self.lent):  # every core judged on the probe's readings alone
                    self._acc.pop(c, None)
