"""Is another process busy on the cores pdbox is about to use? Read from ``/proc/stat`` at start-up.

pdbox's CPU engines run OpenMP teams that wait for their slowest thread at every parallel region, so a
core that other work keeps busy slows every step that uses it several-fold, whatever the mode
(`docs/bench/modes-chat1-37ce3a1/`). ``pdbox up`` samples its cores for a moment before it starts its
engines and names the busy ones, so a slow node explains itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

BUSY_FRACTION = 0.3  # a core busy this share of the sample is named
SAMPLE_S = 0.3

Times = dict[int, tuple[int, int]]  # cpu -> (busy jiffies, all jiffies)


def parse_stat(text: str, steal_busy: bool = True) -> Times:
    """Each ``cpuN`` line of ``/proc/stat`` as (busy, all) jiffies; busy is all but idle and iowait, and
    but steal (time the hypervisor ran something else) unless ``steal_busy``."""
    out: Times = {}
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        if not name.startswith("cpu") or name == "cpu" or not fields:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0) + (ticks[7] if len(ticks) > 7 and not steal_busy else 0)
        out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_fractions(before: Times, after: Times, cpus: Sequence[int]) -> dict[int, float]:
    """The share of the interval each of ``cpus`` was busy (cores missing from either sample left out)."""
    out = {}
    for c in cpus:
        if c in before and c in after:
            total = after[c][1] - before[c][1]
            out[c] = (after[c][0] - before[c][0]) / total if total > 0 else 0.0
    return out


def worker_cpus(devices: Sequence[str]) -> list[int]:
    """The cores of the workers' ``cpu:0,1``-style device strings (GPU workers' ``gpu:...`` left out)."""
    return sorted({int(c) for d in devices if d.startswith("cpu:") for c in d[4:].split(",") if c})


def sample_busy(cpus: Sequence[int], sample_s: float = SAMPLE_S, stat: Path = Path("/proc/stat"),
                sleep: Callable[[float], None] = time.sleep) -> dict[int, float] | None:
    """Each of ``cpus``' busy share over ``sample_s`` from now, or None where /proc/stat cannot be read."""
    try:
        before = parse_stat(stat.read_text())
        sleep(sample_s)
        return busy_fractions(before, parse_stat(stat.read_text()), cpus)
    except (OSError, ValueError):
        return None


def busy_names(shares: dict[int, float]) -> str:
    """The cores of ``shares`` busy at least `BUSY_FRACTION` of the sample, as ``cpu 1 85%, ...`` ('' for none)."""
    return ", ".join(f"cpu {c} {f:.0%}" for c, f in sorted(shares.items()) if f >= BUSY_FRACTION)


def busy_cores_line(cpus: Sequence[int], sample_s: float = SAMPLE_S, stat: Path = Path("/proc/stat"),
                    sleep: Callable[[float], None] = time.sleep) -> str | None:
    """A warning naming the cores of ``cpus`` that other work keeps busy, or None (none, or no /proc/stat)."""
    shares = sample_busy(cpus, sample_s, stat, sleep) if cpus else None  # GPU workers: nothing to sample
    named = busy_names(shares or {})
    if not named:
        return None
    return (f"pdbox: other work keeps these cores busy before any engine starts ({named} of {sample_s:g} s): "
            "every engine step that uses them slows down several-fold; give pdbox idle cores with --cpus "
            "(or --prefill-cpus/--decode-cpus)")
