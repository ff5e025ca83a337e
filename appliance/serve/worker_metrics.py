"""Prometheus metrics of one worker: queue, batch, KV pool, prefix cache, throughput, transfers."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from appliance.serve.metrics import Registry

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class WorkerMetrics:
    """Updated from the engine thread (``on_step``) and rendered there too (no locks needed)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        cfg = worker.cfg
        self.reg = Registry(role=cfg.role, worker=cfg.name)
        r = self.reg
        self.step_time = r.histogram("pdbox_step_seconds", "Engine step latency", STEP_BUCKETS)
        self.prefill_tokens = r.counter("pdbox_prefill_tokens_total", "Prompt tokens computed")
        self.decode_tokens = r.counter("pdbox_decode_tokens_total", "Tokens decoded")
        self.window: deque[tuple[float, int, int]] = deque()

    def on_step(self, dt: float, prefill: int, decode: int) -> None:
        self.step_time.observe(dt)
        if prefill:
            self.prefill_tokens.inc(prefill)
        if decode:
            self.decode_tokens.inc(decode)
        now = time.monotonic()
        self.window.append((now, prefill, decode))
        while self.window and now - self.window[0][0] > 10.0:
            self.window.popleft()

    def rates(self) -> tuple[float, float]:
        """Prefill and decode tokens/s over the last 10 s."""
        if not self.window:
            return 0.0, 0.0
        span = max(1.0, time.monotonic() - self.window[0][0])
        return sum(w[1] for w in self.window) / span, sum(w[2] for w in self.window) / span

    def render(self) -> str:
        w = self.worker
        e = w.engine
        r = self.reg
        s = e.scheduler
        r.gauge("pdbox_running_requests", "Requests in the running batch").set(len(s.running))
        r.gauge("pdbox_waiting_requests", "Requests waiting for admission").set(len(s.waiting))
        r.gauge("pdbox_reserved_rooms", "Decode reservations waiting for a KV handoff").set(
            len(w.loop.rooms) if w.loop else 0)
        r.gauge("pdbox_kv_pages_total", "Pages in the KV pool").set(e.pool.num_pages)
        used = e.pool.num_pages - e.pool.num_free
        r.gauge("pdbox_kv_pages_used", "Pages not free (requests + prefix cache)").set(used)
        r.gauge("pdbox_kv_pages_cached", "Pages held by the prefix cache").set(e.cache.num_cached_pages)
        hit = e.cache.hit_tokens / e.cache.query_tokens if e.cache.query_tokens else 0.0
        r.gauge("pdbox_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / queried").set(hit)
        pre, dec = self.rates()
        r.gauge("pdbox_prefill_tokens_per_second", "Prompt tokens/s, last 10 s").set(pre)
        r.gauge("pdbox_decode_tokens_per_second", "Decoded tokens/s, last 10 s").set(dec)
        r.gauge("pdbox_preemptions", "Requests preempted (recompute) so far").set(s.num_preemptions)
        r.gauge("pdbox_uptime_seconds", "Seconds since the worker started").set(time.time() - w.started)
        if w.transport is not None:
            st = w.transport.stats()
            labels = {"backend": st.backend}
            r.gauge("pdbox_transfer_bytes_sent", "KV bytes pushed to decode pools").set(st.bytes_sent, **labels)
            r.gauge("pdbox_transfer_bytes_received", "KV bytes received").set(st.bytes_received, **labels)
            r.gauge("pdbox_transfer_rooms_done", "Handoffs completed").set(st.rooms_done, **labels)
            r.gauge("pdbox_transfer_rooms_failed", "Handoffs failed").set(st.rooms_failed, **labels)
        return r.render()
