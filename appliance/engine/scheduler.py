"""Continuous batching with chunked prefill, page-counting admission and preemption by recompute."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from appliance.engine.kv_cache import PagePool
from appliance.engine.prefix_cache import RadixCache
from appliance.engine.prompt_logprobs import chunk_budget, scorable_prefix
from appliance.engine.request import Request, RequestStatus
from appliance.engine.slack import SLACK_K, ttft_deadline

# A prompt whose rest after this step's chunk would be at most 1/TAIL_SHARE of a chunk runs whole now:
# a 286-token chat prompt is one step of 286 tokens on CPU (chunk 256), not 256 now and 30 later
# beside the next prompt's first chunk, which would hold its first token for that chunk's time.
TAIL_SHARE = 4
# Once a step holds a prompt's last chunk, every further prefill token delays that prompt's first token.
# Only a prompt that ends within 1/JOIN_SHARE of a chunk still joins (its tokens cost about what a step
# of its own would: 16 tokens on CPU, 128 on CUDA), counted past its cached prefix (a forked sample's
# last partial page is such a prompt); the rest start in the next step, which is no later for them.
JOIN_SHARE = 16


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
                 prefill_order: str = "fifo", slack_k: float = SLACK_K) -> None:
        if prefill_order not in ("fifo", "slack"):
            raise ValueError(f"prefill_order must be fifo or slack, got {prefill_order!r}")
        self.prefill_order = prefill_order
        self.slack_k = slack_k
        self.prefill_rate = 1000.0  # tokens/s; the engine keeps it current from measured steps
        self.pool = pool
        self.cache = cache
        self.page_size = pool.page_size
        self.max_running = max_running
        self.max_decode = max_running  # decode rows a step; the engine lowers it to its largest CUDA graph
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.turns = 0  # decode rows scheduled so far (each row's stamp: who decoded longest ago)

    # -- queue --------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_front(self, reqs: list[Request]) -> None:
        """Queue ``reqs`` ahead of every waiting request, in order (a forked request's samples)."""
        for req in reversed(reqs):
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)

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
        self.cache.unlock(req.fork_hold)
        req.pages = []
        req.prefix_nodes = []
        req.fork_hold = []

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
    def _is_decode(self, req: Request) -> bool:
        return bool(req.output_ids) and req.remaining_prefill == 1

    def deadline(self, req: Request) -> float:
        """When ``req`` should have its first token (:func:`ttft_deadline`)."""
        return ttft_deadline(req.arrival, req.prompt_len, self.prefill_rate, self.slack_k)

    def _grow(self, req: Request, n: int, scheduled: set[int]) -> bool:
        """Pages for ``n`` more tokens of a running request, preempting newer ones if needed."""
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
            return False
        req.pages.extend(pages)
        return True

    def schedule(self) -> ScheduledBatch | None:
        """Decodes first (one token each), then prefill chunks under the token budget.

        A prompt's last chunk may run over the budget by up to 1/TAIL_SHARE of it rather than leave a
        sliver for the next step, and a step that ends a prompt takes only prompts that end within
        1/JOIN_SHARE of a chunk: the tokens of a longer one would delay this one's first token by more
        than they save its own.

        Prefill order: ``fifo`` (running chunks in arrival order, then the queue) or ``slack``
        (running and waiting requests together, earliest TTFT deadline first; a partially prefilled
        long prompt simply gets no budget this step, so a short prompt never waits behind it).
        """
        batch = ScheduledBatch([], [], [], [])
        budget = self.max_prefill_tokens
        scheduled: set[int] = set()
        ps = self.page_size
        ready = self.running if len(self.running) <= self.max_decode else self._decode_turns()
        for req in list(ready):  # NOTE: _is_decode, _grow and _add_to_batch inlined: ~5 us a request a step
            computed = req.computed_len
            if (req.status is not RequestStatus.RUNNING or not req.output_ids
                    or len(req.prompt_ids) + len(req.output_ids) - computed != 1):
                continue
            if computed >= len(req.pages) * ps and not self._grow(req, 1, scheduled):  # its next token needs a page
                continue
            scheduled.add(id(req))
            self.turns += 1
            req.decoded_at = self.turns
            batch.requests.append(req)
            batch.prefix_lens.append(computed)
            batch.extend_lens.append(1)
            batch.sample.append(True)
        cands = [r for r in self.running if r.status is RequestStatus.RUNNING and id(r) not in scheduled
                 and not self._is_decode(r)]
        cands += list(self.waiting)
        strict = self.prefill_order == "fifo"
        if not strict:
            cands.sort(key=self.deadline)
        ends = False  # the step holds a prompt's last chunk
        join = self.max_prefill_tokens // JOIN_SHARE
        for req in cands:
            if budget <= 0:
                break
            most = min(budget, join) if ends else None  # a prompt joining a step that ends one must end too
            if most is not None and req.status is RequestStatus.RUNNING and req.remaining_prefill > most:
                if strict:
                    break
                continue
            if req.status is RequestStatus.WAITING:
                if len(self.running) >= self.max_running or not self._admit(req, most):
                    if strict:
                        break
                    continue
                self.waiting.remove(req)
                n = self._chunk(req.remaining_prefill, chunk_budget(req, budget))
                # NOTE: pages for the whole prompt at once (_admit counted them): consecutive pages that
                # the CPU backend's decode attention reads in place, not interleaved with other chunks'.
                pages = self._alloc(self._pages_needed(req, req.remaining_prefill))
                if pages is None:  # _admit counted the pages; a None here would be a bookkeeping bug
                    raise RuntimeError("page accounting out of sync at admission")
                req.pages.extend(pages)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
            else:
                if req.status is not RequestStatus.RUNNING or req.remaining_prefill < 1:
                    continue  # preempted earlier in this step, or waiting for its sampled token
                n = self._chunk(req.remaining_prefill, chunk_budget(req, budget))
                if not self._grow(req, n, scheduled):
                    continue
            budget -= n
            ends = ends or n == req.remaining_prefill
            scheduled.add(id(req))
            self._add_to_batch(batch, req, n)
        return batch if batch.requests else None

    def _decode_turns(self) -> list[Request]:
        """The running requests this step may decode when more than ``max_decode`` run (a decode engine
        takes in handed-over requests, ``Engine.inject``, as their KV lands, past ``max_running``; the
        largest CUDA graph may hold fewer than ``max_running``): at most ``max_decode`` of them, those that
        decoded longest ago, in that order (round robin). A larger step would run eagerly, which on a GPU
        compiles while serving and launches kernel by kernel."""
        ready = [r for r in self.running if r.status is RequestStatus.RUNNING and r.output_ids
                 and r.remaining_prefill == 1]
        if len(ready) <= self.max_decode:
            return self.running
        return sorted(ready, key=lambda r: r.decoded_at)[:self.max_decode]

    def _chunk(self, remaining: int, budget: int) -> int:
        """This step's tokens of a prompt with ``remaining`` left: up to ``budget``, or all of them when
        the rest would be a sliver (at most 1/TAIL_SHARE of a chunk)."""
        if remaining <= budget + self.max_prefill_tokens // TAIL_SHARE:
            return remaining
        return budget

    def _admit(self, req: Request, most: int | None = None) -> bool:
        """Match the prefix cache and check that the WHOLE prompt fits before taking the request; with
        ``most``, only if at most that many of its tokens are left to compute past the cached prefix."""
        reusable = scorable_prefix(req)  # prompt logprobs: a cached position is never scored
        limit = req.total_len - 1 if reusable is None else reusable
        path = self.cache.match_prefix(req.all_ids, max_pages=limit // self.page_size)
        if most is not None and req.total_len - len(path) * self.page_size > most:
            return False
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
        self.cache.unlock(req.fork_hold)  # a forked sample's hold on its prompt: admitted, path locked now
        req.fork_hold = []
        return True

    def _add_to_batch(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        batch.requests.append(req)
        batch.prefix_lens.append(req.computed_len)
        batch.extend_lens.append(n)
        batch.sample.append(req.computed_len + n == req.total_len)
