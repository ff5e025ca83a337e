"""Pinning the calling thread's OpenMP team (``team.c``): the threads an engine borrows from an idle
partner run on the partner's cores, and only there (`appliance.engine.core_share`)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from kernels.cpu.build import Native, load

_I32, _P = ctypes.c_int, ctypes.c_void_p


def native() -> Native:
    """The library, or why this machine has none (it needs only a C compiler with OpenMP)."""
    built = load("team", needs=(), cflags=())
    if built.lib is not None and not getattr(built.lib.pdbox_pin_team, "argtypes", None):
        built.lib.pdbox_pin_team.argtypes = [_I32, _P, _I32, _P]
        built.lib.pdbox_team_masks.argtypes = [_I32, _P]
        built.lib.pdbox_pin_team.restype = built.lib.pdbox_team_masks.restype = _I32
    return built


def _lib() -> ctypes.CDLL:
    return native().required("the team-pinning library")


def pin_team(home: Sequence[int], lent: Sequence[int]) -> None:
    """Pin a team of ``len(home) + len(lent)`` threads: the first ``len(home)`` may run on any core of
    ``home``, the others each on one core of ``lent``. Raises ``OSError`` when the kernel refuses a core."""
    if not home:
        raise ValueError("home must name at least one core")
    h = (ctypes.c_int * len(home))(*home)
    lt = (ctypes.c_int * max(1, len(lent)))(*lent)
    rc = _lib().pdbox_pin_team(len(home), h, len(lent), lt)
    if rc == -1:
        raise OSError(f"OpenMP gave fewer than {len(home) + len(lent)} threads")
    if rc:
        raise OSError(rc, f"sched_setaffinity refused home {list(home)} / lent {list(lent)}")


def team_cores(n: int) -> list[tuple[int, ...]]:
    """The cores each thread of a team of ``n`` may run on (cores 0..63), thread 0 first."""
    masks = (ctypes.c_uint64 * n)()
    size = _lib().pdbox_team_masks(n, masks)
    return [tuple(c for c in range(64) if masks[t] >> c & 1) for t in range(min(size, n))]
