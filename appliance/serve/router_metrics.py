"""The router's own Prometheus series (``role="router"``), and the per-worker gauges it renders."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.serve.metrics import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, Registry
from appliance.serve.policies import WorkerHandle

LATENCY = REQUEST_LATENCY_BUCKETS
TOKEN_LATENCY = TOKEN_LATENCY_BUCKETS


class RouterMetrics:
    """Every series the request path records; placements add theirs to :attr:`reg`."""

    def __init__(self) -> None:
        self.reg = r = Registry(role="router", worker="router")
        self.requests = r.counter("pdbox_requests_total", "Requests by endpoint and outcome",
                                  ("endpoint", "outcome"))
        self.errors = r.counter("pdbox_errors_total", "Errors by kind", ("kind",))
        self.ttft = r.histogram("pdbox_ttft_seconds", "Time to first token", LATENCY)
        self.tpot = r.histogram("pdbox_tpot_seconds", "Time per output token after the first", TOKEN_LATENCY)
        self.itl = r.histogram("pdbox_itl_seconds", "Inter-token latency", TOKEN_LATENCY)
        self.e2e = r.histogram("pdbox_e2e_seconds", "End-to-end request latency", LATENCY)
        self.handoff_tail = r.histogram("pdbox_handoff_tail_seconds",
                                        "Disagg: prefill's first token to decode's (the handoff not hidden "
                                        "behind the prefill)", TOKEN_LATENCY)
        self.tokens = r.counter("pdbox_output_tokens_total", "Tokens streamed to clients")
        self.prompt = r.counter("pdbox_prompt_tokens_total", "Prompt tokens received")
        self.restarts = r.total("pdbox_worker_restarts_total", "Times the launcher restarted a worker")

    def render(self, workers: Iterable[WorkerHandle], inflight: int, uptime_s: float) -> str:
        """The router's text, with the gauges of this moment (its in-flight count, each worker's state)."""
        r = self.reg
        r.gauge("pdbox_router_inflight", "Requests in flight at the router").set(inflight)
        r.gauge("pdbox_uptime_seconds", "Seconds since the process started").set(uptime_s)
        # NOTE: per-worker series the router keeps carry the worker's own role/worker labels.
        healthy = r.gauge("pdbox_worker_healthy", "1 when the worker answers health checks")
        busy = r.gauge("pdbox_worker_inflight", "Requests the router has in flight on the worker")
        healthy.clear()
        busy.clear()
        self.restarts.clear()
        for w in workers:
            self.restarts.set_total(w.restarts, role=w.role, worker=w.name)
            healthy.set(1.0 if w.healthy else 0.0, role=w.role, worker=w.name)
            busy.set(w.inflight, role=w.role, worker=w.name)
        return r.render()
