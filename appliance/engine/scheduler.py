"""Continuous batching with chunked prefill, page-counting admission and preemption by recompute."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from appliance.engine.kv_cache import PagePool
from appliance.engine.prefix_cache import RadixCache
from appliance.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step: each request feeds ``extend_lens[i]`` tokens starting at its ``prefix_lens[i]``."""

    requests: list[Request]
    prefix_lens: list[int]
    extend_lens: list[int]
    sample: list[bool]

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.extend_lens) and all(self.sample)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)


class Scheduler:
    """Decides, step by step, which tokens of which requests to run.

    Order of a step: running requests oldest first (decodes always; prefill chunks under the token
    budget), then new requests from the waiting queue while pages and budget last. When a running
    request needs a page and none is free, the prefix cache is evicted first, then the newest running
    request is preempted: its pages are released (full ones into the prefix cache) and it is
    recomputed later from its prompt plus the tokens it has produced.
    """

    def __init__(self, pool: PagePool, cache: RadixCache, max_running: int, max_prefill_tokens: int,
                 ) -> None:
        self.pool = pool
        self.cache = cache
        self.page_size = pool.page_size
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue --------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None

    # -- pages --------------------------------------------------------------------------------
    def _pages_needed(self, req: Request, n_tokens: int) -> int:
        want = -(-(req.computed_len + n_tokens) // self.page_size)
        return max(0, want - len(req.pages))

    def alloc_pages(self, n: int) -> list[int] | None:
        """``n`` pages for a caller outside the scheduler (evicting the prefix cache if needed)."""
        return self._alloc(n)

    def _alloc(self, n: int) -> list[int] | None:
        if n == 0:
            return []
        pages = self.pool.alloc(n)
        if pages is None:
            self.cache.evict(n - self.pool.num_free)
            pages = self.pool.alloc(n)
        return pages

    def release(self, req: Request) -> None:
        """Give back every page of ``req``: computed full pages to the prefix cache, the rest freed."""
        computed = req.all_ids[: req.computed_len]
        self.pool.free(self.cache.insert(computed, req.pages))
        self.cache.unlock(req.prefix_nodes)
        req.pages = []
        req.prefix_nodes = []

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.computed_len = 0
        req.cached_len = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Mark finished, drop from the queues and release its pages."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.release(req)

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        batch = ScheduledBatch([], [], [], [])
        budget = self.max_prefill_tokens
        scheduled: set[int] = set()
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = req.remaining_prefill
            if n > 1 or not req.output_ids:
                n = min(n, budget)
                if n == 0:
                    continue
            need = self._pages_needed(req, n)
            pages = self._alloc(need)
            while pages is None:
                victims = [r for r in self.running if id(r) not in scheduled and r is not req]
                if not victims:
                    break
                self.preempt(victims[-1])
                pages = self._alloc(need)
            if pages is None:
                self.preempt(req)
                continue
            req.pages.extend(pages)
            if n > 1 or not req.output_ids:
                budget -= n
            scheduled.add(id(req))
            self._add_to_batch(batch, req, n)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            if not self._admit(req, budget):
                break
            self.waiting.popleft()
            n = min(req.remaining_prefill, budget)
            pages = self._alloc(self._pages_needed(req, n))
            if pages is None:  # _admit counted the pages; a None here would be a bookkeeping bug
                raise RuntimeError("page accounting out of sync at admission")
            req.pages.extend(pages)
            budget -= n
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_to_batch(batch, req, n)
        return batch if batch.requests else None

    def _admit(self, req: Request, budget: int) -> bool:
        """Match the prefix cache and check that the WHOLE prompt fits before taking the request."""
        path = self.cache.match_prefix(req.all_ids, max_pages=(req.total_len - 1) // self.page_size)
        whole = -(-(req.total_len + 1) // self.page_size) - len(path)
        headroom = len(self.running)  # one page of decode growth per running request
        self.cache.lock(path)
        available = self.pool.num_free + self.cache.evictable_pages()
        if whole + headroom > available and self.running:
            self.cache.unlock(path)
            return False
        if whole > available:
            self.cache.unlock(path)
            return False
        req.prefix_nodes = path
        req.pages = [n.page for n in path]
        req.computed_len = req.cached_len = len(path) * self.page_size
        return True

    def _add_to_batch(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        batch.requests.append(req)
        batch.prefix_lens.append(req.computed_len)
        batch.extend_lens.append(n)
        batch.sample.append(req.computed_len + n == req.total_len)
