"""Device and core sets: "0-3,6" parsing and splitting a node into prefill and decode groups."""

from __future__ import annotations

import os


def parse_ids(text: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``. Raises ``ValueError`` naming the bad part."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"bad id range {part!r} in {text!r}: use forms like 0-3,6") from None
    if any(i < 0 for i in out):
        raise ValueError(f"ids must be >= 0 in {text!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"ids repeat in {text!r}")
    return out


def format_ids(ids: list[int] | tuple[int, ...]) -> str:
    return ",".join(str(i) for i in ids)


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def split_groups(ids: list[int], group_size: int, what: str) -> list[list[int]]:
    """Split ``ids`` into groups of ``group_size`` (one engine each)."""
    if group_size < 1:
        raise ValueError(f"{what}: TP size must be >= 1")
    if not ids:
        raise ValueError(f"{what}: no devices given")
    if len(ids) % group_size:
        raise ValueError(f"{what}: {len(ids)} devices do not split into engines of TP {group_size}")
    return [ids[i : i + group_size] for i in range(0, len(ids), group_size)]
