"""Resident memory of a process tree, by kind, from ``/proc`` (Linux): what a soak watches for growth.

``memory(pid)`` splits a process's resident set (``/proc/PID/smaps``) into ``heap`` (malloc's brk heap),
``anon`` (anonymous maps: pymalloc arenas, large mallocs, torch's tensors), ``shm`` (``/dev/shm`` files:
KV pools, its own and the peers' it writes into), ``libs`` (shared objects) and ``other``, in MiB.
"""

from __future__ import annotations

import os

KINDS = ("heap", "anon", "shm", "libs", "other")


def _kind(mapping: str) -> str:
    if mapping == "[heap]":
        return "heap"
    if not mapping or mapping.startswith("[anon"):
        return "anon"
    if mapping.startswith("/dev/shm/"):
        return "shm"
    if ".so" in os.path.basename(mapping):
        return "libs"
    return "other"


def memory(pid: int) -> dict[str, float]:
    """Resident MiB of ``pid`` by kind, and ``rss`` their sum."""
    kb = dict.fromkeys(KINDS, 0)
    kind = "other"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and ":" not in head[0]:  # a mapping's first line: range perms offset dev inode [path]
                kind = _kind(head[5].strip() if len(head) > 5 else "")
            elif head[0] == "Rss:":
                kb[kind] += int(head[1])
    out = {k: round(v / 1024, 1) for k, v in kb.items()}
    out["rss"] = round(sum(kb.values()) / 1024, 1)
    return out


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children, and so on (not ``pid`` itself)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return sorted(out)


def label(pid: int) -> str:
    """A pdbox process's name: the worker's ``--name``, ``router`` for ``pdbox up`` itself, else the command."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    if "--name" in argv[:-1]:
        return argv[argv.index("--name") + 1]
    if any("multiprocessing.resource_tracker" in a for a in argv):
        return "resource_tracker"  # torch.multiprocessing's helper (shared memory bookkeeping)
    if "up" in argv and any(a.endswith("appliance.cli") or a.endswith("pdbox") for a in argv):
        return "router"
    return " ".join(argv)[:60]


def tree_memory(root: int) -> dict[str, dict[str, float]]:
    """``memory`` of ``root`` and every descendant still alive, by :func:`label` (pid added on a clash)."""
    out: dict[str, dict[str, float]] = {}
    for pid in [root, *descendants(root)]:
        try:
            name, mem = label(pid), memory(pid)
        except (OSError, IndexError):
            continue  # gone meanwhile
        out[name if name not in out else f"{name}#{pid}"] = mem
    return out
