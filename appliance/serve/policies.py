"""Routing policies: which engine gets the next request."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from appliance.serve.load_report import NO_REPORT, LoadReport


@dataclass(eq=False)
class WorkerHandle:
    """The router's view of one worker."""

    name: str
    role: str
    url: str
    pid: int = 0
    devices: str = ""
    tp: int = 1
    transport: str = ""
    healthy: bool = False
    inflight: int = 0
    prefill_tokens: int = 0  # prompt tokens sent to prefill here whose first token has not come back
    load: LoadReport = NO_REPORT  # its last /load report
    last_seen: float = 0.0   # its last 200 to /health (time.monotonic)
    last_heard: float = 0.0  # its last answer of any kind to /health: a frozen process (SIGSTOP) gives none
    restarts: int = 0

    @property
    def pressure(self) -> float:
        """In-flight requests plus the worker's own queue; ties broken by KV use."""
        ld = self.load
        used = (ld.total_pages - ld.free_pages - ld.evictable_pages) / ld.total_pages if ld.total_pages else 0.0
        return self.inflight + ld.waiting + used

    @property
    def kv_free(self) -> float:
        """The share of the worker's KV pages free or evictable, as its last load report says."""
        ld = self.load
        return (ld.free_pages + ld.evictable_pages) / ld.total_pages if ld.total_pages else 1.0


class Policy(Protocol):
    name: str

    def pick(self, workers: Sequence[WorkerHandle], prompt_ids: Sequence[int]) -> WorkerHandle: ...

    def record(self, worker: WorkerHandle, prompt_ids: Sequence[int]) -> None: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self.i = 0

    def pick(self, workers: Sequence[WorkerHandle], prompt_ids: Sequence[int]) -> WorkerHandle:
        self.i += 1
        return workers[self.i % len(workers)]

    def record(self, worker: WorkerHandle, prompt_ids: Sequence[int]) -> None:
        pass


class LeastLoad(RoundRobin):
    name = "least_load"

    def pick(self, workers: Sequence[WorkerHandle], prompt_ids: Sequence[int]) -> WorkerHandle:
        self.i += 1  # rotate among equals
        n = len(workers)
        return min((workers[(self.i + k) % n] for k in range(n)), key=lambda w: w.pressure)


class PowerOfTwo(RoundRobin):
    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def pick(self, workers: Sequence[WorkerHandle], prompt_ids: Sequence[int]) -> WorkerHandle:
        if len(workers) == 1:
            return workers[0]
        a, b = self.rng.sample(list(workers), 2)
        return a if a.pressure <= b.pressure else b


class CacheAware(LeastLoad):
    """Longest cached prefix wins, unless loads are imbalanced; then least load.

    A match counts only when it covers at least ``min_match`` of the prompt (SGLang's
    cache_threshold): a short shared system prompt alone must not pull every request onto one
    engine. The router remembers, per worker, the page-aligned prefixes it sent there (a hash chain over
    ``page_size``-token blocks, LRU-bounded by the worker's KV pages once it has reported them): an
    approximation of each engine's radix cache.
    """

    name = "cache_aware"

    def __init__(self, page_size: int = 16, capacity: int = 200_000, imbalance: float = 4.0,
                 min_match: float = 0.5) -> None:
        super().__init__()
        self.min_match = min_match
        self.page_size = page_size
        self.capacity = capacity
        self.imbalance = imbalance
        self.seen: dict[str, OrderedDict[int, float]] = {}

    def _chain(self, ids: Sequence[int]) -> list[int]:
        out, h = [], 0
        for i in range(len(ids) // self.page_size):
            h = hash((h, tuple(ids[i * self.page_size : (i + 1) * self.page_size])))
            out.append(h)
        return out

    def pick(self, workers: Sequence[WorkerHandle], prompt_ids: Sequence[int]) -> WorkerHandle:
        loads = [w.pressure for w in workers]
        if max(loads) - min(loads) > self.imbalance:
            return super().pick(workers, prompt_ids)
        chain = self._chain(prompt_ids)
        best, best_len = None, 0
        for w in workers:
            seen = self.seen.get(w.url)
            n = 0
            if seen:
                for h in chain:
                    if h not in seen:
                        break
                    n += 1
            if n > best_len or (n == best_len and best is not None and n > 0 and w.pressure < best.pressure):
                best, best_len = w, n
        if best is None or best_len == 0 or best_len * self.page_size < self.min_match * len(prompt_ids):
            return super().pick(workers, prompt_ids)
        return best

    def matched_tokens(self, worker: WorkerHandle, prompt_ids: Sequence[int]) -> int:
        """Tokens of ``prompt_ids`` that ``worker`` likely holds in its prefix cache."""
        seen = self.seen.get(worker.url)
        n = 0
        if seen:
            for h in self._chain(prompt_ids):
                if h not in seen:
                    break
                n += 1
        return n * self.page_size

    def record(self, worker: WorkerHandle, prompt_ids: Sequence[int]) -> None:
        seen = self.seen.setdefault(worker.url, OrderedDict())
        now = time.monotonic()
        for h in self._chain(prompt_ids):
            seen[h] = now
            seen.move_to_end(h)
        # NOTE: the engine's pool holds at most its pages, so older prefixes than that are gone there (its
        # cache evicts least recently used first, as this does); a worker not yet reported keeps `capacity`
        pages = worker.load.total_pages
        most = min(self.capacity, pages) if pages else self.capacity
        while len(seen) > most:
            seen.popitem(last=False)


POLICIES = {"round_robin": RoundRobin, "least_load": LeastLoad, "power_of_two": PowerOfTwo,
            "cache_aware": CacheAware}


def make_policy(name: str, page_size: int = 16) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}: choose {', '.join(POLICIES)}")
    if name == "cache_aware":
        return CacheAware(page_size)
    return POLICIES[name]()
