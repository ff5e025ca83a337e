"""Prometheus metrics of one worker: latency, queue, batch, KV pool, prefix cache, throughput, transfers.

Engine-side latencies (``pdbox_ttft_seconds`` …) run from the moment the request reached THIS
engine: on a prefill worker TTFT is queueing plus prompt compute; on a decode worker the clock
starts when the handed-over request joins the batch (its first token came from prefill, so decode
records no TTFT). The router's series (``role="router"``) are the client's view.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from appliance.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, Registry

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
WRITE_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
RATE_WINDOW_S = 10.0


class RateWindow:
    """Rates of several counts over the last ``span_s`` seconds, from timestamped increments."""

    def __init__(self, span_s: float = RATE_WINDOW_S) -> None:
        self.span_s = span_s
        self.events: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, now: float, **deltas: float) -> None:
        if any(deltas.values()):
            self.events.append((now, deltas))
        while self.events and now - self.events[0][0] > self.span_s:
            self.events.popleft()

    def rate(self, now: float, key: str) -> float:
        """Sum over the window / time since its first event (at least 1 s, at most the window)."""
        while self.events and now - self.events[0][0] > self.span_s:
            self.events.popleft()
        if not self.events:
            return 0.0
        span = min(self.span_s, max(1.0, now - self.events[0][0]))
        return sum(d.get(key, 0.0) for _, d in self.events) / span


class WorkerMetrics:
    """Updated from the engine thread (``on_step``) and rendered there too.

    NOTE: the engine loop reports only ``(dt, prefill tokens, decode tokens)`` per step. To see
    the batch itself, the time spent in transport writes and when a decode room's KV lands,
    ``instrument`` wraps three instance methods (``scheduler.schedule``, ``transport.write``,
    ``transport.drain_completed``) with pass-through timers. They run on the engine thread, like
    every other caller of those methods. An explicit hook in the engine loop would replace them.
    """

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        cfg = worker.cfg
        self.role = cfg.role
        self.reg = Registry(role=cfg.role, worker=cfg.name)
        r = self.reg
        self.ttft = r.histogram("pdbox_ttft_seconds", "Time to first token (engine side)", LATENCY_BUCKETS)
        self.tpot = r.histogram("pdbox_tpot_seconds", "Time per output token after the first (engine side)",
                                TOKEN_LATENCY_BUCKETS)
        self.itl = r.histogram("pdbox_itl_seconds", "Inter-token latency (engine side)", TOKEN_LATENCY_BUCKETS)
        self.e2e = r.histogram("pdbox_e2e_seconds", "Request latency on this engine", LATENCY_BUCKETS)
        self.step_time = r.histogram("pdbox_step_seconds", "Engine step latency", STEP_BUCKETS)
        self.batch_hist = r.histogram("pdbox_batch_size", "Requests in an engine step", BATCH_BUCKETS)
        self.batch_now = r.gauge("pdbox_batch_requests", "Requests in the last engine step (0 when idle)")
        self.prefill_tokens = r.counter("pdbox_prefill_tokens_total", "Prompt tokens computed")
        self.decode_tokens = r.counter("pdbox_decode_tokens_total", "Tokens decoded")
        self.requests_done = r.counter("pdbox_engine_requests_total", "Requests this engine finished, by reason",
                                        ("reason",))
        self.window = RateWindow()
        self._batch: Any = None  # the ScheduledBatch of the step in progress
        self._last_token: dict[str, float] = {}  # request id -> when its latest token appeared here
        self._first_token: dict[str, float] = {}
        self._sent = self._received = 0
        self.write_time = self.handoff_time = None
        if worker.transport is not None:
            backend = worker.transport.stats().backend
            self.backend = backend
            self.write_time = r.histogram("pdbox_transfer_write_seconds",
                                          "Time in one KV write call (one layer of one request's pages)",
                                          WRITE_BUCKETS, ("backend",))
            self.handoff_time = r.histogram("pdbox_kv_handoff_seconds",
                                            "Decode side: pages reserved until prompt KV and first token landed",
                                            LATENCY_BUCKETS, ("backend",))
        self.instrument()

    # -- instrumentation (engine thread) -----------------------------------------------------------
    def instrument(self) -> None:
        engine = self.worker.engine
        schedule = engine.scheduler.schedule

        def timed_schedule():
            self._batch = schedule()
            return self._batch

        engine.scheduler.schedule = timed_schedule
        transport = self.worker.transport
        if transport is None:
            return
        labels = {"backend": self.backend}
        write, drain = transport.write, transport.drain_completed

        def timed_write(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return write(*args, **kwargs)
            finally:
                self.write_time.observe(time.perf_counter() - t0, **labels)

        def timed_drain():
            done = drain()
            loop = self.worker.loop
            now = time.monotonic()
            for room, status in done:
                pending = loop.rooms.get(room) if loop is not None else None
                if pending is not None and status.done:
                    self.handoff_time.observe(now - pending.since, **labels)
            return done

        transport.write = timed_write
        transport.drain_completed = timed_drain

    def on_step(self, dt: float, prefill: int, decode: int) -> None:
        now = time.monotonic()
        self.step_time.observe(dt)
        if prefill:
            self.prefill_tokens.inc(prefill)
        if decode:
            self.decode_tokens.inc(decode)
        batch, self._batch = self._batch, None
        if batch is not None:
            self.batch_hist.observe(len(batch.requests))
            self.batch_now.set(len(batch.requests))
            for req, sampled in zip(batch.requests, batch.sample):
                if sampled:
                    self._token(req, now)
        self.window.add(now, prefill=prefill, decode=decode, **self._transfer_deltas())

    def _token(self, req: Any, now: float) -> None:
        """``req`` got a token in this step: TTFT, ITL and, when it finished, TPOT and E2E."""
        rid = req.request_id
        last = self._last_token.get(rid)
        if last is None:
            if len(req.output_ids) <= 1:
                self.ttft.observe(now - req.arrival)
                self._first_token[rid] = now
            else:  # joined with its first token (a decode handoff): that token arrived on joining
                self._first_token[rid] = last = req.arrival
        if last is not None:
            self.itl.observe(now - last)
        self._last_token[rid] = now
        if req.is_finished:
            first = self._first_token.pop(rid, now)
            self._last_token.pop(rid, None)
            self.e2e.observe(now - req.arrival)
            n = len(req.output_ids)
            if n > 1:
                self.tpot.observe((now - first) / (n - 1))
            self.requests_done.inc(reason=req.finish_reason or "unknown")

    def _transfer_deltas(self) -> dict[str, float]:
        t = self.worker.transport
        if t is None:
            return {}
        st = t.stats()
        out = {"sent": st.bytes_sent - self._sent, "received": st.bytes_received - self._received}
        self._sent, self._received = st.bytes_sent, st.bytes_received
        return out

    # -- exposition --------------------------------------------------------------------------------
    def render(self) -> str:
        """:meth:`refresh`, then the text (tests and callers already on the engine thread)."""
        self.refresh()
        return self.reg.render()

    def refresh(self) -> None:
        """Set the gauges of this moment from the engine's state. Engine thread only.

        Writing the text (``self.reg.render()``, prometheus_client, thread-safe) is left to the
        caller's thread, so the engine need not wait for it (``python -m bench.prom_cost``: a few ms).
        """
        w = self.worker
        e = w.engine
        r = self.reg
        s = e.scheduler
        now = time.monotonic()
        self.window.add(now, **self._transfer_deltas())
        live = e.requests
        for d in (self._last_token, self._first_token):  # aborted requests never finish a step
            for rid in [rid for rid in d if rid not in live]:
                del d[rid]
        if not e.has_unfinished():
            self.batch_now.set(0)
        r.gauge("pdbox_running_requests", "Requests in the running batch").set(len(s.running))
        r.gauge("pdbox_waiting_requests", "Requests waiting for admission").set(len(s.waiting))
        r.gauge("pdbox_reserved_rooms", "Decode reservations waiting for a KV handoff").set(
            len(w.loop.rooms) if w.loop else 0)
        r.gauge("pdbox_kv_pages_total", "Pages in the KV pool").set(e.pool.num_pages)
        used = e.pool.num_pages - e.pool.num_free
        r.gauge("pdbox_kv_pages_used", "Pages not free (requests + prefix cache)").set(used)
        r.gauge("pdbox_kv_pages_cached", "Pages held by the prefix cache").set(e.cache.num_cached_pages)
        r.gauge("pdbox_kv_pages_evictable", "Cached pages no request holds").set(e.cache.evictable_pages())
        hit = e.cache.hit_tokens / e.cache.query_tokens if e.cache.query_tokens else 0.0
        r.gauge("pdbox_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / queried").set(hit)
        r.total("pdbox_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache"
                ).set_total(e.cache.query_tokens)
        r.total("pdbox_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache"
                ).set_total(e.cache.hit_tokens)
        r.gauge("pdbox_prefill_tokens_per_second", "Prompt tokens/s, last 10 s").set(self.window.rate(now, "prefill"))
        r.gauge("pdbox_decode_tokens_per_second", "Decoded tokens/s, last 10 s").set(self.window.rate(now, "decode"))
        r.total("pdbox_preemptions_total", "Requests preempted (recompute)").set_total(s.num_preemptions)
        r.gauge("pdbox_uptime_seconds", "Seconds since the process started").set(time.time() - w.started)
        if e.cores is not None and e.cores.lent:  # a partner's cores to borrow
            r.total("pdbox_borrowed_core_seconds_total", "Seconds this engine ran on its partner's cores (the "
                    "partner had no work)").set_total(e.cores.borrowed_seconds())
            r.total("pdbox_core_borrows_total", "Times this engine's threads spread onto its partner's cores"
                    ).set_total(e.cores.borrows)
        if e.cores is not None and e.cores.foreign is not None:
            r.gauge("pdbox_cores_busy_elsewhere", "This engine's cores (and its partner's) that work outside "
                    "pdbox keeps busy (its team keeps off them)").set(len(e.cores.foreign.busy))
        if w.transport is not None:
            self._refresh_transfer(now)

    def _refresh_transfer(self, now: float) -> None:
        r = self.reg
        st = self.worker.transport.stats()
        b = {"backend": st.backend}
        nbytes = r.total("pdbox_transfer_bytes_total", "KV bytes moved, by direction", ("direction", "backend"))
        nbytes.set_total(st.bytes_sent, direction="sent", **b)
        nbytes.set_total(st.bytes_received, direction="received", **b)
        gbps = r.gauge("pdbox_transfer_gbps", "KV transfer throughput in GB/s over the last 10 s, by direction",
                       ("direction", "backend"))
        gbps.set(self.window.rate(now, "sent") / 1e9, direction="sent", **b)
        gbps.set(self.window.rate(now, "received") / 1e9, direction="received", **b)
        r.total("pdbox_transfer_writes_total", "KV write calls", ("backend",)).set_total(st.writes, **b)
        r.total("pdbox_transfer_signals_total", "Room-complete signals sent", ("backend",)
                ).set_total(st.signals_sent, **b)
        rooms = r.total("pdbox_transfer_rooms_total", "Handoffs received, by outcome", ("outcome", "backend"))
        rooms.set_total(st.rooms_done, outcome="done", **b)
        rooms.set_total(st.rooms_failed, outcome="failed", **b)
        r.gauge("pdbox_transfer_rooms_pending", "Handoffs awaited", ("backend",)).set(st.rooms_pending, **b)
        dropped = r.total("pdbox_transfer_dropped_total", "Late or unknown messages dropped", ("what", "backend"))
        dropped.set_total(st.signals_dropped, what="signal", **b)
        dropped.set_total(st.writes_dropped, what="write", **b)
